"""Project-wide fixtures: no test may leave a thread, child process or socket behind."""

from __future__ import annotations

import os
import threading
import time

import pytest


def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.add(int(entry))
    return kids


def _sockets() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:") or target == "/dev/ptmx" or target.startswith("/dev/pts/"):
            out.add(f"{fd}->{target}")
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves threads, child processes, sockets or ptys behind."""
    threads = set(threading.enumerate())
    kids = _children()
    socks = _sockets()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        extra_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        extra_kids = _children() - kids
        extra_socks = _sockets() - socks
        if not (extra_threads or extra_kids or extra_socks) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not extra_threads, f"test left threads running: {extra_threads}"
    assert not extra_kids, f"test left child processes: {sorted(extra_kids)}"
    assert not extra_socks, f"test left sockets/ptys open: {sorted(extra_socks)}"

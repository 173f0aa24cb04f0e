"""Run ``cimlab sim serve`` in a subprocess and get its link URL: for the demo, tests and benchmarks.

The server is a separate process, so the host side sees a real pty or TCP port and its CPU time is not mixed
with the twin's.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType

from cimlab.firmware_bridge.errors import CimTimeoutError, LinkError


class TwinProcess:
    """``with TwinProcess(pty=True, profile="ideal") as url: ...`` starts a served twin and stops it after.

    Args:
        pty: serve on a pseudo-terminal (else TCP on 127.0.0.1, port chosen by the OS).
        profile, seed, sets, baud, max_payload: passed to ``cimlab sim serve``.
        smu: also serve the simulated SMU that powers the twin (its VISA resource is then ``smu_resource``).
        start_timeout: seconds to wait for the server to print where it listens.
    """

    def __init__(
        self,
        *,
        pty: bool = False,
        profile: str = "default",
        seed: int = 0,
        sets: Sequence[str] = (),
        baud: int | None = None,
        max_payload: int | None = None,
        smu: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.args = [sys.executable, "-m", "cimlab.cli", "sim", "serve", "--profile", profile, "--seed", str(seed)]
        self.args += ["--pty"] if pty else ["--tcp", "127.0.0.1:0"]
        for s in sets:
            self.args += ["--set", s]
        if baud:
            self.args += ["--baud", str(baud)]
        if max_payload:
            self.args += ["--max-payload", str(max_payload)]
        if smu:
            self.args += ["--smu", "127.0.0.1:0"]
        self.lines = 2 if smu else 1
        self.smu_resource = ""
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        """Start the server; return its link URL (``/dev/pts/N`` or ``tcp://127.0.0.1:PORT``)."""
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            assert self.proc.stdout is not None
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while buf.count(b"\n") < self.lines:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop()
                    raise CimTimeoutError(f"twin server did not report its address within {self.start_timeout} s")
                if sel.select(left):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        err = self._stderr()
                        self.stop()
                        raise LinkError(f"twin server exited before serving: {err.strip()}")
                    buf += chunk
        lines = buf.decode().splitlines()
        self.url = lines[0].strip()
        if self.lines == 2:
            self.smu_resource = lines[1].strip()
        return self.url

    def _stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        try:
            self.proc.wait(timeout=5)
            return self.proc.stderr.read().decode(errors="replace")
        except subprocess.TimeoutExpired:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

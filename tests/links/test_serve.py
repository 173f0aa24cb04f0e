"""The device end on a port (firmware_bridge.serve): loopback by default, a token for remote access, one host at a
time with the others refused BUSY at once, an idle timeout; and a serial device (a pty slave stands for a UART)."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from cimlab import chip_sim
from cimlab.driver import Chip
from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.errors import ConfigError, DeviceError, LinkError
from cimlab.firmware_bridge.frame import REPLY_FLAG, Framer, encode_frame
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.firmware_bridge.serve import (
    check_exposure,
    read_token_file,
    serve_serial,
    serve_tcp,
)

TOKEN = b"0123456789abcdef-token"


@contextmanager
def served(start: Callable[..., None], **kwargs: object) -> Iterator[tuple[str, Bridge]]:
    """Run ``start(bridge, stop=..., on_ready=..., **kwargs)`` on a thread over the ideal twin; yields (where, bridge)."""
    bridge = Bridge(chip_sim.make_twin("ideal", 0))
    stop = threading.Event()
    where: queue.Queue[str] = queue.Queue()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start(bridge, stop=stop, on_ready=where.put, **kwargs)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)
            where.put("")

    thread = threading.Thread(target=run, name="test-server")
    thread.start()
    try:
        url = where.get(timeout=10)
        assert not errors, errors
        yield url, bridge
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors, errors


def tcp(**kwargs: object) -> Callable[..., None]:
    def start(bridge: Bridge, *, stop: threading.Event, on_ready: Callable[[str], None]) -> None:
        serve_tcp(bridge, "127.0.0.1", 0, stop=stop, on_ready=on_ready, **kwargs)  # type: ignore[arg-type]

    return start


def test_only_loopback_unless_asked_and_then_only_with_a_token() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.5.6.7"):
        check_exposure(host, allow_remote=False, token=None)
    for host in ("0.0.0.0", "::", "192.168.1.7", "board.lab"):
        with pytest.raises(ConfigError, match="--allow-remote"):
            check_exposure(host, allow_remote=False, token=None)
        with pytest.raises(ConfigError, match="token"):
            check_exposure(host, allow_remote=True, token=None)
        check_exposure(host, allow_remote=True, token=TOKEN)
    with pytest.raises(ConfigError, match="allow-remote"):  # refused before any socket is made
        serve_tcp(Bridge(chip_sim.make_twin("ideal", 0)), "0.0.0.0", 0, stop=threading.Event(),
                  on_ready=lambda _: None)


def test_token_files(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_bytes(TOKEN + b"\n")
    assert read_token_file(good) == TOKEN
    (tmp_path / "short").write_bytes(b"abc\n")
    with pytest.raises(ConfigError, match="3 bytes"):
        read_token_file(tmp_path / "short")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_a_second_host_is_refused_busy_at_once_and_served_after() -> None:
    with served(tcp()) as (url, _):
        with Chip.open(url) as first:
            w = np.ones((first.spec.rows, first.spec.cols), dtype=np.int64)
            first.write_weights(w)
            t0 = time.monotonic()
            with pytest.raises(DeviceError) as info:
                Chip.open(url, timeout=5.0)
            assert time.monotonic() - t0 < 2.0
            assert info.value.status == Status.BUSY and "another host" in str(info.value)
            # the first host was not disturbed
            np.testing.assert_array_equal(first.read_weights(), w)
        deadline = time.monotonic() + 5
        while True:  # the server notices the first host has gone within its poll interval
            try:
                with Chip.open(url) as second:
                    np.testing.assert_array_equal(second.read_weights(), w)  # the device's state outlived it
                break
            except DeviceError:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_an_idle_host_is_disconnected_and_the_next_is_served() -> None:
    with served(tcp(idle_timeout_s=0.3)) as (url, _):
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as idle:
            t0 = time.monotonic()
            idle.settimeout(5)
            assert idle.recv(100) == b""  # the server closed it
            assert 0.25 < time.monotonic() - t0 < 3.0
        with Chip.open(url) as chip:
            chip.ping(b"next")


def test_with_a_token_nothing_is_served_before_hello_carries_it() -> None:
    with served(tcp(token=TOKEN)) as (url, bridge):
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        spec = bridge.spec
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            w = np.full((spec.rows, spec.cols), 5)
            raw.sendall(encode_frame(Opcode.WRITE_WEIGHTS, 1, m.WeightRows.of(spec, 0, w).encode()))
            raw.settimeout(5)
            framer = Framer()
            replies: list = []
            while not replies:
                replies = framer.feed(raw.recv(4096))
            assert (replies[0].seq, replies[0].status) == (1, Status.DENIED)
        assert not (bridge.controller.read_weights(0, spec.rows) == 5).any()
        with pytest.raises(DeviceError) as info:
            Chip.open(url)
        assert info.value.status == Status.DENIED
        with pytest.raises(DeviceError):
            Chip.open(url, token=b"not-the-token-at-all")
        with Chip.open(url, token=TOKEN) as chip:
            chip.write_weights(w)
            np.testing.assert_array_equal(chip.read_weights(), w)


def test_a_refused_connection_gets_one_busy_frame() -> None:
    with served(tcp()) as (url, _), Chip.open(url) as first:
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as other:
            other.settimeout(5)
            data = b""
            while True:
                chunk = other.recv(4096)
                if not chunk:
                    break
                data += chunk
        (frame,) = Framer().feed(data)
        assert (frame.opcode, frame.seq, frame.status) == (REPLY_FLAG, 0, Status.BUSY)
        first.ping(b"still served")


def test_serve_serial_on_a_tty() -> None:
    """A pty slave stands for a board's UART: the server opens it as a serial device, the test is the host."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:

        def start(bridge: Bridge, *, stop: threading.Event, on_ready: Callable[[str], None]) -> None:
            serve_serial(bridge, path, stop=stop, on_ready=on_ready, baud=3_000_000)

        with served(start) as (where, _):
            assert where == path
            os.write(master, encode_frame(Opcode.PING, 7, b"uart"))
            framer = Framer()
            replies: list = []
            deadline = time.monotonic() + 5
            while not replies and time.monotonic() < deadline:
                try:
                    replies = framer.feed(os.read(master, 4096))
                except BlockingIOError:
                    time.sleep(0.01)
            assert [(r.seq, r.payload) for r in replies] == [(7, b"uart")]
    finally:
        os.close(master)
        os.close(slave)


def test_serve_serial_names_a_missing_device() -> None:
    with pytest.raises(LinkError, match="/dev/nonexistent-uart"):
        serve_serial(Bridge(chip_sim.make_twin("ideal", 0)), "/dev/nonexistent-uart", stop=threading.Event(),
                     on_ready=lambda _: None)

"""Test doubles for the link tests: a small Controller and echo peers (TCP, pty)."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
import tty
from typing import Any

import numpy as np

from cimlab.firmware_bridge.controller import Controller, Counters, Identity, OpCost
from cimlab.firmware_bridge.errors import DeviceError
from cimlab.firmware_bridge.frame import REPLY_FLAG, Frame, Framer, encode_frame
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.firmware_bridge.registers import BY_ADDR, REGISTERS
from cimlab.firmware_bridge.spec import MacroSpec

SMALL_SPEC = MacroSpec(rows=32, cols=8, rows_per_conversion=8)


class FakeController(Controller):
    """An ideal little macro: exact integer MACs, a register file, no ADC model (MAC_RAW is refused)."""

    def __init__(self, spec: MacroSpec = SMALL_SPEC, chip_id: str = "fake-0") -> None:
        self.spec = spec
        self.chip_id = chip_id
        self.regs = {r.addr: r.reset for r in REGISTERS}
        self.weights = np.zeros((spec.rows, spec.cols), dtype=np.int64)
        self.ops = 0

    def identity(self) -> Identity:
        return Identity(self.chip_id, "fake-fw", "none")

    def reset(self, clear_weights: bool) -> None:
        self.regs = {r.addr: r.reset for r in REGISTERS}
        self.ops = 0
        if clear_weights:
            self.weights[:] = 0

    def read_reg(self, addr: int) -> int:
        if addr not in BY_ADDR:
            raise DeviceError(f"no register 0x{addr:02x}", status=Status.BAD_REGISTER)
        return self.regs[addr]

    def write_reg(self, addr: int, value: int) -> int:
        reg = BY_ADDR.get(addr)
        if reg is None:
            raise DeviceError(f"no register 0x{addr:02x}", status=Status.BAD_REGISTER)
        if reg.access == "ro":
            raise DeviceError(f"{reg.name} is read-only", status=Status.READ_ONLY)
        self.regs[addr] = value
        return value

    def write_weights(self, row_start: int, weights: np.ndarray) -> None:
        self.weights[row_start : row_start + len(weights)] = weights

    def read_weights(self, row_start: int, n_rows: int) -> np.ndarray:
        return self.weights[row_start : row_start + n_rows].copy()

    def mac(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        self.ops += len(inputs)
        w = self.weights[row_start : row_start + inputs.shape[1]]
        return (inputs.astype(np.int64) @ w).astype(np.int32), OpCost(cycles=len(inputs), energy_fj=0)

    def mac_raw(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        raise DeviceError("the fake controller has no ADC model", status=Status.BAD_ARGUMENT)

    def counters(self) -> Counters:
        return Counters(False, 0, self.ops, self.ops, 0, 0, OpCost(0, 0))


def fake_factory(made: list[tuple[str, int, dict[str, str]]] | None = None):
    """A ``make_controller`` hook that records its arguments and builds FakeControllers."""

    def make(profile: str, seed: int, overrides: dict[str, str], device: str = "cpu") -> Controller:
        if made is not None:
            made.append((profile, seed, dict(overrides)))
        return FakeController()

    return make


# ---- traffic ---------------------------------------------------------------------------------------------
def ping_traffic(total: int, frame_payload: int, seed: int = 0) -> tuple[bytes, bytes, list[bytes]]:
    """PING request frames carrying about ``total`` payload bytes: (request bytes, reply bytes, payloads)."""
    rng = np.random.default_rng(seed)
    requests, replies, payloads = [], [], []
    seq = 0
    left = total
    while left > 0:
        n = min(frame_payload, left)
        payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        requests.append(encode_frame(Opcode.PING, seq, payload))
        replies.append(encode_frame(Opcode.PING | REPLY_FLAG, seq, payload, status=int(Status.OK)))
        payloads.append(payload)
        seq += 1
        left -= n
    return b"".join(requests), b"".join(replies), payloads


def read_exactly(link: Any, n: int, timeout: float, chunk: int = 65536) -> bytes:
    """Read until ``n`` bytes arrived or ``timeout`` passed (then return what came)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        out += link.read(min(chunk, n - len(out)), min(left, 0.5))
    return bytes(out)


def frames_in(data: bytes, max_payload: int = 1 << 20) -> list[Frame]:
    """Every good frame in ``data``."""
    return [ev for ev in Framer(max_payload).feed(data) if isinstance(ev, Frame)]


def open_fds() -> set[str]:
    """This process's open file descriptors with their targets."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue
    return out


def fds_settle_to(expected: set[str], within: float = 2.0) -> set[str]:
    """Open fds once they equal ``expected`` or ``within`` seconds passed (peers close their ends in a thread)."""
    deadline = time.monotonic() + within
    while True:
        now = open_fds()
        if now == expected or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


# ---- echo peers ------------------------------------------------------------------------------------------
class _EchoThread:
    """Echo bytes from a file descriptor back to it, until stopped."""

    def __init__(self, fd: int, *, echo: bool = True) -> None:
        self.fd = fd
        self.echo = echo
        self.stop = threading.Event()
        self.received = 0
        self.thread = threading.Thread(target=self._run, name="echo", daemon=True)

    def _run(self) -> None:
        pending = bytearray()
        while not self.stop.is_set():
            want_read = self.echo or not pending
            r, w, _ = select.select([self.fd] if want_read else [], [self.fd] if pending else [], [], 0.05)
            try:
                if r:
                    data = os.read(self.fd, 65536)
                    if not data:
                        return
                    self.received += len(data)
                    if self.echo:
                        pending += data
                if w and pending:
                    n = os.write(self.fd, pending)
                    del pending[:n]
            except OSError as err:
                if err.errno == errno.EIO:  # pty: no slave open right now
                    time.sleep(0.01)
                    continue
                return


class EchoTcpServer:
    """A TCP server on 127.0.0.1 (port 0) echoing one connection at a time; ``close`` releases everything.

    ``echo=False`` makes it read nothing at all (to test write deadlines).
    """

    def __init__(self, *, echo: bool = True, rcvbuf: int | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        if rcvbuf is not None:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.port = self.listener.getsockname()[1]
        self.echo = echo
        self.stop = threading.Event()
        self._drop = threading.Event()
        self._dropped = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, name="echo-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn: socket.socket | None = None
        pending = bytearray()
        while not self.stop.is_set():
            if conn is not None and self._drop.is_set():
                conn.close()
                conn = None
            if self._drop.is_set():
                self._dropped.set()
            if conn is None:
                if self._drop.is_set():
                    time.sleep(0.02)
                    continue
                r, _, _ = select.select([self.listener], [], [], 0.05)
                if r:
                    conn, _ = self.listener.accept()
                    self.conns.append(conn)
                    pending.clear()
                continue
            if not self.echo:
                time.sleep(0.02)
                continue
            r, w, _ = select.select([conn], [conn] if pending else [], [], 0.05)
            try:
                if r:
                    data = conn.recv(65536)
                    if not data:
                        conn.close()
                        conn = None
                        continue
                    pending += data
                if w and pending:
                    del pending[: conn.send(pending)]
            except OSError:
                conn.close()
                conn = None

    def drop_clients(self) -> None:
        """Close the connection being served (the client then sees EOF); accept no more."""
        self._drop.set()
        assert self._dropped.wait(5), "echo server did not drop its client"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.listener.close()


class EchoPty:
    """A pty whose master side echoes (or swallows, ``echo=False``) everything; ``path`` is the slave."""

    def __init__(self, *, echo: bool = True) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.echo = _EchoThread(self.master, echo=echo)
        self.echo.thread.start()

    def hang_up(self) -> None:
        """Stop echoing and close the master side (readers of the slave then see EIO)."""
        self.echo.stop.set()
        self.echo.thread.join(5)
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def close(self) -> None:
        self.hang_up()
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

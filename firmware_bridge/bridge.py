"""The device-side bridge: byte stream in, frames decoded, requests validated and dispatched, replies out.

``Bridge.receive(bytes) -> [reply frame bytes]`` is the whole contract; ``cimlab.firmware_bridge.serve`` puts it on a
file descriptor (pty, socket, UART) and the host's ``sim://`` link calls it in-process. It survives any byte
sequence:

- garbage is skipped by the framer; a frame whose header is valid but whose payload CRC fails, or whose length
  is over the cap, is answered with BAD_CRC / TOO_LARGE for its ``seq`` (so the host resends at once);
- a request for another protocol version gets BAD_VERSION, an unknown opcode UNKNOWN_OPCODE, a payload that
  does not parse BAD_PAYLOAD, arguments out of range BAD_ARGUMENT: each validated *before* the controller
  is called, so the device state is unchanged and the connection stays usable;
- the last ``replay_depth`` replies are remembered by ``(seq, request CRC)``: a retried request is answered
  again from memory, not executed twice. RESET and HELLO (a new session) clear the memory. A reply with a
  retryable status (BUSY: the request did not execute) is not remembered, so its retry executes;
- requests execute in ``seq`` order, exactly once. A request that arrives ahead of a missing one (lost or damaged
  on the way, with several in flight) is held, and the device answers MISSING for the gap once, so the host resends
  it at once; the held requests then execute in order (a further gap gets its own MISSING). This keeps results
  independent of link faults (a noisy macro's draws follow execution order). A hold gives up ``hold_s`` after it
  began or after the last byte arrived, whichever is later, and the held requests execute. A request up to the
  window behind the order (a straggler resent after its hold gave up) executes at once and leaves the order where
  it is. HELLO starts a session: it executes at once and the order restarts after it; so does any request
  farther away (a new host). A restart gives up
  the hold first: held requests that precede it execute before it, in order, never inside the new order. A request
  refused BUSY keeps its place (the ones after it wait for its retry); one refused TOO_LARGE or BAD_VERSION is
  answered for good, and the order moves past it.

Time-based duties (the inter-frame timeout, expiring holds) happen in ``poll(now)``; a serving loop calls it when
``wake_at()`` comes.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.controller import Controller
from cimlab.firmware_bridge.errors import CimError, DeviceError, PayloadError
from cimlab.firmware_bridge.frame import DEFAULT_MAX_PAYLOAD, PROTOCOL_VERSION, REPLY_FLAG, BadFrame, Framer, encode_frame
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.firmware_bridge.registers import ERR_BAD_FRAME, ERR_BAD_REQUEST, REGMAP_VERSION

log = logging.getLogger(__name__)

IDLE_S = 0.05
"""Inter-frame timeout, seconds: a partial frame with no byte for this long is abandoned."""
HOLD_S = 2.0
"""Seconds a request waits for a missing earlier one before it executes anyway."""
REORDER_WINDOW = 64
"""How far ahead of the next expected seq a request is held rather than taken as a new order."""

_CONTROLLER_FAULTS = (
    CimError, ArithmeticError, LookupError, ValueError, TypeError, AttributeError, RuntimeError, MemoryError
)
"""What a faulty controller may raise (NotImplementedError included): answered INTERNAL, the device serves on."""


@dataclass
class BridgeStats:
    """What the bridge has done since it was made."""

    requests: int = 0
    replays: int = 0
    error_replies: int = 0
    dropped: int = 0
    held: int = 0
    holds_expired: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict for reports."""
        return dict(self.__dict__)


class Bridge:
    """Decode requests, dispatch them to a Controller, encode replies.

    Args:
        controller: what executes the requests.
        max_payload: largest payload accepted and sent, bytes (reported in HELLO).
        replay_depth: replies remembered for retried requests.
        idle_s: inter-frame timeout, seconds.
        hold_s: how long requests held behind a missing one wait before executing, seconds.
    """

    def __init__(
        self,
        controller: Controller,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        replay_depth: int = 64,
        idle_s: float = IDLE_S,
        hold_s: float = HOLD_S,
    ) -> None:
        self.controller = controller
        self.max_payload = max_payload
        self.framer = Framer(max_payload)
        self.stats = BridgeStats()
        self.idle_s = idle_s
        self.hold_s = hold_s
        self._replay: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._replay_depth = replay_depth
        self._last_rx = time.monotonic()
        self._next: int | None = None
        self._held: dict[int, tuple[int, bytes]] = {}
        self._hold_since = 0.0
        self._nacked: int | None = None

    def receive(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Feed received bytes; return the reply frames to send, in order."""
        out: list[bytes] = []
        if data:
            self._last_rx = time.monotonic()
        for ev in self.framer.feed(data):
            if isinstance(ev, BadFrame):
                self.controller.note_error(ERR_BAD_FRAME)
                if ev.opcode & REPLY_FLAG:
                    self.stats.dropped += 1
                    continue
                status = Status.BAD_CRC if ev.reason == "crc" else Status.TOO_LARGE
                text = f"{ev.reason}: {ev.length}-byte payload (cap {self.max_payload})"
                out.append(self._error(ev.opcode, ev.seq, status, text))
                if status not in m.RETRYABLE_STATUS:
                    out += self._refused(ev.seq)
                continue
            if ev.is_reply:
                self.stats.dropped += 1  # a device never acts on replies (e.g. our own echo on a loop)
                continue
            if ev.version != PROTOCOL_VERSION:
                text = f"protocol version {ev.version} is not {PROTOCOL_VERSION}"
                out.append(self._error(ev.opcode, ev.seq, Status.BAD_VERSION, text))
                out += self._refused(ev.seq)
                continue
            out += self._accept(ev.opcode, ev.seq, ev.payload)
        return out

    def _accept(self, opcode: int, seq: int, payload: bytes) -> list[bytes]:
        """Execute a request in seq order, hold it behind a missing one, or answer it from the replay cache."""
        cached = None if opcode == Opcode.HELLO else self._replay.get((seq, zlib.crc32(payload, opcode)))
        if cached is not None:  # HELLO always runs: it starts a session, even when a host reuses seqs
            self.stats.replays += 1
            return [cached]
        ahead = None if self._next is None else (seq - self._next) & 0xFFFF
        if ahead and opcode != Opcode.HELLO and 0x10000 - ahead <= REORDER_WINDOW:
            # a straggler just behind the order (resent after its hold gave up, or after a BUSY): it runs now and
            # the order stays where it is, so the requests after it are not held for a gap that will not fill
            return [self._execute(opcode, seq, payload)[0]]
        if ahead is None or ahead == 0 or opcode == Opcode.HELLO or ahead >= REORDER_WINDOW:
            # a new order gives up waiting: what is held ahead of the old one and before this seq executes first
            out = self._give_up(ahead) if ahead else []
            out.append(self._in_order(opcode, seq, payload))
            return out + self._drain()
        if seq not in self._held:
            self.stats.held += 1
            if not self._held:
                self._hold_since = time.monotonic()
            self._held[seq] = (opcode, payload)
        if self._nacked == self._next:
            return []
        return [self._nack()]

    def _in_order(self, opcode: int, seq: int, payload: bytes) -> bytes:
        """Execute the request the order is at; the order moves past it unless it did not execute (BUSY)."""
        reply, executed = self._execute(opcode, seq, payload)
        if executed:
            self._set_next((seq + 1) & 0xFFFF)
        else:  # its retry comes next, and the retryable reply has already asked for it
            self._next, self._nacked = seq, seq
        return reply

    def _set_next(self, seq: int) -> None:
        self._next, self._nacked = seq, None

    def _nack(self) -> bytes:
        """MISSING for the next expected seq, which held requests wait for."""
        assert self._next is not None
        self._nacked = self._next
        text = f"request seq {self._next} has not arrived; {len(self._held)} later request(s) wait for it"
        return self._error(0, self._next, Status.MISSING, text)

    def _refused(self, seq: int) -> list[bytes]:
        """A final refusal before execution (TOO_LARGE, BAD_VERSION) answers ``seq``: the order moves past it."""
        if seq != self._next:
            return []
        self._set_next((seq + 1) & 0xFFFF)
        return self._drain()

    def _give_up(self, limit: int) -> list[bytes]:
        """Execute, in order, the held requests fewer than ``limit`` seqs ahead of the next expected one."""
        nxt = self._next
        assert nxt is not None
        out = []
        for seq in sorted(self._held, key=lambda s: (s - nxt) & 0xFFFF):
            if (seq - nxt) & 0xFFFF >= limit:
                break
            opcode, payload = self._held.pop(seq)
            out.append(self._execute(opcode, seq, payload)[0])
        if out:
            self.stats.holds_expired += 1
        return out

    def _drain(self) -> list[bytes]:
        out = []
        while self._next in self._held:
            seq = self._next
            opcode, payload = self._held.pop(seq)
            out.append(self._in_order(opcode, seq, payload))
            if self._next == seq:
                break  # BUSY: it did not execute; the requests after it wait for its retry
        if self._held:
            self._hold_since = time.monotonic()
            if self._nacked != self._next:  # another gap: what is behind it waits, and the host is told at once
                out.append(self._nack())
        return out

    def _execute(self, opcode: int, seq: int, payload: bytes) -> tuple[bytes, bool]:
        """Dispatch one request; returns its reply and whether it executed (False: a retryable refusal)."""
        self.stats.requests += 1
        status, reply = self._dispatch(opcode, seq, payload)
        if opcode in (Opcode.RESET, Opcode.HELLO):  # a new session: nothing before it may be answered from memory
            self._replay.clear()
        if status not in m.RETRYABLE_STATUS:
            self._replay[(seq, zlib.crc32(payload, opcode))] = reply
            if len(self._replay) > self._replay_depth:
                self._replay.popitem(last=False)
        return reply, status not in m.RETRYABLE_STATUS

    def wake_at(self) -> float | None:
        """Monotonic time at which ``poll`` next has something to do (None: nothing pending)."""
        times = []
        if self.framer.pending:
            times.append(self._last_rx + self.idle_s)
        if self._held:
            times.append(self._hold_expiry())
        return min(times) if times else None

    def _hold_expiry(self) -> float:
        # a hold lasts hold_s past its start or the last byte received, whichever is later: on a slow line the
        # missing request may still be on its way
        return max(self._hold_since, self._last_rx) + self.hold_s

    def poll(self, now: float | None = None) -> list[bytes]:
        """Do the time-based duties that are due; return reply frames to send.

        A partial frame with no byte for ``idle_s`` is abandoned (requests behind it are decoded); requests held
        for ``hold_s`` behind a missing one give up waiting and execute in order.
        """
        now = time.monotonic() if now is None else now
        out: list[bytes] = []
        if self.framer.pending and now >= self._last_rx + self.idle_s:  # the same sums as wake_at
            while self.framer.pending:
                out += self.idle()
        if self._held and now >= self._hold_expiry():
            self.stats.holds_expired += 1
            assert self._next is not None
            self._set_next(min(self._held, key=lambda s: (s - self._next) & 0xFFFF))  # type: ignore[operator]
            out += self._drain()
        return out

    def idle(self) -> list[bytes]:
        """Inter-frame timeout: abandon a partial frame so a truncated request cannot wedge the link.

        Complete requests that were held behind the abandoned bytes are decoded now; returns their replies,
        to be sent like those of ``receive``.
        """
        if not self.framer.drop_partial():
            return []
        return self.receive(b"")

    # ---- dispatch ---------------------------------------------------------------------------------------
    def _error(self, opcode: int, seq: int, status: Status, text: str) -> bytes:
        self.stats.error_replies += 1
        payload = text.encode("utf-8", "replace")[: min(1024, self.max_payload)]
        return encode_frame((opcode | REPLY_FLAG) & 0xFF, seq, payload, status=int(status))

    def _dispatch(self, opcode: int, seq: int, payload: bytes) -> tuple[Status, bytes]:
        """Execute one request; returns the reply's status and the reply frame."""
        try:
            op = Opcode(opcode)
        except ValueError:
            self.controller.note_error(ERR_BAD_REQUEST)
            status = Status.UNKNOWN_OPCODE
            return status, self._error(opcode, seq, status, f"unknown opcode 0x{opcode:02x}")
        try:
            req = m.parse_request(op, payload)
            body = getattr(self, f"_do_{op.name.lower()}")(req)
        except PayloadError as err:
            self.controller.note_error(ERR_BAD_REQUEST)
            return Status.BAD_PAYLOAD, self._error(op, seq, Status.BAD_PAYLOAD, str(err))
        except DeviceError as err:
            self.controller.note_error(ERR_BAD_REQUEST)
            status = err.status if isinstance(err.status, Status) else Status.INTERNAL
            return status, self._error(op, seq, status, str(err))
        except _CONTROLLER_FAULTS as err:
            # A controller bug must not take the device down: report it and keep serving.
            log.exception("controller failed on %s", op.name)
            status = Status.INTERNAL
            return status, self._error(op, seq, status, f"{type(err).__name__}: {err}")
        if len(body) > self.max_payload:
            status = Status.TOO_LARGE
            return status, self._error(op, seq, status, f"reply of {len(body)} bytes exceeds {self.max_payload}")
        return Status.OK, encode_frame(op | REPLY_FLAG, seq, body, status=int(Status.OK))

    @property
    def spec(self) -> m.MacroSpec:
        """The controller's MacroSpec."""
        return self.controller.spec

    def _rows(self, row_start: int, n_rows: int) -> None:
        rows = self.spec.rows
        if n_rows < 1 or row_start + n_rows > rows:
            raise DeviceError(
                f"rows {row_start}..{row_start + n_rows - 1} are outside the array (0..{rows - 1})",
                status=Status.BAD_ARGUMENT,
            )

    def _array(self, data: bytes, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
        expected = int(np.prod(shape)) * dtype.itemsize
        if len(data) != expected:
            raise DeviceError(
                f"{what}: {len(data)} bytes, expected {expected} for shape {shape} {dtype}",
                status=Status.BAD_ARGUMENT,
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def _do_hello(self, req: object) -> bytes:
        ident = self.controller.identity()
        return m.build_reply(
            Opcode.HELLO,
            protocol_version=PROTOCOL_VERSION,
            max_payload=self.max_payload,
            regmap_version=REGMAP_VERSION,
            chip_id=ident.chip_id,
            firmware_id=ident.firmware_id,
            bitstream_id=ident.bitstream_id,
            spec=m.spec_to_wire(self.spec),
        )

    def _do_ping(self, req: bytes) -> bytes:
        return req

    def _do_reset(self, req: object) -> bytes:
        self.controller.reset(clear_weights=bool(req.flags & 1))  # type: ignore[attr-defined]
        return b""

    def _do_status(self, req: object) -> bytes:
        c = self.controller.counters()
        return m.build_reply(
            Opcode.STATUS,
            busy=int(c.busy),
            error_flags=c.error_flags,
            cycles=c.cycles,
            ops=c.ops,
            conversions=c.conversions,
            energy_fj=c.energy_fj,
            last=dict(cycles=c.last.cycles, energy_fj=c.last.energy_fj),
        )

    def _do_read_reg(self, req: object) -> bytes:
        addr = req.addr  # type: ignore[attr-defined]
        return m.build_reply(Opcode.READ_REG, addr=addr, value=self.controller.read_reg(addr))

    def _do_write_reg(self, req: object) -> bytes:
        addr, value = req.addr, req.value  # type: ignore[attr-defined]
        return m.build_reply(Opcode.WRITE_REG, addr=addr, value=self.controller.write_reg(addr, value))

    def _do_write_weights(self, req: object) -> bytes:
        spec = self.spec
        row_start, n_rows = req.row_start, req.n_rows  # type: ignore[attr-defined]
        self._rows(row_start, n_rows)
        w = self._array(req.data, spec.weight_dtype, (n_rows, spec.cols), "weights")  # type: ignore[attr-defined]
        lo, hi = int(w.min()), int(w.max())
        if lo < spec.weight_min or hi > spec.weight_max:
            raise DeviceError(
                f"weights span {lo}..{hi}, outside {spec.weight_min}..{spec.weight_max}",
                status=Status.BAD_ARGUMENT,
            )
        self.controller.write_weights(row_start, w.astype(np.int64))
        stored = self.controller.read_weights(row_start, n_rows).astype(spec.weight_dtype)
        crc = zlib.crc32(stored.tobytes())
        return m.build_reply(Opcode.WRITE_WEIGHTS, row_start=row_start, n_rows=n_rows, crc=crc)

    def _do_read_weights(self, req: object) -> bytes:
        spec = self.spec
        row_start, n_rows = req.row_start, req.n_rows  # type: ignore[attr-defined]
        self._rows(row_start, n_rows)
        w = self.controller.read_weights(row_start, n_rows).astype(spec.weight_dtype)
        return m.build_reply(Opcode.READ_WEIGHTS, row_start=row_start, n_rows=n_rows, data=w.tobytes())

    def _mac_inputs(self, req: object) -> tuple[int, np.ndarray]:
        spec = self.spec
        row_start, n_rows, batch = req.row_start, req.n_rows, req.batch  # type: ignore[attr-defined]
        self._rows(row_start, n_rows)
        if batch < 1:
            raise DeviceError("MAC batch must be at least 1", status=Status.BAD_ARGUMENT)
        x = self._array(req.data, spec.input_dtype, (batch, n_rows), "inputs")  # type: ignore[attr-defined]
        if int(x.max()) > spec.input_max:
            raise DeviceError(
                f"input code {int(x.max())} exceeds {spec.input_max} ({spec.input_bits}-bit inputs)",
                status=Status.BAD_ARGUMENT,
            )
        return row_start, x

    def _do_mac(self, req: object) -> bytes:
        row_start, x = self._mac_inputs(req)
        self._reply_fits(x.shape[0] * self.spec.cols * 4)
        y, cost = self.controller.mac(row_start, x)
        data = np.ascontiguousarray(y, dtype=self.spec.output_dtype).tobytes()
        return m.build_reply(Opcode.MAC, batch=x.shape[0], cost=_cost(cost), data=data)

    def _do_mac_raw(self, req: object) -> bytes:
        row_start, x = self._mac_inputs(req)
        spec = self.spec
        shape = (x.shape[0], *spec.raw_shape_for(row_start, x.shape[1]))
        self._reply_fits(int(np.prod(shape)) * spec.code_dtype.itemsize)
        codes, cost = self.controller.mac_raw(row_start, x)
        if codes.shape != shape:
            raise DeviceError(f"controller returned codes of shape {codes.shape}, not {shape}", status=Status.INTERNAL)
        data = np.ascontiguousarray(codes, dtype=spec.code_dtype).tobytes()
        return m.build_reply(Opcode.MAC_RAW, batch=x.shape[0], cost=_cost(cost), data=data)

    def _reply_fits(self, data_bytes: int) -> None:
        if data_bytes + m.MAC_REPLY_FIXED > self.max_payload:
            raise DeviceError(
                f"reply of {data_bytes + m.MAC_REPLY_FIXED} bytes would exceed max_payload {self.max_payload};"
                " send a smaller batch",
                status=Status.TOO_LARGE,
            )


def _cost(cost: object) -> dict[str, int]:
    return dict(cycles=int(cost.cycles), energy_fj=int(cost.energy_fj))  # type: ignore[attr-defined]

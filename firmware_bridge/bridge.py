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
  again from memory, not executed twice. RESET and HELLO clear the memory. A reply with a retryable status (BUSY:
  the controller was occupied and the request did not execute) is not remembered, so its retry executes;
- requests execute in ``seq`` order, exactly once. A request that arrives ahead of a missing one (lost or damaged
  on the way, with several in flight) is held, and the device answers MISSING for the gap once (or BAD_CRC, when
  the missing request arrived damaged: one answer per loss), so the host resends it at once; the held requests then
  execute in order (a further gap gets its own answer). This keeps results independent of link faults (a noisy
  macro's draws follow execution order). A hold gives up ``hold_s`` after it began or after the last byte arrived,
  whichever is later, and the held requests execute. A request up to the window behind the order (a straggler
  resent after its hold gave up) executes at once and leaves the order where it is. HELLO executes at once and the
  order restarts after it; so does any request farther away (a new host). A restart gives up the hold first: held
  requests that precede it execute before it, in order, never inside the new order. A request refused BUSY keeps
  its place (the ones after it wait for its retry); one refused TOO_LARGE or BAD_VERSION is answered for good, and
  the order moves past it.

Sessions: a serving loop calls ``new_session(token)`` when a host connects. The session's largest payload is what
the device accepts until a HELLO states the host's, then the smaller of the two. With a token, every request but
HELLO is refused DENIED until a HELLO carries the token (compared in constant time); a wrong token is DENIED too.

Time-based duties (the inter-frame timeout, expiring holds) happen in ``poll(now)``; a serving loop calls it when
``wake_at()`` comes.
"""

from __future__ import annotations

import hmac
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.controller import Controller
from cimlab.firmware_bridge.errors import CimError, DeviceError, PayloadError
from cimlab.firmware_bridge.frame import (
    DEFAULT_MAX_PAYLOAD,
    PROTOCOL_VERSION,
    REPLY_FLAG,
    BadFrame,
    Framer,
    encode_frame,
)
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.firmware_bridge.packing import code_field, output_field
from cimlab.firmware_bridge.registers import ERR_BAD_FRAME, ERR_BAD_REQUEST, REGMAP_VERSION
from cimlab.firmware_bridge.spec import MacroSpec

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
        max_payload: largest payload the device accepts and sends, bytes (reported in HELLO).
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
        self._token: bytes | None = None
        self.authenticated = True
        """False while a token is required and no HELLO has carried it."""
        self.session_cap = max_payload
        """Largest payload of this session: ``max_payload``, or the host's when its HELLO stated less (bytes)."""
        self._handlers: dict[Opcode, Callable[[Any], m.Message]] = {
            Opcode.HELLO: self._hello, Opcode.PING: self._ping, Opcode.RESET: self._reset,
            Opcode.STATUS: self._status, Opcode.READ_REG: self._read_reg, Opcode.WRITE_REG: self._write_reg,
            Opcode.WRITE_WEIGHTS: self._write_weights, Opcode.READ_WEIGHTS: self._read_weights,
            Opcode.MAC: self._mac, Opcode.MAC_RAW: self._mac_raw,
        }

    def new_session(self, token: bytes | None = None) -> None:
        """A host connected: forget the last one's bytes, order and replies; require ``token`` at HELLO if given.

        The controller's state (weights, registers, counters) is kept, as a board's is.
        """
        self.framer.reset()
        self._replay.clear()
        self._held.clear()
        self._next = self._nacked = None
        self._token = token
        self.authenticated = token is None
        self.session_cap = self.max_payload

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
                out += self._bad_request(ev)
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

    def _bad_request(self, ev: BadFrame) -> list[bytes]:
        """BAD_CRC (send it again) or TOO_LARGE (for good) for a damaged or oversize request."""
        status = Status.BAD_CRC if ev.reason == "crc" else Status.TOO_LARGE
        reply = self._error(ev.opcode, ev.seq, status, f"{ev.reason}: {ev.length}-byte payload (cap {self.max_payload})")
        if status == Status.TOO_LARGE:
            return [reply, *self._refused(ev.seq)]
        if ev.seq == self._next:
            self._nacked = ev.seq  # the host now knows it is missing: no MISSING for the same loss
        return [reply]

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
            nxt = self._next
            assert nxt is not None
            self._set_next(min(self._held, key=lambda s: (s - nxt) & 0xFFFF))
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
        payload = text.encode("utf-8", "replace")[: min(1024, self.session_cap)]
        return encode_frame((opcode | REPLY_FLAG) & 0xFF, seq, payload, status=int(status))

    def _dispatch(self, opcode: int, seq: int, payload: bytes) -> tuple[Status, bytes]:
        """Execute one request; returns the reply's status and the reply frame."""
        try:
            op = Opcode(opcode)
        except ValueError:
            op = None
        try:
            self._check_session(op)
            if op is None:
                raise DeviceError(f"unknown opcode 0x{opcode:02x}", status=Status.UNKNOWN_OPCODE)
            reply = self._handlers[op](m.decode_request(op, payload))
            body = reply.encode()
        except PayloadError as err:
            return self._refusal(opcode, seq, Status.BAD_PAYLOAD, str(err))
        except DeviceError as err:
            status = err.status if isinstance(err.status, Status) else Status.INTERNAL
            return self._refusal(opcode, seq, status, str(err))
        except _CONTROLLER_FAULTS as err:
            # A controller bug must not take the device down: report it and keep serving.
            log.exception("controller failed on %s", m.opcode_name(opcode))
            return self._refusal(opcode, seq, Status.INTERNAL, f"{type(err).__name__}: {err}")
        if len(body) > self.session_cap:
            text = f"reply of {len(body)} bytes exceeds the session's max_payload {self.session_cap}"
            return self._refusal(opcode, seq, Status.TOO_LARGE, text)
        return Status.OK, encode_frame(opcode | REPLY_FLAG, seq, body, status=int(Status.OK))

    def _refusal(self, opcode: int, seq: int, status: Status, text: str) -> tuple[Status, bytes]:
        if status not in (Status.DENIED, Status.BUSY, Status.INTERNAL):
            self.controller.note_error(ERR_BAD_REQUEST)
        return status, self._error(opcode, seq, status, text)

    def _check_session(self, op: Opcode | None) -> None:
        if op != Opcode.HELLO and not self.authenticated:
            raise DeviceError("this device needs a token: send HELLO with it first", status=Status.DENIED)

    @property
    def spec(self) -> MacroSpec:
        """The controller's MacroSpec."""
        return self.controller.spec

    def _check_rows(self, row_start: int, n_rows: int) -> None:
        rows = self.spec.rows
        if n_rows < 1 or row_start + n_rows > rows:
            raise DeviceError(
                f"rows {row_start}..{row_start + n_rows - 1} are outside the array (0..{rows - 1})",
                status=Status.BAD_ARGUMENT,
            )

    def _hello(self, req: m.Hello) -> m.Identity:
        if req.max_payload < m.MIN_PAYLOAD:
            raise DeviceError(f"HELLO states max_payload {req.max_payload}, below the least {m.MIN_PAYLOAD}",
                              status=Status.BAD_ARGUMENT)
        if self._token is not None and not hmac.compare_digest(req.token, self._token):
            self.authenticated = False
            raise DeviceError("HELLO carries a wrong token (or none); the device refuses this host",
                              status=Status.DENIED)
        self.authenticated = True
        self.session_cap = min(self.max_payload, req.max_payload)
        ident = self.controller.identity()
        return m.Identity(
            protocol_version=PROTOCOL_VERSION, max_payload=self.max_payload, regmap_version=REGMAP_VERSION,
            chip_id=ident.chip_id, firmware_id=ident.firmware_id, bitstream_id=ident.bitstream_id, spec=self.spec,
        )

    def _ping(self, req: m.Echo) -> m.Echo:
        return req

    def _reset(self, req: m.Reset) -> m.Empty:
        self.controller.reset(clear_weights=req.clear_weights)
        return m.Empty()

    def _status(self, req: m.Empty) -> m.StatusReport:
        return m.StatusReport(self.controller.counters())

    def _read_reg(self, req: m.RegAddr) -> m.RegValue:
        return m.RegValue(req.addr, self.controller.read_reg(req.addr))

    def _write_reg(self, req: m.RegValue) -> m.RegValue:
        return m.RegValue(req.addr, self.controller.write_reg(req.addr, req.value))

    def _write_weights(self, req: m.WeightRows) -> m.WeightsStored:
        spec = self.spec
        self._check_rows(req.row_start, req.n_rows)
        w = req.weights(spec)
        self.controller.write_weights(req.row_start, w)
        return m.WeightsStored.of(spec, req.row_start, self.controller.read_weights(req.row_start, req.n_rows))

    def _read_weights(self, req: m.RowRange) -> m.WeightRows:
        self._check_rows(req.row_start, req.n_rows)
        return m.WeightRows.of(self.spec, req.row_start, self.controller.read_weights(req.row_start, req.n_rows))

    def _mac_inputs(self, req: m.MacInputs, reply_bytes: int) -> np.ndarray:
        """The request's inputs, once its rows are valid and its reply of ``reply_bytes`` data fits the session."""
        self._check_rows(req.row_start, req.n_rows)
        if req.batch < 1:
            raise DeviceError("MAC batch must be at least 1", status=Status.BAD_ARGUMENT)
        if reply_bytes + m.MAC_REPLY_FIXED > self.session_cap:
            raise DeviceError(
                f"reply of {reply_bytes + m.MAC_REPLY_FIXED} bytes would exceed the session's max_payload"
                f" {self.session_cap}; send a smaller batch", status=Status.TOO_LARGE,
            )
        return req.inputs(self.spec)  # packed at input_bits: every code is in range

    def _mac(self, req: m.MacInputs) -> m.MacResult:
        spec = self.spec
        out = output_field(spec, req.row_start, req.n_rows)
        x = self._mac_inputs(req, out.nbytes(req.batch * spec.cols))
        y, cost = self.controller.mac(req.row_start, x)
        return m.MacResult.of_outputs(spec, req, np.asarray(y), cost)

    def _mac_raw(self, req: m.MacInputs) -> m.MacResult:
        spec = self.spec
        shape = (req.batch, *spec.raw_shape_for(req.row_start, req.n_rows))
        x = self._mac_inputs(req, code_field(spec).nbytes(int(np.prod(shape))))
        codes, cost = self.controller.mac_raw(req.row_start, x)
        if codes.shape != shape:
            raise DeviceError(f"controller returned codes of shape {codes.shape}, not {shape}", status=Status.INTERNAL)
        return m.MacResult.of_codes(spec, req, codes, cost)

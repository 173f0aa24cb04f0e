"""The driver: ``Chip`` turns calls into frames on a link, and replies into numpy arrays.

It never asks what is at the other end of the link: a board and the twin answer the same bytes.

Transactions (the transaction layer of pymodbus, in spirit):

- every request gets a fresh ``seq``; bulk calls keep up to ``window`` frames in flight, so the line rate, not
  round trips, sets the pace; a reply is matched by ``seq``, stale or duplicate replies are counted and ignored;
- the device executes requests in seq order, exactly once, and answers in that order; a retried request is
  answered from its memory of recent replies. So a loss is repaired by sending the lost request again, once per
  loss event, at once (a *fast retransmit*): when the device reports the seq MISSING or its frame damaged
  (BAD_CRC), when a damaged reply names it, when its reply stops arriving halfway (``GAP_S`` without a byte: a
  lost chunk), or when a reply arrives for a request sent after this one's latest transmission and later in seq
  order (its own reply was lost). Fast retransmits do not spend the retry budget;
- a request whose reply shows no sign of coming is resent after the resend interval (``timeout`` seconds) plus what
  the requests ahead of it need at the device's pace and the line rate. ``retries`` bounds these timeouts per
  request. Each pending request has its own resend time: a loss never pushes another request's time back;
- the device's pace (seconds between consecutive replies while requests wait) is learned from replies only: from
  replies to requests sent once, never across a timeout, so a loss in one call does not slow the next. As in TCP
  (Karn's algorithm), each round of timeouts doubles the resend interval (at most x8, and never past half the time
  left to the call's deadline) until a reply to a request no timer resent shows the device is keeping up, which
  restores it: a device slower than ``timeout`` is waited for rather than flooded with resends;
- every call has a deadline that bounds the whole call whatever arrives (``deadline`` seconds, or by default
  ``DEADLINE_BASE_S`` plus twice the time its bytes need at the line rate); past it, ``CimTimeoutError`` says what
  was outstanding and shows the last frames on the wire;
- a request or reply larger than the payload both ends agreed at HELLO is split: by batch, then by row group. Bulk
  calls aim at a frame size that adapts to the link: halved at each loss, grown by a sixteenth at each reply to a
  request sent once (never below ``MIN_FRAME_BYTES`` nor above the agreed payload), so a noisy line, on which a
  long frame rarely arrives whole, carries shorter ones;
- non-OK statuses raise ``DeviceError`` with the device's message (BUSY is retried after ``timeout`` unless it
  refuses the connection itself); a peer speaking another protocol version raises ``VersionMismatch``.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.controller import Counters, OpCost
from cimlab.firmware_bridge.errors import (
    CimTimeoutError,
    ConfigError,
    DeviceError,
    PayloadError,
    ProtocolError,
    ShapeError,
    VersionMismatch,
)
from cimlab.firmware_bridge.frame import (
    MAX_PAYLOAD_LIMIT,
    OVERHEAD,
    PROTOCOL_VERSION,
    REPLY_FLAG,
    BadFrame,
    Frame,
    Framer,
    encode_frame,
)
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.firmware_bridge.packing import output_field, weight_field
from cimlab.firmware_bridge.registers import REGMAP_VERSION, resolve
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.logs import WireTrace

if TYPE_CHECKING:
    from cimlab.links.base import Link

Hello = m.Identity
"""What the chip says about itself in HELLO."""

READ_CHUNK = 256 * 1024
MIN_FRAME_BYTES = 4096
"""Bulk calls split into frames no smaller than this (bytes) when spreading a call over the window."""
HOST_MAX_PAYLOAD = 1 << 20
"""Largest payload this host accepts unless told otherwise, bytes (the chip's HELLO may state less)."""
DEADLINE_BASE_S = 5.0
"""The default call deadline's fixed part, seconds."""
ASSUMED_RATE = 115200 / 10
"""Bytes/s assumed for the default deadline of a link that does not know its line rate (a 115200-baud UART)."""
GAP_S = 0.1
"""Seconds without a byte after which a partly received reply is taken as cut short (resent at once), at most
``timeout``."""
MAX_BACKOFF = 8.0
"""The resend interval doubles per round of timeouts, up to this factor, until a clean reply restores it."""


@dataclass
class DriverStats:
    """Counters of one Chip's traffic since it was opened.

    ``retries`` counts every resend: ``fast_retransmits`` (a loss the device or a later reply revealed: MISSING,
    BAD_CRC, a damaged reply, a reply overtaking) plus ``timeouts`` (no sign of a reply within the resend time).
    """

    requests: int = 0
    calls: int = 0
    frames_out: int = 0
    frames_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    payload_out: int = 0
    payload_in: int = 0
    retries: int = 0
    fast_retransmits: int = 0
    timeouts: int = 0
    nacks: int = 0
    stale_replies: int = 0
    bad_frames: int = 0
    error_replies: int = 0
    write_stalls: int = 0
    deadline_misses: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict for reports."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class CallTiming:
    """How long the last call took and the deadline it had, seconds."""

    seconds: float
    deadline_s: float


@dataclass(frozen=True)
class _Request:
    message: m.Message
    opcode: Opcode
    reply_bytes: int


@dataclass
class _Pending:
    index: int
    opcode: Opcode
    seq: int
    frame: bytes
    reply_bytes: int
    sends: int = 0
    sent_order: int = 0  # send order of the latest transmission
    sent_at: float = 0.0  # time of the latest transmission
    resend_at: float = 0.0  # resent for lack of any sign of its reply at this time
    timeouts: int = 0


def _before(a: int, b: int) -> bool:
    """Whether seq ``a`` comes before seq ``b`` (16-bit serial numbers)."""
    return 0 < ((b - a) & 0xFFFF) < 0x8000


class Chip:
    """A CIM macro behind a link.

    Args:
        link: an open link (``cimlab.links.open_link``).
        timeout: the resend interval: seconds without a sign of a reply before a request is sent again.
        retries: resends for lack of a reply (timeouts) per request before ``CimTimeoutError``.
        window: frames in flight in bulk calls.
        max_payload: largest payload this host accepts, bytes (stated at HELLO; both ends use the smaller).
        deadline: seconds any one call may take (None: ``DEADLINE_BASE_S`` plus twice its bytes' line time).
        token: what a device that requires a token expects in HELLO (``cimlab sim serve --token-file``).
    """

    def __init__(
        self,
        link: Link,
        *,
        timeout: float = 1.0,
        retries: int = 4,
        window: int = 8,
        max_payload: int = HOST_MAX_PAYLOAD,
        deadline: float | None = None,
        token: bytes | None = None,
    ) -> None:
        if not timeout > 0:
            raise ConfigError(f"timeout must be positive seconds, got {timeout}")
        if retries < 0:
            raise ConfigError(f"retries must be >= 0, got {retries}")
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        if not m.MIN_PAYLOAD <= max_payload <= MAX_PAYLOAD_LIMIT:
            raise ConfigError(f"max_payload must be {m.MIN_PAYLOAD}..{MAX_PAYLOAD_LIMIT} bytes, got {max_payload}")
        if deadline is not None and not (deadline > 0 and math.isfinite(deadline)):
            raise ConfigError(f"deadline must be a positive number of seconds, got {deadline}")
        if token is not None and len(token) > m.MAX_TOKEN:
            raise ConfigError(f"a token has at most {m.MAX_TOKEN} bytes, got {len(token)}")
        self.link = link
        self.timeout = timeout
        self.retries = retries
        self.window = window
        self.max_payload = max_payload
        self.deadline = deadline
        self.token = token
        self.stats = DriverStats()
        self.wire = WireTrace()  # the recent frames, also logged at DEBUG to cimlab.wire
        self.last_cost = OpCost(0, 0)
        self.last_call = CallTiming(0.0, 0.0)
        self._framer = Framer(max_payload)
        self._seq = int.from_bytes(os.urandom(2), "little")
        self._order = 0
        self._hello: Hello | None = None
        self._pace_s = 0.0  # smoothed seconds between replies while requests wait (the device's pace)
        self._last_reply_t: float | None = None  # arrival of the last reply while others were pending
        self._backoff = 1.0  # the resend interval's factor (Karn): x2 per round of timeouts, 1 after a clean reply
        self._frame_target: int | None = None  # bulk frame size aimed at, bytes (None: the agreed payload)

    # ---- life cycle -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, *, timeout: float = 1.0, deadline: float | None = None, **kwargs: Any) -> Chip:
        """Open a link by URL, identify the chip, and return a ready Chip (close it, or use ``with``).

        Connecting takes at most ``min(timeout, deadline)`` seconds, and HELLO at most ``deadline`` seconds (default
        ``DEADLINE_BASE_S``) once the link is open: a link that starts a simulator (``sim://?backend=rtl``) may take
        longer to open without eating the chip's deadline. A dead or silent port raises ``CimTimeoutError`` saying
        what was tried, an unreachable one ``LinkError``.
        """
        from cimlab.links import open_link

        budget = deadline if deadline is not None else DEADLINE_BASE_S
        link = open_link(url, timeout=min(timeout, budget))
        chip = cls(link, timeout=timeout, deadline=deadline, **kwargs)
        try:
            chip.identify(deadline=budget)
        except BaseException:
            chip.close()
            raise
        return chip

    def close(self) -> None:
        """Close the link."""
        self.link.close()

    def __enter__(self) -> Chip:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def hello(self) -> Hello:
        """The chip's HELLO (asked for on first use)."""
        if self._hello is None:
            self.identify()
        assert self._hello is not None
        return self._hello

    @property
    def spec(self) -> MacroSpec:
        """The MacroSpec the chip reported."""
        return self.hello.spec

    @property
    def payload_cap(self) -> int:
        """Largest payload both ends accept, bytes: the smaller of what each stated at HELLO."""
        return min(self.max_payload, self.hello.max_payload)

    @property
    def frame_target(self) -> int:
        """Payload bytes bulk calls aim at per frame: the agreed payload, lowered while the link loses frames."""
        cap = self.payload_cap
        return cap if self._frame_target is None else min(cap, self._frame_target)

    def _frames_lost(self) -> None:
        if self._hello is not None:  # no payload is agreed before HELLO
            self._frame_target = max(MIN_FRAME_BYTES, self.frame_target // 2)

    def _frame_arrived(self) -> None:
        if self._frame_target is not None:
            self._frame_target += max(1, self._frame_target // 16)
            if self._frame_target >= self.payload_cap:
                self._frame_target = None

    # ---- commands ---------------------------------------------------------------------------------------
    def identify(self, *, deadline: float | None = None) -> Hello:
        """HELLO: state this host's payload cap (and token), get identity, limits and MacroSpec.

        Fails loudly on a protocol or register-map mismatch. ``deadline`` (seconds) overrides the call deadline.
        """
        hello = m.Hello(self.max_payload, self.token or b"")
        sent, answered = self.stats.frames_out, self.stats.frames_in
        try:
            r = self._run([_Request(hello, Opcode.HELLO, 512)], deadline)[0]
        except CimTimeoutError as err:
            if self.stats.frames_in > answered:
                raise
            raise CimTimeoutError(
                f"no answer from {self.link.url}: HELLO sent {self.stats.frames_out - sent} times over "
                f"{self.last_call.seconds:.3g} s (resend interval {self.timeout:g} s, retries {self.retries}, call "
                f"deadline {self.last_call.deadline_s:.3g} s); is the device powered and serving there, and is the URL "
                "right?",
                wire=err.wire,
            ) from err
        if r.protocol_version != PROTOCOL_VERSION:
            raise VersionMismatch(f"chip speaks protocol {r.protocol_version}, this host {PROTOCOL_VERSION}")
        if r.regmap_version != REGMAP_VERSION:
            raise VersionMismatch(f"chip has register map v{r.regmap_version}, this host v{REGMAP_VERSION}")
        if r.max_payload < m.MIN_PAYLOAD:
            raise ProtocolError(f"chip accepts only {r.max_payload}-byte payloads (the least is {m.MIN_PAYLOAD})")
        self._hello = r
        return r

    def ping(self, payload: bytes = b"") -> float:
        """Echo ``payload``; return the round trip in seconds. A wrong echo raises PayloadError."""
        if len(payload) > self.payload_cap:
            raise ConfigError(f"ping payload of {len(payload)} bytes exceeds {self.payload_cap}")
        t0 = time.perf_counter()
        echo = self._call(m.Echo(bytes(payload)), Opcode.PING, len(payload))
        dt = time.perf_counter() - t0
        if echo.payload != payload:
            raise PayloadError(f"PING echo differs from the {len(payload)} bytes sent")
        return dt

    def reset(self, *, clear_weights: bool = False) -> None:
        """Reset registers, FIFOs and counters (and the weights when asked)."""
        self._call(m.Reset(clear_weights), Opcode.RESET)

    def status(self) -> Counters:
        """Busy flag, error flags and counters."""
        return self._call(m.Empty(), Opcode.STATUS, 64).counters

    def read_reg(self, reg: str | int) -> int:
        """Read a 32-bit register by name or address."""
        return int(self._call(m.RegAddr(resolve(reg).addr), Opcode.READ_REG).value)

    def write_reg(self, reg: str | int, value: int) -> int:
        """Write a 32-bit register by name or address; return the value it now holds."""
        addr = resolve(reg).addr
        if not 0 <= int(value) <= 0xFFFFFFFF:
            raise ConfigError(f"register value {value} does not fit 32 bits")
        return int(self._call(m.RegValue(addr, int(value)), Opcode.WRITE_REG).value)

    def write_weights(self, weights: np.ndarray, row_start: int = 0) -> list[tuple[int, int]]:
        """Program logical weights [n_rows, cols] at ``row_start``, several frames in flight.

        Returns the row ranges ``(row_start, n_rows)`` whose stored contents, as echoed by the chip's CRC, differ
        from what was sent (empty when all rows stored as written; stuck cells show up here).
        """
        spec = self.spec
        w = self._check_weights(weights, row_start)
        per_frame = self._rows_per_frame()
        reqs = []
        for r0 in range(0, w.shape[0], per_frame):
            rows = m.WeightRows.of(spec, row_start + r0, w[r0 : r0 + per_frame])
            reqs.append(_Request(rows, Opcode.WRITE_WEIGHTS, 12))
        bad = []
        for req, reply in zip(reqs, self._run(reqs), strict=True):
            if reply.crc != zlib.crc32(req.message.data):  # type: ignore[attr-defined]
                bad.append((int(reply.row_start), int(reply.n_rows)))
        return bad

    def read_weights(self, row_start: int = 0, n_rows: int | None = None) -> np.ndarray:
        """Read logical weights [n_rows, cols] back (int64)."""
        spec = self.spec
        n_rows = spec.rows - row_start if n_rows is None else n_rows
        self._check_rows(row_start, n_rows)
        per_frame = self._rows_per_frame()
        field = weight_field(spec)
        reqs = []
        for r0 in range(0, n_rows, per_frame):
            n = min(per_frame, n_rows - r0)
            reqs.append(_Request(m.RowRange(row_start + r0, n), Opcode.READ_WEIGHTS,
                                 m.ROWS_FIXED + field.nbytes(n * spec.cols)))
        parts = []
        for req, reply in zip(reqs, self._run(reqs), strict=True):
            asked: m.RowRange = req.message  # type: ignore[assignment]
            if (reply.row_start, reply.n_rows) != (asked.row_start, asked.n_rows):
                raise PayloadError(f"READ_WEIGHTS returned rows {reply.row_start}+{reply.n_rows}, asked for "
                                   f"{asked.row_start}+{asked.n_rows}")
            parts.append(reply.weights(spec))
        return np.concatenate(parts)

    def _rows_per_frame(self) -> int:
        spec = self.spec
        field = weight_field(spec)
        per_frame = field.capacity(self.payload_cap - m.ROWS_FIXED) // spec.cols
        if per_frame < 1:
            raise ConfigError(f"one weight row ({spec.cols} x {spec.weight_bits} bits) does not fit the "
                              f"{self.payload_cap}-byte payload both ends agreed")
        aimed = max(1, field.capacity(self.frame_target - m.ROWS_FIXED) // spec.cols)
        return min(per_frame, aimed, 65535)

    def mac(self, inputs: np.ndarray, row_start: int = 0) -> np.ndarray:
        """MACs for input codes [batch, n_rows] (or one vector [n_rows]) driving rows ``row_start ..``.

        Returns int32 outputs [batch, cols] (or [cols]) in units of ``spec.adc_lsb`` levels; equal to
        ``inputs @ weights[row_start:row_start+n_rows]`` on an ideal macro whose ADC resolves every level.
        ``last_cost`` holds the cycles and energy the chip reported for the whole call.
        """
        spec = self.spec
        x, single = self._check_inputs(inputs, row_start)
        chunks = self._row_chunks(Opcode.MAC, row_start, x.shape[1])
        if len(chunks) > 1 and spec.adc_full_scale != spec.adc_max:
            raise ConfigError(
                f"one MAC vector over rows {row_start}..{row_start + x.shape[1] - 1} does not fit the "
                f"{self.payload_cap}-byte payload, and splitting it by row group would round its outputs "
                "differently (adc_full_scale != 2**adc_bits - 1): drive fewer rows per call"
            )
        out = np.zeros((x.shape[0], spec.cols), dtype=np.int64)
        for (r0, n, b0, b1), reply in self._mac_run(Opcode.MAC, x, row_start, chunks):
            out[b0:b1] += reply.outputs(spec, r0, n)
        out = out.astype(np.int32)
        return out[0] if single else out

    def mac_raw(self, inputs: np.ndarray, row_start: int = 0) -> np.ndarray:
        """Raw ADC codes [batch, planes, groups, slices, cols] (or without the batch axis for one vector).

        The group axis holds the row groups that the driven rows span (``spec.group_span``). Codes that do not fit
        one frame are asked for by batch and, when one vector's do not fit, by row group.
        """
        spec = self.spec
        x, single = self._check_inputs(inputs, row_start)
        g0 = spec.group_span(row_start, x.shape[1])[0]
        out = np.empty((x.shape[0], *spec.raw_shape_for(row_start, x.shape[1])), dtype=spec.code_dtype)
        chunks = self._row_chunks(Opcode.MAC_RAW, row_start, x.shape[1])
        for (r0, n, b0, b1), reply in self._mac_run(Opcode.MAC_RAW, x, row_start, chunks):
            first, end = spec.group_span(r0, n)
            out[b0:b1, :, first - g0 : end - g0] = reply.codes(spec, r0, n)
        return out[0] if single else out

    # ---- splitting ----------------------------------------------------------------------------------------
    def _vector_bytes(self, op: Opcode, row_start: int, n_rows: int) -> tuple[int, int]:
        """Bits of one vector's inputs and of its outputs (MAC) or codes (MAC_RAW) for a row range."""
        spec = self.spec
        in_bits = n_rows * spec.input_bits
        if op == Opcode.MAC:
            return in_bits, spec.cols * output_field(spec, row_start, n_rows).bits
        return in_bits, int(np.prod(spec.raw_shape_for(row_start, n_rows))) * spec.adc_bits

    def _fits(self, op: Opcode, row_start: int, n_rows: int) -> bool:
        in_bits, out_bits = self._vector_bytes(op, row_start, n_rows)
        cap = self.payload_cap
        return -(-in_bits // 8) + m.MAC_REQUEST_FIXED <= cap and -(-out_bits // 8) + m.MAC_REPLY_FIXED <= cap

    def _row_chunks(self, op: Opcode, row_start: int, n_rows: int) -> list[tuple[int, int]]:
        """Row ranges of whole row groups, as few as possible, each of whose vectors fits a frame both ways."""
        if self._fits(op, row_start, n_rows):
            return [(row_start, n_rows)]
        spec = self.spec
        r = spec.rows_per_conversion
        end = row_start + n_rows
        chunks = []
        g, g_end = spec.group_span(row_start, n_rows)
        while g < g_end:
            k = 1
            while g + k < g_end and self._fits(op, *_rows_of(g, g + k + 1, r, row_start, end)):
                k += 1
            r0, n = _rows_of(g, g + k, r, row_start, end)
            if not self._fits(op, r0, n):
                in_bits, out_bits = self._vector_bytes(op, r0, n)
                raise ConfigError(
                    f"one {op.name} vector of a single row group (rows {r0}..{r0 + n - 1}) needs "
                    f"{-(-in_bits // 8)} bytes in and {-(-out_bits // 8)} out, over the {self.payload_cap}-byte "
                    "payload both ends agreed"
                )
            chunks.append((r0, n))
            g += k
        return chunks

    def _mac_run(
        self, op: Opcode, x: np.ndarray, row_start: int, chunks: list[tuple[int, int]]
    ) -> list[tuple[tuple[int, int, int, int], m.MacResult]]:
        """One call of MAC/MAC_RAW frames over the row chunks and batches; ``((r0, n, b0, b1), reply)`` each."""
        spec = self.spec
        cap, aim = self.payload_cap, self.frame_target
        reqs: list[_Request] = []
        where: list[tuple[int, int, int, int]] = []
        for r0, n in chunks:
            in_bits, out_bits = self._vector_bytes(op, r0, n)
            per_frame = min((cap - m.MAC_REQUEST_FIXED) * 8 // in_bits, (cap - m.MAC_REPLY_FIXED) * 8 // out_bits,
                            max(1, (aim - m.MAC_REPLY_FIXED) * 8 // max(in_bits, out_bits)), 65535)
            # Inputs stream one way and outputs the other: with at least two windows of frames per call, a frame's
            # reply travels while later frames' inputs do, and only one small frame's time fills the pipe.
            min_vectors = max(1, MIN_FRAME_BYTES * 8 // max(in_bits, out_bits))
            per_frame = min(per_frame, max(min_vectors, -(-x.shape[0] // (2 * self.window))))
            cols = slice(r0 - row_start, r0 - row_start + n)
            for b0 in range(0, x.shape[0], per_frame):
                b1 = min(b0 + per_frame, x.shape[0])
                message = m.MacInputs.of(spec, r0, x[b0:b1, cols])
                reqs.append(_Request(message, op, m.MAC_REPLY_FIXED + -(-(b1 - b0) * out_bits // 8)))
                where.append((r0, n, b0, b1))
        replies = self._run(reqs)
        cycles = energy = 0
        for (r0, n, b0, b1), reply in zip(where, replies, strict=True):
            if reply.batch != b1 - b0:
                raise PayloadError(f"{op.name} reply holds {reply.batch} vectors, asked for {b1 - b0}")
            cycles += reply.cost.cycles
            energy += reply.cost.energy_fj
        self.last_cost = OpCost(cycles, energy)
        return list(zip(where, replies, strict=True))

    # ---- validation -------------------------------------------------------------------------------------
    def _check_rows(self, row_start: int, n_rows: int) -> None:
        rows = self.spec.rows
        if not (0 <= row_start < rows and 1 <= n_rows and row_start + n_rows <= rows):
            raise ShapeError(f"rows {row_start}..{row_start + n_rows - 1} do not fit the macro's rows 0..{rows - 1}")

    def _check_weights(self, weights: np.ndarray, row_start: int) -> np.ndarray:
        spec = self.spec
        w = np.asarray(weights)
        if w.ndim != 2 or w.shape[1] != spec.cols:
            raise ShapeError(f"weights must have shape [n_rows, {spec.cols}], got {list(w.shape)}")
        if not np.issubdtype(w.dtype, np.integer):
            raise ShapeError(f"weights must be integers (quantize first), got dtype {w.dtype}")
        self._check_rows(row_start, w.shape[0])
        lo, hi = int(w.min()), int(w.max())
        if lo < spec.weight_min or hi > spec.weight_max:
            raise ShapeError(
                f"weights span {lo}..{hi}, outside {spec.weight_min}..{spec.weight_max} "
                f"({spec.weight_bits}-bit {spec.weight_storage})"
            )
        return w

    def _check_inputs(self, inputs: np.ndarray, row_start: int) -> tuple[np.ndarray, bool]:
        spec = self.spec
        x = np.asarray(inputs)
        single = x.ndim == 1
        if single:
            x = x[None, :]
        if x.ndim != 2 or x.shape[0] < 1:
            raise ShapeError(f"inputs must have shape [batch, n_rows] or [n_rows], got {list(np.shape(inputs))}")
        if not np.issubdtype(x.dtype, np.integer):
            raise ShapeError(f"inputs must be unsigned integer codes, got dtype {x.dtype}")
        self._check_rows(row_start, x.shape[1])
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > spec.input_max:
            raise ShapeError(f"input codes span {lo}..{hi}, outside 0..{spec.input_max} ({spec.input_bits}-bit)")
        return x, single

    # ---- transactions -----------------------------------------------------------------------------------
    def _call(self, message: m.Message, opcode: Opcode, reply_bytes: int = 16) -> Any:
        return self._run([_Request(message, opcode, reply_bytes)])[0]

    def call_deadline(self, nbytes: int) -> float:
        """Seconds a call moving ``nbytes`` (both ways) may take: ``deadline``, or the default for its size."""
        if self.deadline is not None:
            return self.deadline
        return DEADLINE_BASE_S + 2.0 * nbytes / (self.link.rate_hint or ASSUMED_RATE)

    def _run(self, requests: list[_Request], deadline: float | None = None) -> list[Any]:
        """Send requests with a window and return their decoded replies, in order, within the call's deadline."""
        if self._hello is None and requests[0].opcode != Opcode.HELLO:
            self.identify()  # a session starts with HELLO (a device with a token serves nothing before it)
        encoded = [r.message.encode() for r in requests]
        nbytes = sum(len(p) + r.reply_bytes + 2 * OVERHEAD for p, r in zip(encoded, requests, strict=True))
        limit = deadline if deadline is not None else self.call_deadline(nbytes)
        call = _Call(self, requests, encoded, limit)
        t0 = time.monotonic()
        try:
            return call.run()
        finally:
            self.stats.calls += 1
            self.last_call = CallTiming(time.monotonic() - t0, limit)

    def _next_seq(self, taken: dict[int, _Pending]) -> int:
        while True:
            self._seq = (self._seq + 1) & 0xFFFF
            if self._seq not in taken:
                return self._seq

    def _wire_s(self, nbytes: int) -> float:
        rate = self.link.rate_hint
        return nbytes / rate if rate else 0.0

    def _transmit(self, p: _Pending) -> float:
        """Write ``p``'s frame; returns the time the write returned (a stalled line makes a write wait)."""
        self._order += 1
        p.sent_order = self._order
        p.sends += 1
        line = f"-> {m.opcode_name(p.opcode)} seq={p.seq} len={len(p.frame) - OVERHEAD}"
        try:
            self.link.write(p.frame)
        except CimTimeoutError:
            # a busy device stopped reading (a pty or socket pushes back): the frame may be cut short, so this
            # attempt counts as lost and is resent on schedule
            self.stats.write_stalls += 1
            line += " (write stalled)"
        self.stats.frames_out += 1
        self.stats.bytes_out += len(p.frame)
        self.wire.add(line)
        p.sent_at = time.monotonic()
        return p.sent_at

    @property
    def resend_s(self) -> float:
        """The resend interval now: ``timeout`` times the backoff factor, seconds."""
        return self.timeout * self._backoff

    def _learn_pace(self, p: _Pending, now: float, others_pending: bool) -> None:
        """Update the device's pace from this reply, if it measures one (see the module docstring)."""
        if p.timeouts == 0:  # answered without a timer's resend: the device keeps up with the interval
            self._backoff = 1.0
        if p.sends == 1:
            self._frame_arrived()
            if self._last_reply_t is None:
                sample: float | None = now - p.sent_at  # a round trip: an overestimate of the pace, which is safe
            elif p.sent_at <= self._last_reply_t:
                sample = now - self._last_reply_t  # it waited while the device answered the one before
            else:
                sample = None  # sent after the last reply: the device may have idled
            if sample is not None:
                self._pace_s = sample if self._pace_s == 0.0 else 0.8 * self._pace_s + 0.2 * sample
        self._last_reply_t = now if others_pending else None  # an idle gap is not the device's pace


def _rows_of(g0: int, g1: int, r: int, lo: int, hi: int) -> tuple[int, int]:
    """(row_start, n_rows) of row groups g0..g1-1 (``r`` rows each) within rows ``lo .. hi-1``."""
    a, b = max(lo, g0 * r), min(hi, g1 * r)
    return a, b - a


class _Call:
    """The transactions of one driver call: a window of requests in flight, their resends, and the deadline."""

    def __init__(self, chip: Chip, requests: list[_Request], encoded: list[bytes], deadline_s: float) -> None:
        self.chip = chip
        self.requests = requests
        self.encoded = encoded
        self.results: list[Any] = [None] * len(requests)
        self.pending: dict[int, _Pending] = {}
        self.next_i = 0
        self.done = 0
        self.partial = 0
        self.last_byte_at = 0.0
        self.start = time.monotonic()
        self.deadline_s = deadline_s
        self.deadline = self.start + deadline_s

    def run(self) -> list[Any]:
        chip = self.chip
        chip._last_reply_t = None
        while self.done < len(self.requests):
            now = time.monotonic()
            self._fill()
            self._check_deadline(now)
            data = chip.link.read(READ_CHUNK, self._wait_s(now))
            now = time.monotonic()
            if data:
                self._feed(data, now)
            else:
                self._cut_short(now)
            self._resend_overdue(now)
        return self.results

    # ---- sending ---------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        chip = self.chip
        while self.next_i < len(self.requests) and len(self.pending) < chip.window:
            req = self.requests[self.next_i]
            payload = self.encoded[self.next_i]
            seq = chip._next_seq(self.pending)
            p = _Pending(self.next_i, req.opcode, seq, encode_frame(req.opcode, seq, payload), req.reply_bytes)
            self.pending[seq] = p
            chip.stats.requests += 1
            chip.stats.payload_out += len(payload)
            self._send(p)
            self.next_i += 1

    def _send(self, p: _Pending) -> None:
        sent = self.chip._transmit(p)
        p.resend_at = sent + self.chip.resend_s + self._queue_s(p)
        # a backed-off interval never leaves a request without another chance before the call's deadline
        p.resend_at = min(p.resend_at, sent + max(self.chip.timeout, (self.deadline - sent) / 2))

    def _queue_s(self, p: _Pending) -> float:
        """Seconds the requests sent before ``p`` (still pending) and ``p`` itself need at the device's pace and
        the line rate."""
        ahead = [q for q in self.pending.values() if q.sent_order <= p.sent_order]
        nbytes = sum(len(q.frame) + q.reply_bytes + OVERHEAD for q in ahead)
        return len(ahead) * self.chip._pace_s + self.chip._wire_s(nbytes)

    def _fast_retransmit(self, p: _Pending, now: float, why: str) -> None:
        chip = self.chip
        chip.stats.retries += 1
        chip.stats.fast_retransmits += 1
        chip._frames_lost()
        chip.wire.add(f"   resend seq={p.seq}: {why}")
        self._send(p)

    def _resend_overdue(self, now: float) -> None:
        chip = self.chip
        overdue = sorted((p for p in self.pending.values() if now >= p.resend_at), key=lambda p: p.sent_order)
        if overdue:
            chip._backoff = min(2.0 * chip._backoff, MAX_BACKOFF)
            chip._last_reply_t = None  # the gap was a loss (or a device slower than assumed), not the pace
            if chip._framer.drop_partial():
                self.partial = 0
        for p in overdue:
            p.timeouts += 1
            if p.timeouts > chip.retries:
                chip.stats.deadline_misses += 1
                raise CimTimeoutError(
                    f"{p.opcode.name} (seq {p.seq}) got no valid reply after {p.sends} sends, {p.timeouts - 1} of "
                    f"them after a timeout (resend interval {chip.timeout:g} s, link {chip.link.url})",
                    wire=chip.wire.lines,
                )
            chip.stats.retries += 1
            chip.stats.timeouts += 1
            chip._frames_lost()
            chip.wire.add(f"   resend seq={p.seq}: no reply within {now - p.sent_at:.3g} s")
            self._send(p)

    def _check_deadline(self, now: float) -> None:
        if now <= self.deadline:
            return
        chip = self.chip
        chip.stats.deadline_misses += 1
        late = sorted(self.pending.values(), key=lambda p: p.sent_order)[:4]
        outstanding = ", ".join(f"{p.opcode.name} seq {p.seq} ({p.sends} sends)" for p in late)
        raise CimTimeoutError(
            f"{len(self.requests)} request(s) did not complete within the call's deadline of {self.deadline_s:.3g} s"
            f" ({self.done} done; outstanding: {outstanding}); resend interval {chip.timeout:g} s, link "
            f"{chip.link.url}",
            wire=chip.wire.lines,
        )

    def _wait_s(self, now: float) -> float:
        soonest = min([p.resend_at for p in self.pending.values()], default=now)
        if self.partial:
            soonest = min(soonest, self.last_byte_at + self._gap_s)
        return max(0.0, min(soonest, self.deadline) - now)

    @property
    def _gap_s(self) -> float:
        return min(GAP_S, self.chip.timeout)

    def _cut_short(self, now: float) -> None:
        """A partial reply that stopped arriving lost a chunk: drop it and resend its request at once."""
        framer = self.chip._framer
        if not self.partial or now - self.last_byte_at < self._gap_s:
            return
        header = framer.pending_header()
        framer.drop_partial()
        self.chip.stats.bad_frames += 1
        p = self.pending.get(header[1]) if header else None
        if p is not None and header is not None and header[0] in (p.opcode | REPLY_FLAG, REPLY_FLAG):
            self._fast_retransmit(p, now, "its reply stopped arriving halfway")
        self._handle(framer.feed(b""), now)  # a frame may hide in the bytes given up
        self.partial = framer.pending

    # ---- receiving -------------------------------------------------------------------------------------------
    def _feed(self, data: bytes, now: float) -> None:
        chip = self.chip
        chip.stats.bytes_in += len(data)
        self.last_byte_at = now
        events = chip._framer.feed(data)
        growing = chip._framer.pending > self.partial
        self.partial = chip._framer.pending
        self._handle(events, now)
        if growing:  # a reply is arriving: none of what is pending is lost yet
            for q in self.pending.values():
                q.resend_at = max(q.resend_at, now + chip.resend_s)

    def _handle(self, events: list[Frame | BadFrame], now: float) -> None:
        for ev in events:
            if isinstance(ev, BadFrame):
                self._on_damaged(ev, now)
            else:
                self._on_frame(ev, now)

    def _on_damaged(self, ev: BadFrame, now: float) -> None:
        chip = self.chip
        chip.stats.bad_frames += 1
        chip.wire.add(f"<- damaged frame ({ev.reason}) seq={ev.seq}")
        p = self.pending.get(ev.seq)
        if p is not None and ev.opcode in (p.opcode | REPLY_FLAG, REPLY_FLAG):
            self._fast_retransmit(p, now, "its reply arrived damaged")

    def _on_frame(self, ev: Frame, now: float) -> None:
        chip = self.chip
        chip.stats.frames_in += 1
        chip.wire.add(f"<- {m.opcode_name(ev.opcode)} seq={ev.seq} status={_status_name(ev.status)} "
                      f"len={len(ev.payload)}")
        if ev.version != PROTOCOL_VERSION:
            raise VersionMismatch(f"the device at {chip.link.url} answers in protocol version {ev.version}; this host "
                                  f"speaks {PROTOCOL_VERSION}: {_text(ev)}")
        if ev.opcode == REPLY_FLAG:
            self._on_session_reply(ev, now)
            return
        p = self.pending.get(ev.seq)
        if not ev.is_reply or p is None or ev.opcode != (p.opcode | REPLY_FLAG):
            chip.stats.stale_replies += 1
            return
        if ev.status == Status.BAD_CRC:
            chip.stats.nacks += 1
            self._fast_retransmit(p, now, "the device received it damaged")
        elif ev.status == Status.BUSY:
            chip.stats.nacks += 1
            p.resend_at = now + chip.resend_s  # the controller is occupied: ask again after a while
        elif ev.status != Status.OK:
            self._refused(p, ev)
        else:
            self._answered(p, ev, now)

    def _on_session_reply(self, ev: Frame, now: float) -> None:
        """A reply with opcode 0: MISSING names a request the device never got; BUSY refuses this host."""
        chip = self.chip
        if ev.status == Status.BUSY:
            raise DeviceError(f"the device at {chip.link.url} refused this host: {_text(ev)}", status=Status.BUSY,
                              detail=_text(ev))
        p = self.pending.get(ev.seq)
        if ev.status == Status.MISSING and p is not None:
            chip.stats.nacks += 1
            held_after = p.sent_order
            self._fast_retransmit(p, now, "the device never received it")
            self._extend_after(held_after, now)  # the requests sent after it are held until it arrives
        else:
            chip.stats.stale_replies += 1

    def _refused(self, p: _Pending, ev: Frame) -> None:
        chip = self.chip
        chip.stats.error_replies += 1
        text = _text(ev)
        if ev.status == Status.BAD_VERSION:
            raise VersionMismatch(f"the device at {chip.link.url} refused protocol version {PROTOCOL_VERSION}: {text}")
        raise DeviceError(f"{p.opcode.name} refused by the chip: {_status_name(ev.status)}: {text}",
                          status=_status(ev.status), detail=text)

    def _answered(self, p: _Pending, ev: Frame, now: float) -> None:
        chip = self.chip
        del self.pending[p.seq]
        chip._learn_pace(p, now, bool(self.pending))
        chip.stats.payload_in += len(ev.payload)
        self.results[p.index] = m.decode_reply(p.opcode, ev.payload)
        self.done += 1
        # the device answers in the order it received requests: one sent before this reply's request and earlier
        # in seq order, still unanswered, had its request or its reply lost
        for q in sorted(self.pending.values(), key=lambda q: q.sent_order):
            if q.sent_order < p.sent_order and _before(q.seq, p.seq):
                self._fast_retransmit(q, now, f"seq {p.seq}, sent after it, was answered first")
        self._extend_after(p.sent_order, now)

    def _extend_after(self, order: int, now: float) -> None:
        """The device is working through what was sent after send ``order``: those get their time from now."""
        chip = self.chip
        later = sorted((q for q in self.pending.values() if q.sent_order > order), key=lambda q: q.sent_order)
        nbytes = 0
        for rank, q in enumerate(later, start=1):
            nbytes += q.reply_bytes + OVERHEAD
            q.resend_at = max(q.resend_at, now + chip.resend_s + rank * chip._pace_s + chip._wire_s(nbytes))


def _text(ev: Frame) -> str:
    return ev.payload.decode("utf-8", "replace")


def _status(code: int) -> Status | int:
    try:
        return Status(code)
    except ValueError:
        return code


def _status_name(code: int) -> str:
    s = _status(code)
    return s.name if isinstance(s, Status) else f"status {code}"


__all__ = ["ASSUMED_RATE", "DEADLINE_BASE_S", "CallTiming", "Chip", "DriverStats", "Hello"]

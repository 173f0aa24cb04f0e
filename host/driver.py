"""The driver: ``Chip`` turns calls into frames on a link, and replies into numpy arrays.

It never asks what is at the other end of the link: a board and the twin answer the same bytes.

Transactions (the transaction layer of pymodbus, in spirit):

- every request gets a fresh ``seq``; bulk calls keep up to ``window`` frames in flight, so the line rate, not
  round trips, sets the pace;
- a reply is matched by ``seq``; stale or duplicate replies are counted and ignored;
- the device executes requests in seq order, exactly once: it holds a request that arrives ahead of a missing
  one and answers MISSING for the gap, and the missing request is sent again at once; a BAD_CRC reply (the device
  saw a damaged frame) is resent at once too. Replies come in seq order, so a reply for a later request means an
  earlier reply was lost: that request is resent (fast retransmit) and the device's replay cache answers it from
  memory. Link faults therefore change neither what executes nor in which order;
- a request with no progress for ``timeout`` seconds (no reply, no partial reply growing) is resent; after
  ``retries`` resends ``CimTimeoutError`` reports what was outstanding and the last frames on the wire. Each call
  also has an overall deadline, so no call waits forever whatever arrives;
- non-OK statuses other than BAD_CRC/BUSY raise ``DeviceError`` with the device's message.
"""

from __future__ import annotations

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
    ShapeError,
    VersionMismatch,
)
from cimlab.firmware_bridge.frame import (
    DEFAULT_MAX_PAYLOAD,
    OVERHEAD,
    PROTOCOL_VERSION,
    REPLY_FLAG,
    BadFrame,
    Frame,
    Framer,
    WireLog,
    encode_frame,
)
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.firmware_bridge.registers import REGMAP_VERSION, resolve
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.logs import WireTrace

if TYPE_CHECKING:
    from cimlab.links.base import Link

READ_CHUNK = 256 * 1024
MIN_FRAME_BYTES = 4096
"""Bulk calls split into frames no smaller than this (bytes) when spreading a call over the window."""


@dataclass(frozen=True)
class Hello:
    """What the chip says about itself."""

    protocol_version: int
    max_payload: int
    regmap_version: int
    chip_id: str
    firmware_id: str
    bitstream_id: str
    spec: MacroSpec

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "spec"}
        d["spec"] = self.spec.to_dict()
        return d


@dataclass
class DriverStats:
    """Counters of one Chip's traffic since it was opened."""

    requests: int = 0
    frames_out: int = 0
    frames_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    payload_out: int = 0
    payload_in: int = 0
    retries: int = 0
    fast_retransmits: int = 0
    nacks: int = 0
    timeouts: int = 0
    stale_replies: int = 0
    bad_frames: int = 0
    error_replies: int = 0
    write_stalls: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict for reports."""
        return dict(self.__dict__)


@dataclass
class _Pending:
    index: int
    opcode: Opcode
    frame: bytes
    reply_bytes: int
    attempts: int = 0
    order: int = 0
    deadline: float = 0.0
    first_sent: float = 0.0


class Chip:
    """A CIM macro behind a link.

    Args:
        link: an open link (``cimlab.links.open_link``).
        timeout: seconds without progress before a request is resent.
        retries: resends per request before ``CimTimeoutError``.
        window: frames in flight in bulk calls.
        max_payload: largest payload this host sends or accepts, bytes (the chip's HELLO may lower it).
    """

    def __init__(
        self,
        link: Link,
        *,
        timeout: float = 1.0,
        retries: int = 4,
        window: int = 8,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        if timeout <= 0:
            raise ConfigError(f"timeout must be positive seconds, got {timeout}")
        if retries < 0:
            raise ConfigError(f"retries must be >= 0, got {retries}")
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        self.link = link
        self.timeout = timeout
        self.retries = retries
        self.window = window
        self.max_payload = max_payload
        self.stats = DriverStats()
        self.wire = WireTrace()  # the recent frames, also logged at DEBUG to cimlab.wire
        self.last_cost = OpCost(0, 0)
        self._framer = Framer(max_payload)
        self._seq = int.from_bytes(os.urandom(2), "little")
        self._order = 0
        self._hello: Hello | None = None
        self._service_s = 0.0  # smoothed seconds between replies while requests are queued (the device's pace)
        self._last_reply_t: float | None = None
        self._pending_count = 0  # requests in flight in the current call (a resend's reply comes after theirs)

    # ---- life cycle -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, **kwargs: Any) -> Chip:
        """Open a link by URL, identify the chip, and return a ready Chip (close it, or use ``with``)."""
        from cimlab.links import open_link

        link = open_link(url, timeout=kwargs.get("timeout", 1.0))
        chip = cls(link, **kwargs)
        try:
            chip.identify()
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
        """Largest payload both ends accept, bytes."""
        return min(self.max_payload, self.hello.max_payload)

    # ---- commands ---------------------------------------------------------------------------------------
    def identify(self) -> Hello:
        """HELLO: identity, limits and MacroSpec; fails loudly on a protocol or register-map mismatch."""
        r = self._call(Opcode.HELLO, b"", reply_bytes=256)
        if r.protocol_version != PROTOCOL_VERSION:
            raise VersionMismatch(f"chip speaks protocol {r.protocol_version}, this host {PROTOCOL_VERSION}")
        if r.regmap_version != REGMAP_VERSION:
            raise VersionMismatch(f"chip has register map v{r.regmap_version}, this host v{REGMAP_VERSION}")
        if r.max_payload < 256:
            raise VersionMismatch(f"chip accepts only {r.max_payload}-byte payloads (need >= 256)")
        self._hello = Hello(
            protocol_version=r.protocol_version,
            max_payload=r.max_payload,
            regmap_version=r.regmap_version,
            chip_id=r.chip_id,
            firmware_id=r.firmware_id,
            bitstream_id=r.bitstream_id,
            spec=m.spec_from_wire(r.spec),
        )
        return self._hello

    def ping(self, payload: bytes = b"") -> float:
        """Echo ``payload``; return the round trip in seconds. A wrong echo raises PayloadError."""
        if len(payload) > self.payload_cap:
            raise ConfigError(f"ping payload of {len(payload)} bytes exceeds {self.payload_cap}")
        t0 = time.perf_counter()
        echo = self._call(Opcode.PING, payload, reply_bytes=len(payload))
        dt = time.perf_counter() - t0
        if echo != payload:
            raise PayloadError(f"PING echo differs from the {len(payload)} bytes sent")
        return dt

    def reset(self, *, clear_weights: bool = False) -> None:
        """Reset registers, FIFOs and counters (and the weights when asked)."""
        self._call(Opcode.RESET, m.build_request(Opcode.RESET, flags=int(clear_weights)))

    def status(self) -> Counters:
        """Busy flag, error flags and counters."""
        r = self._call(Opcode.STATUS, b"", reply_bytes=64)
        return Counters(
            busy=bool(r.busy),
            error_flags=r.error_flags,
            cycles=r.cycles,
            ops=r.ops,
            conversions=r.conversions,
            energy_fj=r.energy_fj,
            last=OpCost(r.last.cycles, r.last.energy_fj),
        )

    def read_reg(self, reg: str | int) -> int:
        """Read a 32-bit register by name or address."""
        addr = resolve(reg).addr
        return int(self._call(Opcode.READ_REG, m.build_request(Opcode.READ_REG, addr=addr)).value)

    def write_reg(self, reg: str | int, value: int) -> int:
        """Write a 32-bit register by name or address; return the value it now holds."""
        addr = resolve(reg).addr
        if not 0 <= int(value) <= 0xFFFFFFFF:
            raise ConfigError(f"register value {value} does not fit 32 bits")
        req = m.build_request(Opcode.WRITE_REG, addr=addr, value=int(value))
        return int(self._call(Opcode.WRITE_REG, req).value)

    def write_weights(self, weights: np.ndarray, row_start: int = 0) -> list[tuple[int, int]]:
        """Program logical weights [n_rows, cols] at ``row_start``, several frames in flight.

        Returns the row ranges ``(row_start, n_rows)`` whose stored contents, as echoed by the chip's CRC, differ
        from what was sent (empty when all rows stored as written; stuck cells show up here).
        """
        spec = self.spec
        w = self._check_weights(weights, row_start)
        per_frame = max(1, (self.payload_cap - m.ROWS_FIXED) // (spec.cols * spec.weight_dtype.itemsize))
        reqs = []
        crcs = []
        for r0 in range(0, w.shape[0], per_frame):
            chunk = np.ascontiguousarray(w[r0 : r0 + per_frame], dtype=spec.weight_dtype).tobytes()
            crcs.append(zlib.crc32(chunk))
            req = m.build_request(
                Opcode.WRITE_WEIGHTS, row_start=row_start + r0, n_rows=min(per_frame, w.shape[0] - r0), data=chunk
            )
            reqs.append((Opcode.WRITE_WEIGHTS, req, 12))
        bad = []
        for reply, crc in zip(self._run(reqs), crcs, strict=True):
            if reply.crc != crc:
                bad.append((int(reply.row_start), int(reply.n_rows)))
        return bad

    def read_weights(self, row_start: int = 0, n_rows: int | None = None) -> np.ndarray:
        """Read logical weights [n_rows, cols] back (int64)."""
        spec = self.spec
        n_rows = spec.rows - row_start if n_rows is None else n_rows
        self._check_rows(row_start, n_rows)
        item = spec.cols * spec.weight_dtype.itemsize
        per_frame = max(1, (self.payload_cap - m.ROWS_FIXED) // item)
        reqs = []
        for r0 in range(0, n_rows, per_frame):
            n = min(per_frame, n_rows - r0)
            reqs.append((Opcode.READ_WEIGHTS, m.build_request(Opcode.READ_WEIGHTS, row_start=row_start + r0, n_rows=n), n * item))
        parts = []
        for (_, req, size), reply in zip(reqs, self._run(reqs), strict=True):
            if len(reply.data) != size:
                raise PayloadError(f"READ_WEIGHTS returned {len(reply.data)} bytes, expected {size}")
            parts.append(np.frombuffer(reply.data, dtype=spec.weight_dtype).reshape(-1, spec.cols))
        return np.concatenate(parts).astype(np.int64)

    def mac(self, inputs: np.ndarray, row_start: int = 0) -> np.ndarray:
        """MACs for input codes [batch, n_rows] (or one vector [n_rows]) driving rows ``row_start ..``.

        Returns int32 outputs [batch, cols] (or [cols]) in units of ``spec.adc_lsb`` levels; equal to
        ``inputs @ weights[row_start:row_start+n_rows]`` on an ideal macro whose ADC resolves every level.
        ``last_cost`` holds the cycles and energy the chip reported for the whole call.
        """
        spec = self.spec
        x, single = self._check_inputs(inputs, row_start)
        out = self._mac_call(Opcode.MAC, x, row_start, spec.cols * 4, spec.output_dtype, (spec.cols,))
        return out[0] if single else out

    def mac_raw(self, inputs: np.ndarray, row_start: int = 0) -> np.ndarray:
        """Raw ADC codes [batch, planes, groups, slices, cols] (or without the batch axis for one vector).

        The group axis holds the row groups that the driven rows span (``spec.group_span``): drive one row group
        at a time when one vector's codes for every group do not fit a frame.
        """
        spec = self.spec
        x, single = self._check_inputs(inputs, row_start)
        shape = spec.raw_shape_for(row_start, x.shape[1])
        per = int(np.prod(shape)) * spec.code_dtype.itemsize
        out = self._mac_call(Opcode.MAC_RAW, x, row_start, per, spec.code_dtype, shape)
        return out[0] if single else out

    def _mac_call(
        self, op: Opcode, x: np.ndarray, row_start: int, out_per_vec: int, dtype: np.dtype, shape: tuple[int, ...]
    ) -> np.ndarray:
        spec = self.spec
        in_per_vec = x.shape[1] * spec.input_dtype.itemsize
        cap = self.payload_cap
        per_frame = min((cap - m.MAC_REQUEST_FIXED) // in_per_vec, (cap - m.MAC_REPLY_FIXED) // out_per_vec, 65535)
        if per_frame < 1:
            raise ConfigError(
                f"one vector's {op.name} needs {max(in_per_vec, out_per_vec)} bytes, over the {cap}-byte payload cap"
            )
        # Inputs stream one way and outputs the other: with at least two windows of frames per call, a frame's
        # reply travels while later frames' inputs do, and only one small frame's time is spent filling the pipe.
        min_vectors = max(1, MIN_FRAME_BYTES // max(in_per_vec, out_per_vec))
        per_frame = min(per_frame, max(min_vectors, -(-x.shape[0] // (2 * self.window))))
        reqs = []
        for b0 in range(0, x.shape[0], per_frame):
            chunk = np.ascontiguousarray(x[b0 : b0 + per_frame], dtype=spec.input_dtype)
            req = m.build_request(op, row_start=row_start, n_rows=x.shape[1], batch=chunk.shape[0], data=chunk.tobytes())
            reqs.append((op, req, chunk.shape[0] * out_per_vec))
        out = np.empty((x.shape[0], *shape), dtype=dtype)
        cycles = energy = 0
        b0 = 0
        for (_, _, size), reply in zip(reqs, self._run(reqs), strict=True):
            if len(reply.data) != size or reply.batch * out_per_vec != size:
                raise PayloadError(f"{op.name} reply holds {len(reply.data)} bytes, expected {size}")
            n = reply.batch
            out[b0 : b0 + n] = np.frombuffer(reply.data, dtype=dtype).reshape(n, *shape)
            b0 += n
            cycles += reply.cost.cycles
            energy += reply.cost.energy_fj
        self.last_cost = OpCost(cycles, energy)
        return out

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
    def _call(self, op: Opcode, payload: bytes, reply_bytes: int = 16) -> Any:
        return self._run([(op, payload, reply_bytes)])[0]

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def _wire_s(self, nbytes: int) -> float:
        rate = getattr(self.link, "rate_hint", None)
        return nbytes / rate if rate else 0.0

    def _send(self, p: _Pending, now: float, ahead_bytes: int, ahead_frames: int = 0) -> None:
        self._order += 1
        p.order = self._order
        p.attempts += 1
        if p.attempts == 1:
            p.first_sent = now
        # the device answers in order: this request waits for the frames ahead of it, at the pace it has shown
        queued = (ahead_frames + 1) * 2.0 * self._service_s
        backoff = self.timeout * 2 ** min(p.attempts - 1, 6)  # each resend waits twice as long as the last
        p.deadline = now + backoff + queued + self._wire_s(ahead_bytes + len(p.frame) + p.reply_bytes + OVERHEAD)
        line = f"-> {m.opcode_name(p.opcode)} seq={_seq_of(p.frame)} len={len(p.frame) - OVERHEAD}"
        try:
            self.link.write(p.frame)
        except CimTimeoutError:
            # a busy device stopped reading (a pty or socket pushes back): the frame may be cut short, so this
            # attempt counts as lost and the transaction layer resends it on schedule
            self.stats.write_stalls += 1
            line += " (write stalled)"
        self.stats.frames_out += 1
        self.stats.bytes_out += len(p.frame)
        self.wire.add(line)

    def _resend(self, p: _Pending, now: float, ahead_bytes: int, why: str) -> None:
        if p.attempts > self.retries:
            self.stats.timeouts += 1
            raise CimTimeoutError(
                f"{p.opcode.name} (seq {_seq_of(p.frame)}) got no valid reply after {p.attempts} attempts "
                f"({why}; timeout {self.timeout:g} s, link {self.link.url})",
                wire=self.wire.lines,
            )
        self.stats.retries += 1
        self._send(p, now, ahead_bytes, self._pending_count - 1)

    def _run(self, requests: list[tuple[Opcode, bytes, int]]) -> list[Any]:
        """Send requests (opcode, payload, expected reply payload bytes) with a window; return parsed replies."""
        n = len(requests)
        results: list[Any] = [None] * n
        done = 0
        pending: dict[int, _Pending] = {}
        next_i = 0
        total_bytes = sum(len(p) + r + 2 * OVERHEAD for _, p, r in requests)
        start = time.monotonic()
        # a backstop past the per-request schedule (which reports first, naming the request)
        attempts_s = self.timeout * sum(2 ** min(i, 6) for i in range(self.retries + 1))  # backed-off attempts
        call_deadline = start + attempts_s * max(1, n) + self.timeout + 2 * self._wire_s(total_bytes)
        partial = 0
        while done < n:
            now = time.monotonic()
            while next_i < n and len(pending) < self.window:
                op, payload, reply_bytes = requests[next_i]
                seq = self._next_seq()
                while seq in pending:
                    seq = self._next_seq()
                p = _Pending(next_i, op, encode_frame(op, seq, payload), reply_bytes)
                ahead = sum(len(q.frame) + q.reply_bytes for q in pending.values())
                ahead_frames = len(pending)
                pending[seq] = p
                self.stats.requests += 1
                self.stats.payload_out += len(payload)
                self._send(p, now, ahead, ahead_frames)
                next_i += 1
            if now > call_deadline:
                self.stats.timeouts += 1
                raise CimTimeoutError(
                    f"{n} request(s) did not complete within the call deadline "
                    f"({call_deadline - start:.1f} s; {done} done) on {self.link.url}",
                    wire=self.wire.lines,
                )
            self._pending_count = len(pending)
            oldest = min(pending.values(), key=lambda q: q.order)
            wait = max(0.0, min(oldest.deadline, call_deadline) - now)
            data = self.link.read(READ_CHUNK, wait)
            now = time.monotonic()
            if data:
                self.stats.bytes_in += len(data)
                events = self._framer.feed(data)
                growing = self._framer.pending > partial
                partial = self._framer.pending
                before = done
                for ev in events:
                    done += self._on_event(ev, pending, results, now)
                if growing or done > before:
                    # a reply arrived or is arriving: the device is working through the window, so whatever is
                    # still outstanding gets another timeout from now
                    for rank, q in enumerate(sorted(pending.values(), key=lambda q: q.order)):
                        q.deadline = max(q.deadline, now + self.timeout + 2.0 * self._service_s * (rank + 1))
            # checked whether or not bytes came: a peer sending only garbage must not postpone resends
            if pending:
                oldest = min(pending.values(), key=lambda q: q.order)
                if now >= oldest.deadline:
                    if self._framer.drop_partial():
                        partial = 0
                    self._resend(oldest, now, 0, "no reply before the deadline")
                    # nothing was heard: the others wait as long as the resent one before they are resent too
                    for q in pending.values():
                        q.deadline = max(q.deadline, oldest.deadline)
        return results

    def _on_event(self, ev: Frame | BadFrame, pending: dict[int, _Pending], results: list[Any], now: float) -> int:
        if isinstance(ev, BadFrame):
            self.stats.bad_frames += 1
            self.wire.add(f"<- damaged frame ({ev.reason}) seq={ev.seq}")
            p = pending.get(ev.seq)
            if p is not None and ev.opcode == (p.opcode | REPLY_FLAG):
                self._resend(p, now, 0, "damaged reply")
            return 0
        self.stats.frames_in += 1
        self.wire.add(f"<- {m.opcode_name(ev.opcode)} seq={ev.seq} status={_status_name(ev.status)} len={len(ev.payload)}")
        p = pending.get(ev.seq)
        if ev.status == Status.MISSING and ev.is_reply and p is not None:
            # the device holds later requests until this one arrives (it cannot know its opcode)
            self.stats.nacks += 1
            self._resend(p, now, 0, "the device never received it")
            return 0
        if not ev.is_reply or p is None or ev.opcode != (p.opcode | REPLY_FLAG):
            self.stats.stale_replies += 1
            return 0
        if ev.status in (Status.BAD_CRC, Status.BUSY):
            self.stats.nacks += 1
            self._resend(p, now, 0, f"device answered {_status_name(ev.status)}")
            return 0
        del pending[ev.seq]
        # the first reply of a busy spell gives its round trip (an overestimate of the pace, which is safe)
        interval = now - (self._last_reply_t if self._last_reply_t is not None else p.first_sent)
        self._service_s = interval if self._service_s == 0.0 else 0.8 * self._service_s + 0.2 * interval
        self._last_reply_t = now if pending else None  # an idle gap is not the device's pace
        # the device answers in seq order: a pending request with an earlier seq had its reply lost (a resend
        # bumps the send order, so only the seq says what came before)
        for q_seq, q in sorted(pending.items(), key=lambda item: item[1].order):
            if 0 < ((ev.seq - q_seq) & 0xFFFF) < 0x8000:
                self.stats.fast_retransmits += 1
                self._resend(q, now, 0, "a later request was answered first")
        if ev.status != Status.OK:
            self.stats.error_replies += 1
            text = ev.payload.decode("utf-8", "replace")
            raise DeviceError(f"{p.opcode.name} refused by the chip: {_status_name(ev.status)}: {text}",
                              status=_status(ev.status), detail=text)
        self.stats.payload_in += len(ev.payload)
        results[p.index] = m.parse_reply(p.opcode, ev.payload)
        return 1


def _seq_of(frame: bytes) -> int:
    return int.from_bytes(frame[5:7], "little")


def _status(code: int) -> Status | int:
    try:
        return Status(code)
    except ValueError:
        return code


def _status_name(code: int) -> str:
    s = _status(code)
    return s.name if isinstance(s, Status) else f"status {code}"


__all__ = ["Chip", "DriverStats", "Hello"]

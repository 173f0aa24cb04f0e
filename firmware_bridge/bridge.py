"""The device-side bridge: byte stream in, frames decoded, requests validated and dispatched, replies out.

``Bridge.receive(bytes) -> [reply frame bytes]`` is the whole contract; ``firmware_bridge.serve`` puts it on a
file descriptor (pty, socket, UART) and the host's ``sim://`` link calls it in-process. It survives any byte
sequence:

- garbage is skipped by the framer; a frame whose header is valid but whose payload CRC fails, or whose length
  is over the cap, is answered with BAD_CRC / TOO_LARGE for its ``seq`` (so the host resends at once);
- a request for another protocol version gets BAD_VERSION, an unknown opcode UNKNOWN_OPCODE, a payload that
  does not parse BAD_PAYLOAD, arguments out of range BAD_ARGUMENT: each validated *before* the controller
  is called, so the device state is unchanged and the connection stays usable;
- the last ``replay_depth`` replies are remembered by ``(seq, request CRC)``: a retried request is answered
  again from memory, not executed twice. RESET clears the memory. A reply with a retryable status (BUSY: the
  request did not execute) is not remembered, so its retry executes.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from firmware_bridge import messages as m
from firmware_bridge.controller import Controller
from firmware_bridge.errors import CimError, DeviceError, PayloadError
from firmware_bridge.frame import DEFAULT_MAX_PAYLOAD, PROTOCOL_VERSION, REPLY_FLAG, BadFrame, Framer, encode_frame
from firmware_bridge.messages import Opcode, Status
from firmware_bridge.registers import ERR_BAD_FRAME, ERR_BAD_REQUEST, REGMAP_VERSION

log = logging.getLogger(__name__)

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

    def as_dict(self) -> dict[str, int]:
        """Plain dict for reports."""
        return dict(self.__dict__)


class Bridge:
    """Decode requests, dispatch them to a Controller, encode replies.

    Args:
        controller: what executes the requests.
        max_payload: largest payload accepted and sent, bytes (reported in HELLO).
        replay_depth: replies remembered for retried requests.
    """

    def __init__(
        self, controller: Controller, *, max_payload: int = DEFAULT_MAX_PAYLOAD, replay_depth: int = 64
    ) -> None:
        self.controller = controller
        self.max_payload = max_payload
        self.framer = Framer(max_payload)
        self.stats = BridgeStats()
        self._replay: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._replay_depth = replay_depth

    def receive(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Feed received bytes; return the reply frames to send, in order."""
        out: list[bytes] = []
        for ev in self.framer.feed(data):
            if isinstance(ev, BadFrame):
                self.controller.note_error(ERR_BAD_FRAME)
                if ev.opcode & REPLY_FLAG:
                    self.stats.dropped += 1
                    continue
                status = Status.BAD_CRC if ev.reason == "crc" else Status.TOO_LARGE
                text = f"{ev.reason}: {ev.length}-byte payload (cap {self.max_payload})"
                out.append(self._error(ev.opcode, ev.seq, status, text))
                continue
            if ev.is_reply:
                self.stats.dropped += 1  # a device never acts on replies (e.g. our own echo on a loop)
                continue
            if ev.version != PROTOCOL_VERSION:
                text = f"protocol version {ev.version} is not {PROTOCOL_VERSION}"
                out.append(self._error(ev.opcode, ev.seq, Status.BAD_VERSION, text))
                continue
            key = (ev.seq, zlib.crc32(ev.payload, ev.opcode))
            cached = self._replay.get(key)
            if cached is not None:
                self.stats.replays += 1
                out.append(cached)
                continue
            self.stats.requests += 1
            status, reply = self._dispatch(ev.opcode, ev.seq, ev.payload)
            if ev.opcode == Opcode.RESET:
                self._replay.clear()
            if status in m.RETRYABLE_STATUS:
                out.append(reply)
                continue
            self._replay[key] = reply
            if len(self._replay) > self._replay_depth:
                self._replay.popitem(last=False)
            out.append(reply)
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

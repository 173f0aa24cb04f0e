"""Opcodes, status codes and every message payload: one typed class per payload, for both ends.

A message class is a frozen dataclass with ``encode() -> bytes`` and ``decode(payload) -> message`` (a payload that
does not parse is a ``PayloadError`` naming the message). ``MESSAGES`` maps each opcode to its request and OK-reply
classes; the host builds requests and decodes replies with them, the device decodes requests and builds replies
with the same classes. A non-OK reply's payload is UTF-8 text saying what was wrong.

| opcode        | request                                    | OK reply                                       |
|---------------|--------------------------------------------|------------------------------------------------|
| HELLO         | ``Hello``: max payload, token              | ``Identity``: limits, identity, MacroSpec      |
| PING          | ``Echo``: any bytes                        | ``Echo``: the same bytes                       |
| RESET         | ``Reset``: also clear weights?             | ``Empty``                                      |
| STATUS        | ``Empty``                                  | ``StatusReport``: busy, error flags, counters  |
| READ_REG      | ``RegAddr``                                | ``RegValue``                                   |
| WRITE_REG     | ``RegValue``                               | ``RegValue``: the value now held               |
| WRITE_WEIGHTS | ``WeightRows``: rows, packed weights       | ``WeightsStored``: rows, CRC-32 of rows stored |
| READ_WEIGHTS  | ``RowRange``                               | ``WeightRows``                                 |
| MAC           | ``MacInputs``: rows, batch, packed inputs  | ``MacResult``: batch, cost, packed outputs     |
| MAC_RAW       | ``MacInputs``                              | ``MacResult``: batch, cost, packed codes       |

Bulk arrays travel packed at their bit width (``cimlab.firmware_bridge.packing``): weights [n_rows, cols], inputs
[batch, n_rows], outputs [batch, cols] and codes [batch, planes, groups spanned, slices, cols], in C order. Rows
outside ``row_start .. row_start+n_rows-1`` see input 0 in MAC and MAC_RAW, and only the row groups that hold
driven rows are converted (``MacroSpec.group_span``).

HELLO starts a session. The host states the largest payload it accepts; the device answers with its own, and both
use the smaller. A device that requires a token refuses everything (DENIED) until a HELLO carries it.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import construct as cs
import numpy as np

from cimlab.firmware_bridge.controller import Counters, OpCost
from cimlab.firmware_bridge.errors import ConfigError, PayloadError
from cimlab.firmware_bridge.packing import code_field, input_field, output_field, weight_field
from cimlab.firmware_bridge.spec import WEIGHT_STORAGES, MacroSpec


class Opcode(IntEnum):
    """Request opcodes; a reply carries ``opcode | REPLY_FLAG``."""

    HELLO = 0x01
    PING = 0x02
    RESET = 0x03
    STATUS = 0x04
    READ_REG = 0x05
    WRITE_REG = 0x06
    WRITE_WEIGHTS = 0x10
    READ_WEIGHTS = 0x11
    MAC = 0x20
    MAC_RAW = 0x21


class Status(IntEnum):
    """Reply status codes."""

    OK = 0
    BAD_CRC = 1
    BAD_VERSION = 2
    UNKNOWN_OPCODE = 3
    BAD_PAYLOAD = 4
    BAD_ARGUMENT = 5
    TOO_LARGE = 6
    BUSY = 7
    """The request did not execute: the device is occupied. Sent for a request (its controller is busy: try it
    again later), or, with opcode 0 and seq 0, to a host that connects while the device serves another one (the
    connection then closes)."""
    BAD_REGISTER = 8
    READ_ONLY = 9
    INTERNAL = 10
    MISSING = 11
    """The request with this seq never arrived and later ones wait for it: send it again. The reply's opcode is
    0 (the device cannot know the missing request's opcode)."""
    DENIED = 12
    """The device needs a token: the HELLO's was wrong, or a request came before a HELLO that carried it."""


RETRYABLE_STATUS = frozenset({Status.BAD_CRC, Status.BUSY, Status.MISSING})
"""Statuses that mean "the request did not execute; send it again" (BUSY: after a while)."""

MIN_PAYLOAD = 256
"""Smallest max_payload either end may state at HELLO, bytes."""
MAX_TOKEN = 255
"""Longest token, bytes."""

_TEXT = cs.PascalString(cs.Int8ul, "utf8")
_COST = cs.Struct("cycles" / cs.Int64ul, "energy_fj" / cs.Int64ul)
_MACRO_SPEC = cs.Struct(
    "rows" / cs.Int16ul,
    "cols" / cs.Int16ul,
    "weight_bits" / cs.Int8ul,
    "weight_storage" / cs.Int8ul,
    "cell_bits" / cs.Int8ul,
    "input_bits" / cs.Int8ul,
    "input_slice_bits" / cs.Int8ul,
    "rows_per_conversion" / cs.Int16ul,
    "adc_bits" / cs.Int8ul,
    "adc_full_scale" / cs.Int32ul,
    "clock_hz" / cs.Int32ul,
)

M = TypeVar("M", bound="Message")


@dataclass(frozen=True)
class Message:
    """A payload: ``LAYOUT`` encodes the dataclass fields (overridden where a field is not a plain wire value)."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(cs.Terminated)

    def wire_fields(self) -> dict[str, Any]:
        """The values ``LAYOUT`` builds from."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_wire(cls: type[M], fields: Any) -> M:
        """The message from what ``LAYOUT`` parsed."""
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})

    def encode(self) -> bytes:
        """The payload bytes; PayloadError when a field does not fit its wire format."""
        try:
            return self.LAYOUT.build(self.wire_fields())
        except (cs.ConstructError, TypeError, ValueError, KeyError) as err:
            raise PayloadError(f"cannot encode {type(self).__name__}: {err}") from err

    @classmethod
    def decode(cls: type[M], payload: bytes) -> M:
        """The message in ``payload``; PayloadError naming the message when it does not parse."""
        try:
            fields = cls.LAYOUT.parse(payload)
        except (cs.ConstructError, UnicodeDecodeError) as err:
            raise PayloadError(f"malformed {cls.__name__} ({len(payload)} bytes): {err}") from err
        return cls.from_wire(fields)


@dataclass(frozen=True)
class Empty(Message):
    """No fields (STATUS request, RESET reply)."""


@dataclass(frozen=True)
class Echo(Message):
    """PING's request and reply: any bytes, echoed."""

    payload: bytes = b""

    def encode(self) -> bytes:
        return bytes(self.payload)

    @classmethod
    def decode(cls, payload: bytes) -> Echo:
        return cls(bytes(payload))


@dataclass(frozen=True)
class Hello(Message):
    """HELLO request: the largest payload the host accepts (bytes) and the token a device may require."""

    max_payload: int
    token: bytes = b""
    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "max_payload" / cs.Int32ul, "token" / cs.Prefixed(cs.Int8ul, cs.GreedyBytes), cs.Terminated
    )


@dataclass(frozen=True)
class Identity(Message):
    """HELLO reply: protocol and register map versions, the largest payload the device accepts (bytes), the
    chip, firmware and bitstream identity, and the MacroSpec."""

    protocol_version: int
    max_payload: int
    regmap_version: int
    chip_id: str
    firmware_id: str
    bitstream_id: str
    spec: MacroSpec
    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "protocol_version" / cs.Int8ul,
        "max_payload" / cs.Int32ul,
        "regmap_version" / cs.Int16ul,
        "chip_id" / _TEXT,
        "firmware_id" / _TEXT,
        "bitstream_id" / _TEXT,
        "spec" / _MACRO_SPEC,
        cs.Terminated,
    )

    def wire_fields(self) -> dict[str, Any]:
        fields = super().wire_fields()
        fields["spec"] = spec_to_wire(self.spec)
        return fields

    @classmethod
    def from_wire(cls, fields: Any) -> Identity:
        values = {f.name: fields[f.name] for f in dataclasses.fields(cls)}
        values["spec"] = spec_from_wire(fields["spec"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        d["spec"] = self.spec.to_dict()
        return d


@dataclass(frozen=True)
class Reset(Message):
    """RESET request: registers, FIFOs and counters to their reset state; the weights too when asked."""

    clear_weights: bool = False
    LAYOUT: ClassVar[cs.Construct] = cs.Struct("flags" / cs.Int8ul, cs.Terminated)

    def wire_fields(self) -> dict[str, Any]:
        return {"flags": int(self.clear_weights)}

    @classmethod
    def from_wire(cls, fields: Any) -> Reset:
        if fields["flags"] > 1:
            raise PayloadError(f"Reset flags 0x{fields['flags']:02x}: only bit 0 (clear weights) is defined")
        return cls(bool(fields["flags"]))


@dataclass(frozen=True)
class StatusReport(Message):
    """STATUS reply: the controller's busy flag, error flags and counters."""

    counters: Counters
    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "busy" / cs.Int8ul,
        "error_flags" / cs.Int32ul,
        "cycles" / cs.Int64ul,  # total controller cycles since reset
        "ops" / cs.Int64ul,  # MAC/MAC_RAW vectors processed since reset
        "conversions" / cs.Int64ul,  # ADC conversions since reset
        "energy_fj" / cs.Int64ul,  # total macro energy since reset, femtojoules
        "last" / _COST,  # cost of the most recent operation
        cs.Terminated,
    )

    def wire_fields(self) -> dict[str, Any]:
        c = self.counters
        return dict(busy=int(c.busy), error_flags=c.error_flags, cycles=c.cycles, ops=c.ops,
                    conversions=c.conversions, energy_fj=c.energy_fj,
                    last=dict(cycles=c.last.cycles, energy_fj=c.last.energy_fj))

    @classmethod
    def from_wire(cls, fields: Any) -> StatusReport:
        if fields.busy > 1:
            raise PayloadError(f"StatusReport busy flag {fields.busy} is neither 0 nor 1")
        return cls(Counters(
            busy=bool(fields.busy), error_flags=fields.error_flags, cycles=fields.cycles, ops=fields.ops,
            conversions=fields.conversions, energy_fj=fields.energy_fj,
            last=OpCost(fields.last.cycles, fields.last.energy_fj),
        ))


@dataclass(frozen=True)
class RegAddr(Message):
    """READ_REG request: a register address."""

    addr: int
    LAYOUT: ClassVar[cs.Construct] = cs.Struct("addr" / cs.Int16ul, cs.Terminated)


@dataclass(frozen=True)
class RegValue(Message):
    """WRITE_REG request, and the reply of both register commands: an address and a 32-bit value."""

    addr: int
    value: int
    LAYOUT: ClassVar[cs.Construct] = cs.Struct("addr" / cs.Int16ul, "value" / cs.Int32ul, cs.Terminated)


@dataclass(frozen=True)
class RowRange(Message):
    """READ_WEIGHTS request: rows ``row_start .. row_start+n_rows-1``."""

    row_start: int
    n_rows: int
    LAYOUT: ClassVar[cs.Construct] = cs.Struct("row_start" / cs.Int16ul, "n_rows" / cs.Int16ul, cs.Terminated)


@dataclass(frozen=True)
class WeightRows(Message):
    """WRITE_WEIGHTS request and READ_WEIGHTS reply: weight rows, packed at ``weight_bits``."""

    row_start: int
    n_rows: int
    data: bytes
    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "row_start" / cs.Int16ul, "n_rows" / cs.Int16ul, "data" / cs.GreedyBytes
    )

    @classmethod
    def of(cls, spec: MacroSpec, row_start: int, weights: np.ndarray) -> WeightRows:
        """Logical weights [n_rows, cols] at ``row_start``, packed."""
        return cls(row_start, weights.shape[0], weight_field(spec).pack(weights, "weights"))

    def weights(self, spec: MacroSpec) -> np.ndarray:
        """The logical weights [n_rows, cols] (int64); PayloadError when the data does not hold them."""
        values = weight_field(spec).unpack(self.data, self.n_rows * spec.cols, f"{self.n_rows} weight rows")
        return values.reshape(self.n_rows, spec.cols)


@dataclass(frozen=True)
class WeightsStored(Message):
    """WRITE_WEIGHTS reply: the rows written and the CRC-32 of their packed contents as stored."""

    row_start: int
    n_rows: int
    crc: int
    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "row_start" / cs.Int16ul, "n_rows" / cs.Int16ul, "crc" / cs.Int32ul, cs.Terminated
    )

    @classmethod
    def of(cls, spec: MacroSpec, row_start: int, stored: np.ndarray) -> WeightsStored:
        """The acknowledgement of rows ``stored`` [n_rows, cols] at ``row_start``."""
        return cls(row_start, stored.shape[0], zlib.crc32(weight_field(spec).pack(stored, "stored weights")))


@dataclass(frozen=True)
class MacInputs(Message):
    """MAC and MAC_RAW request: ``batch`` input vectors driving rows ``row_start .. +n_rows``, packed."""

    row_start: int
    n_rows: int
    batch: int
    data: bytes
    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "row_start" / cs.Int16ul, "n_rows" / cs.Int16ul, "batch" / cs.Int16ul, "data" / cs.GreedyBytes
    )

    @classmethod
    def of(cls, spec: MacroSpec, row_start: int, inputs: np.ndarray) -> MacInputs:
        """Input codes [batch, n_rows] driving rows from ``row_start``, packed."""
        batch, n_rows = inputs.shape
        return cls(row_start, n_rows, batch, input_field(spec).pack(inputs, "inputs"))

    def inputs(self, spec: MacroSpec) -> np.ndarray:
        """The input codes [batch, n_rows] (int64); PayloadError when the data does not hold them."""
        values = input_field(spec).unpack(self.data, self.batch * self.n_rows, f"{self.batch} input vectors")
        return values.reshape(self.batch, self.n_rows)


@dataclass(frozen=True)
class MacResult(Message):
    """MAC and MAC_RAW reply: the batch, what it cost the chip, and the packed outputs or codes."""

    batch: int
    cost: OpCost
    data: bytes
    LAYOUT: ClassVar[cs.Construct] = cs.Struct("batch" / cs.Int16ul, "cost" / _COST, "data" / cs.GreedyBytes)

    def wire_fields(self) -> dict[str, Any]:
        return dict(batch=self.batch, cost=dict(cycles=self.cost.cycles, energy_fj=self.cost.energy_fj),
                    data=self.data)

    @classmethod
    def from_wire(cls, fields: Any) -> MacResult:
        return cls(fields.batch, OpCost(fields.cost.cycles, fields.cost.energy_fj), fields.data)

    @classmethod
    def of_outputs(cls, spec: MacroSpec, req: MacInputs, outputs: np.ndarray, cost: OpCost) -> MacResult:
        """MAC's reply to ``req``: outputs [batch, cols] packed at the width the request's rows need."""
        field = output_field(spec, req.row_start, req.n_rows)
        return cls(req.batch, cost, field.pack(outputs, "MAC outputs"))

    @classmethod
    def of_codes(cls, spec: MacroSpec, req: MacInputs, codes: np.ndarray, cost: OpCost) -> MacResult:
        """MAC_RAW's reply to ``req``: codes [batch, planes, groups spanned, slices, cols] at ``adc_bits``."""
        return cls(req.batch, cost, code_field(spec).pack(codes, "ADC codes"))

    def outputs(self, spec: MacroSpec, row_start: int, n_rows: int) -> np.ndarray:
        """MAC outputs [batch, cols] (int64) of a request for rows ``row_start .. +n_rows``."""
        field = output_field(spec, row_start, n_rows)
        return field.unpack(self.data, self.batch * spec.cols, "MAC outputs").reshape(self.batch, spec.cols)

    def codes(self, spec: MacroSpec, row_start: int, n_rows: int) -> np.ndarray:
        """MAC_RAW codes [batch, planes, groups spanned, slices, cols] (int64) of a request for those rows."""
        shape = (self.batch, *spec.raw_shape_for(row_start, n_rows))
        return code_field(spec).unpack(self.data, int(np.prod(shape)), "ADC codes").reshape(shape)


@dataclass(frozen=True)
class MessageDef:
    """The request and OK-reply classes of one opcode."""

    request: type[Message]
    reply: type[Message]


MESSAGES: dict[Opcode, MessageDef] = {
    Opcode.HELLO: MessageDef(Hello, Identity),
    Opcode.PING: MessageDef(Echo, Echo),
    Opcode.RESET: MessageDef(Reset, Empty),
    Opcode.STATUS: MessageDef(Empty, StatusReport),
    Opcode.READ_REG: MessageDef(RegAddr, RegValue),
    Opcode.WRITE_REG: MessageDef(RegValue, RegValue),
    Opcode.WRITE_WEIGHTS: MessageDef(WeightRows, WeightsStored),
    Opcode.READ_WEIGHTS: MessageDef(RowRange, WeightRows),
    Opcode.MAC: MessageDef(MacInputs, MacResult),
    Opcode.MAC_RAW: MessageDef(MacInputs, MacResult),
}

MAC_REQUEST_FIXED = len(MacInputs(0, 0, 0, b"").encode())
"""Bytes of a MAC/MAC_RAW request before its input data."""
MAC_REPLY_FIXED = len(MacResult(0, OpCost(0, 0), b"").encode())
"""Bytes of a MAC/MAC_RAW reply before its output data."""
ROWS_FIXED = len(WeightRows(0, 0, b"").encode())
"""Bytes of a WRITE_WEIGHTS request / READ_WEIGHTS reply before its data."""


def decode_request(opcode: int, payload: bytes) -> Message:
    """The request ``payload`` of ``opcode``; PayloadError for an unknown opcode or a payload that does not parse."""
    return _definition(opcode).request.decode(payload)


def decode_reply(opcode: int, payload: bytes) -> Message:
    """The OK reply ``payload`` of request ``opcode``; PayloadError as ``decode_request``."""
    return _definition(opcode).reply.decode(payload)


def _definition(opcode: int) -> MessageDef:
    try:
        return MESSAGES[Opcode(opcode)]
    except ValueError:
        raise PayloadError(f"unknown opcode 0x{opcode:02x}") from None


def opcode_name(opcode: int) -> str:
    """Readable name of a request or reply opcode (``MAC>`` a request, ``MAC<`` its reply)."""
    from cimlab.firmware_bridge.frame import REPLY_FLAG

    base = opcode & ~REPLY_FLAG
    try:
        name = Opcode(base).name
    except ValueError:
        name = f"0x{base:02x}"
    return name + ("<" if opcode & REPLY_FLAG else ">")


def spec_to_wire(spec: MacroSpec) -> dict[str, int]:
    """MacroSpec -> the fields of its wire layout."""
    d = spec.to_dict()
    d["weight_storage"] = WEIGHT_STORAGES.index(spec.weight_storage)
    return d


def spec_from_wire(fields: Any) -> MacroSpec:
    """The fields of the MacroSpec wire layout -> MacroSpec; an invalid spec is a PayloadError naming the field."""
    d = {k: v for k, v in dict(fields).items() if not k.startswith("_")}
    storage = d.get("weight_storage", -1)
    if not 0 <= storage < len(WEIGHT_STORAGES):
        raise PayloadError(f"MacroSpec.weight_storage code {storage} is unknown")
    d["weight_storage"] = WEIGHT_STORAGES[storage]
    try:
        return MacroSpec.from_dict(d)
    except ConfigError as err:
        raise PayloadError(f"the peer reported an invalid MacroSpec: {err}") from err

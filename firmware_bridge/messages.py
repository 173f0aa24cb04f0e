"""Opcodes, status codes and every message payload, defined once with ``construct`` for both ends.

A reply has the request's opcode with ``REPLY_FLAG`` set, the request's ``seq`` and a status. A non-OK reply's
payload is a UTF-8 message saying what was wrong. Bulk arrays travel as raw little-endian bytes whose dtype and
shape follow from the MacroSpec (see ``cimlab.firmware_bridge.spec``); the fixed fields before them are below.

| opcode        | request                                  | OK reply                                        |
|---------------|------------------------------------------|-------------------------------------------------|
| HELLO         | (empty)                                  | identity, limits, MacroSpec                     |
| PING          | any bytes                                | the same bytes                                  |
| RESET         | flags (bit 0: also clear weights)        | (empty)                                         |
| STATUS        | (empty)                                  | busy, error flags, cycle/op/energy counters     |
| READ_REG      | addr                                     | addr, value                                     |
| WRITE_REG     | addr, value                              | addr, value now held                            |
| WRITE_WEIGHTS | row_start, n_rows, weights [n_rows,cols] | row_start, n_rows, CRC-32 of the rows stored    |
| READ_WEIGHTS  | row_start, n_rows                        | row_start, n_rows, weights [n_rows, cols]       |
| MAC           | row_start, n_rows, batch, x [batch,n_rows]| batch, cost, y [batch, cols] int32             |
| MAC_RAW       | row_start, n_rows, batch, x [batch,n_rows]| batch, cost, codes [batch, P, G', K, cols]     |

Rows outside ``row_start .. row_start+n_rows-1`` see input 0 in MAC and MAC_RAW, and only the row groups G' that
hold driven rows are converted (``MacroSpec.group_span``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import construct as cs

from cimlab.firmware_bridge.errors import ConfigError, PayloadError
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
    BAD_REGISTER = 8
    READ_ONLY = 9
    INTERNAL = 10
    MISSING = 11
    """The request with this seq never arrived and later ones wait for it: send it again. The reply's opcode is
    0 (the device cannot know the missing request's opcode)."""


RETRYABLE_STATUS = frozenset({Status.BAD_CRC, Status.BUSY, Status.MISSING})
"""Statuses that mean "send it again": the request never executed."""

MACRO_SPEC = cs.Struct(
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

_TEXT = cs.PascalString(cs.Int8ul, "utf8")

COST = cs.Struct(
    "cycles" / cs.Int64ul,  # controller clock cycles the operation took
    "energy_fj" / cs.Int64ul,  # estimated macro energy, femtojoules
)

EMPTY = cs.Struct(cs.Terminated)
HELLO_REPLY = cs.Struct(
    "protocol_version" / cs.Int8ul,
    "max_payload" / cs.Int32ul,
    "regmap_version" / cs.Int16ul,
    "chip_id" / _TEXT,
    "firmware_id" / _TEXT,
    "bitstream_id" / _TEXT,
    "spec" / MACRO_SPEC,
    cs.Terminated,
)
RESET_REQUEST = cs.Struct("flags" / cs.Int8ul, cs.Terminated)
STATUS_REPLY = cs.Struct(
    "busy" / cs.Int8ul,
    "error_flags" / cs.Int32ul,
    "cycles" / cs.Int64ul,  # total controller cycles since reset
    "ops" / cs.Int64ul,  # MAC/MAC_RAW vectors processed since reset
    "conversions" / cs.Int64ul,  # ADC conversions since reset
    "energy_fj" / cs.Int64ul,  # total macro energy since reset, femtojoules
    "last" / COST,  # cost of the most recent operation
    cs.Terminated,
)
REG_ADDR = cs.Struct("addr" / cs.Int16ul, cs.Terminated)
REG_VALUE = cs.Struct("addr" / cs.Int16ul, "value" / cs.Int32ul, cs.Terminated)
ROWS = cs.Struct("row_start" / cs.Int16ul, "n_rows" / cs.Int16ul, cs.Terminated)
ROWS_DATA = cs.Struct("row_start" / cs.Int16ul, "n_rows" / cs.Int16ul, "data" / cs.GreedyBytes)
WRITE_WEIGHTS_REPLY = cs.Struct(
    "row_start" / cs.Int16ul, "n_rows" / cs.Int16ul, "crc" / cs.Int32ul, cs.Terminated
)
MAC_REQUEST = cs.Struct(
    "row_start" / cs.Int16ul, "n_rows" / cs.Int16ul, "batch" / cs.Int16ul, "data" / cs.GreedyBytes
)
MAC_REPLY = cs.Struct("batch" / cs.Int16ul, "cost" / COST, "data" / cs.GreedyBytes)
ERROR_REPLY = cs.GreedyString("utf8")

MAC_REQUEST_FIXED = 6
"""Bytes of a MAC/MAC_RAW request before its input data."""
MAC_REPLY_FIXED = 2 + COST.sizeof()
"""Bytes of a MAC/MAC_RAW reply before its output data."""
ROWS_FIXED = 4
"""Bytes of a WRITE_WEIGHTS request / READ_WEIGHTS reply before its data."""


@dataclass(frozen=True)
class MessageDef:
    """How one opcode's request and OK reply are encoded."""

    request: cs.Construct
    reply: cs.Construct
    idempotent: bool
    doc: str


MESSAGES: dict[Opcode, MessageDef] = {
    Opcode.HELLO: MessageDef(EMPTY, HELLO_REPLY, True, "identity, limits and MacroSpec"),
    Opcode.PING: MessageDef(cs.GreedyBytes, cs.GreedyBytes, True, "echo the payload"),
    Opcode.RESET: MessageDef(RESET_REQUEST, EMPTY, True, "reset state (and weights when flags bit 0)"),
    Opcode.STATUS: MessageDef(EMPTY, STATUS_REPLY, True, "busy, error flags and counters"),
    Opcode.READ_REG: MessageDef(REG_ADDR, REG_VALUE, True, "read one 32-bit register"),
    Opcode.WRITE_REG: MessageDef(REG_VALUE, REG_VALUE, True, "write one 32-bit register"),
    Opcode.WRITE_WEIGHTS: MessageDef(ROWS_DATA, WRITE_WEIGHTS_REPLY, True, "program weight rows"),
    Opcode.READ_WEIGHTS: MessageDef(ROWS, ROWS_DATA, True, "read weight rows back"),
    # MAC and MAC_RAW draw fresh noise when executed, so they are retried only because the device's replay
    # cache answers a retried seq with the reply it already sent (exactly-once execution).
    Opcode.MAC: MessageDef(MAC_REQUEST, MAC_REPLY, True, "batch of MACs, recombined outputs"),
    Opcode.MAC_RAW: MessageDef(MAC_REQUEST, MAC_REPLY, True, "batch of MACs, raw ADC codes"),
}


def _message(opcode: int) -> MessageDef:
    try:
        return MESSAGES[Opcode(opcode)]
    except ValueError:
        raise PayloadError(f"unknown opcode 0x{opcode:02x}") from None


def build_request(opcode: Opcode, **fields: Any) -> bytes:
    """Encode a request payload from its fields (``data=`` for bulk bytes, ``payload=`` for PING)."""
    msg = _message(opcode)
    if msg.request is cs.GreedyBytes:
        return bytes(fields.get("payload", b""))
    try:
        return msg.request.build(fields)
    except KeyError as err:
        raise PayloadError(f"cannot encode {Opcode(opcode).name} request: missing field {err}") from err
    except (cs.ConstructError, TypeError, ValueError) as err:
        raise PayloadError(f"cannot encode {Opcode(opcode).name} request: {err}") from err


def build_reply(opcode: Opcode, **fields: Any) -> bytes:
    """Encode an OK reply payload from its fields."""
    msg = _message(opcode)
    if msg.reply is cs.GreedyBytes:
        return bytes(fields.get("payload", b""))
    try:
        return msg.reply.build(fields)
    except KeyError as err:
        raise PayloadError(f"cannot encode {Opcode(opcode).name} reply: missing field {err}") from err
    except (cs.ConstructError, TypeError, ValueError) as err:
        raise PayloadError(f"cannot encode {Opcode(opcode).name} reply: {err}") from err


def _parse(construct_: cs.Construct, payload: bytes, what: str) -> Any:
    if construct_ is cs.GreedyBytes:
        return bytes(payload)
    try:
        return construct_.parse(payload)
    except (cs.ConstructError, UnicodeDecodeError) as err:
        raise PayloadError(f"malformed {what} ({len(payload)} bytes): {err}") from err


def parse_request(opcode: int, payload: bytes) -> Any:
    """Decode a request payload; raises PayloadError naming the opcode when it does not parse."""
    return _parse(_message(opcode).request, payload, f"{_name(opcode)} request")


def parse_reply(opcode: int, payload: bytes) -> Any:
    """Decode an OK reply payload; raises PayloadError naming the opcode when it does not parse."""
    return _parse(_message(opcode).reply, payload, f"{_name(opcode)} reply")


def _name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"0x{opcode:02x}"


def opcode_name(opcode: int) -> str:
    """Readable name of a request or reply opcode."""
    from cimlab.firmware_bridge.frame import REPLY_FLAG

    base = _name(opcode & ~REPLY_FLAG)
    return base + ("<" if opcode & REPLY_FLAG else ">")


def spec_to_wire(spec: MacroSpec) -> dict[str, int]:
    """MacroSpec -> the fields of ``MACRO_SPEC``."""
    d = spec.to_dict()
    d["weight_storage"] = WEIGHT_STORAGES.index(spec.weight_storage)
    return d


def spec_from_wire(fields: Any) -> MacroSpec:
    """The fields of ``MACRO_SPEC`` -> MacroSpec; an invalid spec is a PayloadError naming the field."""
    d = {k: v for k, v in dict(fields).items() if not k.startswith("_")}
    storage = d.get("weight_storage", -1)
    if not 0 <= storage < len(WEIGHT_STORAGES):
        raise PayloadError(f"MacroSpec.weight_storage code {storage} is unknown")
    d["weight_storage"] = WEIGHT_STORAGES[storage]
    try:
        return MacroSpec.from_dict(d)
    except ConfigError as err:
        raise PayloadError(f"the peer reported an invalid MacroSpec: {err}") from err

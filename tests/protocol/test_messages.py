"""Every message class in messages.MESSAGES: bytes -> message -> bytes round trips, malformed payloads, hand-written
payload vectors, and the MacroSpec on the wire."""

from __future__ import annotations

import struct
from typing import Any

import construct as cs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.controller import OpCost
from cimlab.firmware_bridge.errors import PayloadError
from cimlab.firmware_bridge.messages import MESSAGES, Opcode
from cimlab.firmware_bridge.spec import WEIGHT_STORAGES, MacroSpec


# ---- strategies derived from the construct layouts -----------------------------------------------------------
def strategy_for(con: cs.Construct) -> st.SearchStrategy[Any]:
    """Values that ``con`` can build: ints in the field's range, short UTF-8 text, bytes, nested structs.

    An unfamiliar construct fails the test, so a message added with a new kind of field must be covered here.
    """
    if isinstance(con, cs.Renamed):
        return strategy_for(con.subcon)
    if isinstance(con, cs.FormatField):
        bits = 8 * struct.calcsize(con.fmtstr)
        if con.fmtstr[-1].islower():
            return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return st.integers(0, 2**bits - 1)
    if isinstance(con, cs.StringEncoded):
        # PascalString(Int8ul): up to 255 encoded bytes; 60 characters are at most 240 UTF-8 bytes
        return st.text(max_size=60)
    if con is cs.GreedyBytes:
        return st.binary(max_size=200)
    if isinstance(con, cs.Prefixed):
        return st.binary(max_size=255)
    if isinstance(con, cs.Struct):
        fields = {sc.name: strategy_for(sc) for sc in con.subcons if sc.name is not None}
        for sc in con.subcons:
            if sc.name is None and sc is not cs.Terminated:
                raise AssertionError(f"unnamed field {sc!r} has no strategy")
        return st.fixed_dictionaries(fields)
    raise AssertionError(f"no strategy for {con!r}: extend strategy_for")


CLASSES = sorted({c for d in MESSAGES.values() for c in (d.request, d.reply)}, key=lambda c: c.__name__)
CLASS_IDS = [c.__name__ for c in CLASSES]


def wire_values(cls: type[m.Message], data: st.DataObject) -> bytes:
    """A payload of ``cls`` built from drawn wire values (a valid MacroSpec for Identity)."""
    if cls is m.Echo:
        return data.draw(st.binary(max_size=200))
    fields = data.draw(strategy_for(cls.LAYOUT))
    for flag in ("flags", "busy"):  # one-bit flags on the wire: other values are malformed
        if flag in fields:
            fields[flag] = data.draw(st.integers(0, 1))
    if cls is m.Identity:
        fields["spec"] = m.spec_to_wire(data.draw(valid_specs()))
    return cls.LAYOUT.build(fields)


def test_every_opcode_has_a_message() -> None:
    assert set(MESSAGES) == set(Opcode)


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bytes_round_trip_through_the_message(cls: type[m.Message], data: st.DataObject) -> None:
    payload = wire_values(cls, data)
    msg = cls.decode(payload)
    assert isinstance(msg, cls)
    assert msg.encode() == payload
    assert cls.decode(msg.encode()) == msg


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=120))
def test_random_payload_decodes_or_raises_payload_error(cls: type[m.Message], payload: bytes) -> None:
    try:
        cls.decode(payload)
    except PayloadError as err:
        assert cls.__name__ in str(err) or "MacroSpec" in str(err)


@pytest.mark.parametrize("cls", [c for c in CLASSES if c is not m.Echo], ids=[c.__name__ for c in CLASSES
                                                                               if c is not m.Echo])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_truncated_and_extended_payloads_are_payload_errors(cls: type[m.Message], data: st.DataObject) -> None:
    payload = wire_values(cls, data)
    greedy_tail = any(sc.name == "data" for sc in cls.LAYOUT.subcons)
    fixed = len(payload) - len(getattr(cls.decode(payload), "data", b""))
    for cut in range(len(payload)):
        if cut < fixed or not greedy_tail:
            with pytest.raises(PayloadError):
                cls.decode(payload[:cut])
    if not greedy_tail:
        with pytest.raises(PayloadError, match="malformed"):
            cls.decode(payload + b"\x00")


def test_fixed_sizes_match_the_definitions() -> None:
    assert len(m.MacInputs(0, 0, 0, b"").encode()) == m.MAC_REQUEST_FIXED == 6
    assert len(m.MacResult(0, OpCost(0, 0), b"").encode()) == m.MAC_REPLY_FIXED == 18
    assert len(m.WeightRows(0, 0, b"").encode()) == m.ROWS_FIXED == 4


def test_wire_layout_of_a_few_payloads() -> None:
    # little-endian, no padding, fields in the documented order
    assert m.RegAddr(0x0203).encode() == bytes.fromhex("0302")
    assert m.RegValue(3, 0xDEADBEEF).encode() == bytes.fromhex("0300efbeadde")
    assert m.MacInputs(1, 2, 3, b"\x09").encode() == bytes.fromhex("01000200030009")
    assert m.Reset(True).encode() == b"\x01" and m.Reset().encode() == b"\x00"
    # HELLO: max_payload (LE32), then the token with a one-byte length
    assert m.Hello(65536).encode() == bytes.fromhex("0000010000")
    assert m.Hello(300, b"k3y").encode() == bytes.fromhex("2c010000036b3379")
    assert m.Empty().encode() == b""


def test_packed_arrays_by_hand() -> None:
    """Bulk arrays travel at their bit width, least significant bits first (vectors written out by hand)."""
    spec = MacroSpec(rows=4, cols=2, rows_per_conversion=4)  # 4-bit two's complement weights, 4-bit inputs
    # weights [[1, -2], [3, -8], [7, 0], [-1, 5]] -> nibbles 1, e, 3, 8, 7, 0, f, 5 -> bytes e1 83 07 5f
    rows = m.WeightRows.of(spec, 2, np.array([[1, -2], [3, -8], [7, 0], [-1, 5]]))
    assert rows.encode() == bytes.fromhex("02000400") + bytes.fromhex("e183075f")
    np.testing.assert_array_equal(m.WeightRows.decode(rows.encode()).weights(spec), [[1, -2], [3, -8], [7, 0], [-1, 5]])
    # inputs [[15, 0, 9]] at row 1 -> nibbles f, 0, 9 -> 0f 09
    assert m.MacInputs.of(spec, 1, np.array([[15, 0, 9]])).encode() == bytes.fromhex("010003000100") + bytes.fromhex(
        "0f09")
    # MAC outputs of one row group: -(31*15*8) .. 31*15*7 = -3720 .. 3255 -> 13-bit two's complement
    req = m.MacInputs.of(spec, 0, np.zeros((1, 4), dtype=np.int64))
    reply = m.MacResult.of_outputs(spec, req, np.array([[-1, 1]]), OpCost(2, 3))
    # -1 = 1fff (13 bits), then 1 << 13: bits 0..12 set, bit 13 set -> ff 3f 00 00 (26 bits in 4 bytes)
    assert reply.data == bytes.fromhex("ff3f0000")
    np.testing.assert_array_equal(reply.outputs(spec, 0, 4), [[-1, 1]])
    # MAC_RAW codes at adc_bits = 5: 31, 1, 2, 0 ... -> bits 11111 10000 01000 00000 ... -> bytes 3f 08 ...
    codes = np.array([31, 1, 2] + [0] * (spec.n_planes * spec.n_slices * spec.cols - 3)).reshape(
        1, spec.n_planes, 1, spec.n_slices, spec.cols)
    raw = m.MacResult.of_codes(spec, req, codes, OpCost(0, 0))
    assert raw.data[:2] == bytes.fromhex("3f08") and len(raw.data) == 4 * 4 * 2 * 5 // 8
    np.testing.assert_array_equal(raw.codes(spec, 0, 4), codes)


def test_undefined_flag_values_are_payload_errors() -> None:
    with pytest.raises(PayloadError, match="Reset flags"):
        m.Reset.decode(b"\x02")
    busy = m.StatusReport.LAYOUT.build(dict(busy=2, error_flags=0, cycles=0, ops=0, conversions=0, energy_fj=0,
                                            last=dict(cycles=0, energy_fj=0)))
    with pytest.raises(PayloadError, match="busy"):
        m.StatusReport.decode(busy)


def test_arrays_that_do_not_match_their_header_are_payload_errors() -> None:
    spec = MacroSpec(rows=4, cols=2, rows_per_conversion=4)
    with pytest.raises(PayloadError, match="weight rows"):
        m.WeightRows(0, 4, b"\x00" * 3).weights(spec)
    with pytest.raises(PayloadError, match="input vectors"):
        m.MacInputs(0, 4, 2, b"\x00" * 5).inputs(spec)


def test_unknown_opcodes_are_payload_errors() -> None:
    for opcode in (0x00, 0x7F, 0x81, 0xFF):
        with pytest.raises(PayloadError, match=f"0x{opcode:02x}"):
            m.decode_request(opcode, b"")
        with pytest.raises(PayloadError):
            m.decode_reply(opcode, b"")


def _identity(**changes: Any) -> m.Identity:
    fields = dict(protocol_version=2, max_payload=65536, regmap_version=2, chip_id="ab", firmware_id="",
                  bitstream_id="", spec=MacroSpec())
    fields.update(changes)
    return m.Identity(**fields)


def test_bad_utf8_in_hello_is_a_payload_error() -> None:
    good = _identity().encode()
    assert good[7:10] == b"\x02ab"  # chip_id: length byte, then its UTF-8 bytes
    bad = good[:8] + b"\xff\xfe" + good[10:]
    with pytest.raises(PayloadError, match="Identity"):
        m.Identity.decode(bad)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (m.RegAddr(70000), "addr"),
        (m.RegValue(1, -1), "value"),
        (m.MacInputs(0, 1, 1, 5), "MacInputs"),  # type: ignore[arg-type]
        (m.Hello(65536, bytes(256)), "token"),
    ],
)
def test_encoding_bad_fields_is_a_payload_error_naming_it(message: m.Message, field: str) -> None:
    with pytest.raises(PayloadError, match=field):
        message.encode()


def test_opcode_names() -> None:
    assert m.opcode_name(Opcode.MAC) == "MAC>"
    assert m.opcode_name(Opcode.MAC | 0x80) == "MAC<"
    assert m.opcode_name(0x55) == "0x55>"


# ---- the MacroSpec on the wire ---------------------------------------------------------------------------------
def _max_output(spec: dict) -> int:
    """Largest |MAC output| a spec allows, from first principles (sums of plane and slice weights)."""
    n_groups = -(-spec["rows"] // spec["rows_per_conversion"])
    n_planes = -(-spec["input_bits"] // spec["input_slice_bits"])
    n_slices = -(-spec["weight_bits"] // spec["cell_bits"])
    plane_sum = sum(2 ** (spec["input_slice_bits"] * p) for p in range(n_planes))
    slice_sum = sum(2 ** (spec["cell_bits"] * k) for k in range(n_slices))
    if spec["weight_storage"] == "differential":  # two arrays, each a magnitude
        slice_sum *= 2
    offset = 2 ** (spec["weight_bits"] - 1) if spec["weight_storage"] == "offset" else 0
    return n_groups * plane_sum * slice_sum, offset * spec["rows"] * (2 ** spec["input_bits"] - 1)


@st.composite
def valid_specs(draw: st.DrawFn) -> MacroSpec:
    """Any MacroSpec that validates, boundaries included."""
    r = MacroSpec.FIELD_RANGES
    d: dict[str, Any] = {}
    d["weight_storage"] = draw(st.sampled_from(WEIGHT_STORAGES))
    d["rows"] = draw(st.integers(*r["rows"]))
    d["rows_per_conversion"] = draw(st.integers(1, d["rows"]))
    d["cols"] = draw(st.integers(*r["cols"]))
    twos = d["weight_storage"] == "twos"
    d["cell_bits"] = 1 if twos else draw(st.integers(*r["cell_bits"]))
    d["weight_bits"] = draw(st.integers(2 if twos else 1, r["weight_bits"][1]))
    d["input_bits"] = draw(st.integers(*r["input_bits"]))
    d["input_slice_bits"] = draw(st.integers(1, d["input_bits"]))
    d["adc_bits"] = draw(st.integers(*r["adc_bits"]))
    d["clock_hz"] = draw(st.integers(*r["clock_hz"]))
    per_fs, offset = _max_output(d)
    top = min((2**31 - 1 - offset) // per_fs, r["adc_full_scale"][1])
    if top < 1:
        # too many levels for any ADC full scale: shrink the input to one bit and the array to one group
        d.update(input_bits=1, input_slice_bits=1, rows=d["rows_per_conversion"])
        per_fs, offset = _max_output(d)
        top = min((2**31 - 1 - offset) // per_fs, r["adc_full_scale"][1])
    if top < 1:
        d.update(rows=1, rows_per_conversion=1)
        per_fs, offset = _max_output(d)
        top = min((2**31 - 1 - offset) // per_fs, r["adc_full_scale"][1])
    d["adc_full_scale"] = draw(st.integers(1, top))
    return MacroSpec(**d)


@settings(max_examples=200, deadline=None)
@given(spec=valid_specs())
def test_spec_round_trips_through_the_wire(spec: MacroSpec) -> None:
    fields = m.spec_to_wire(spec)
    raw = m._MACRO_SPEC.build(fields)
    assert len(raw) == m._MACRO_SPEC.sizeof()
    assert m.spec_from_wire(m._MACRO_SPEC.parse(raw)) == spec
    hello = _identity(chip_id="chip", firmware_id="fw", bitstream_id="bs", spec=spec)
    assert m.Identity.decode(hello.encode()) == hello


def test_spec_at_its_field_maxima_round_trips() -> None:
    r = MacroSpec.FIELD_RANGES
    wide = MacroSpec(
        rows=r["rows"][1],
        cols=r["cols"][1],
        rows_per_conversion=r["rows_per_conversion"][1],
        input_bits=1,
        weight_bits=2,
        adc_full_scale=1,
        adc_bits=r["adc_bits"][1],
        clock_hz=r["clock_hz"][1],
    )
    deep = MacroSpec(
        rows=1,
        cols=1,
        rows_per_conversion=1,
        weight_bits=1,
        weight_storage="unsigned",
        cell_bits=r["cell_bits"][1],
        input_bits=1,
        adc_full_scale=r["adc_full_scale"][1],
    )
    for spec in (wide, deep):
        assert m.spec_from_wire(m._MACRO_SPEC.parse(m._MACRO_SPEC.build(m.spec_to_wire(spec)))) == spec


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"weight_storage": 4}, "weight_storage"),
        ({"rows": 0}, "rows"),
        ({"rows_per_conversion": 300}, "rows_per_conversion"),
        ({"cell_bits": 2}, "weight_storage"),  # twos needs 1-bit cells
        ({"input_slice_bits": 9}, "input_slice_bits"),
    ],
)
def test_invalid_spec_from_the_wire_is_a_payload_error(change: dict, field: str) -> None:
    fields = m.spec_to_wire(MacroSpec())
    fields.update(change)
    parsed = m._MACRO_SPEC.parse(m._MACRO_SPEC.build(fields))
    with pytest.raises(PayloadError, match=field):
        m.spec_from_wire(parsed)

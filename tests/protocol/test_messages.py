"""Every message in messages.MESSAGES: build -> parse round trips, malformed payloads, MacroSpec on the wire."""

from __future__ import annotations

import struct
from typing import Any

import construct as cs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.errors import PayloadError
from cimlab.firmware_bridge.messages import MESSAGES, Opcode
from cimlab.firmware_bridge.spec import WEIGHT_STORAGES, MacroSpec


# ---- strategies derived from the construct definitions -------------------------------------------------------
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
    if isinstance(con, cs.Struct):
        fields = {sc.name: strategy_for(sc) for sc in con.subcons if sc.name is not None}
        for sc in con.subcons:
            if sc.name is None and sc is not cs.Terminated:
                raise AssertionError(f"unnamed field {sc!r} has no strategy")
        return st.fixed_dictionaries(fields)
    raise AssertionError(f"no strategy for {con!r}: extend strategy_for")


def plain(value: Any) -> Any:
    """A parsed Container as plain dicts, without construct's private ``_io`` entries."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not str(k).startswith("_")}
    return value


def build(opcode: Opcode, kind: str, fields: Any) -> bytes:
    maker = m.build_request if kind == "request" else m.build_reply
    if isinstance(fields, bytes):  # PING: GreedyBytes, passed as payload=
        return maker(opcode, payload=fields)
    return maker(opcode, **fields)


def parse(opcode: int, kind: str, payload: bytes) -> Any:
    return (m.parse_request if kind == "request" else m.parse_reply)(opcode, payload)


CASES = [(op, kind) for op in MESSAGES for kind in ("request", "reply")]
CASE_IDS = [f"{op.name}-{kind}" for op, kind in CASES]


def test_every_opcode_has_a_message() -> None:
    assert set(MESSAGES) == set(Opcode)


@pytest.mark.parametrize(("opcode", "kind"), CASES, ids=CASE_IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(opcode: Opcode, kind: str, data: st.DataObject) -> None:
    con = getattr(MESSAGES[opcode], kind)
    fields = data.draw(strategy_for(con))
    payload = build(opcode, kind, fields)
    assert plain(parse(int(opcode), kind, payload)) == fields


@pytest.mark.parametrize(("opcode", "kind"), CASES, ids=CASE_IDS)
@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=120))
def test_random_payload_parses_or_raises_payload_error(opcode: Opcode, kind: str, payload: bytes) -> None:
    try:
        parse(opcode, kind, payload)
    except PayloadError as err:
        assert opcode.name in str(err)


@pytest.mark.parametrize(("opcode", "kind"), CASES, ids=CASE_IDS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_truncated_and_extended_payloads_are_payload_errors(
    opcode: Opcode, kind: str, data: st.DataObject
) -> None:
    con = getattr(MESSAGES[opcode], kind)
    if con is cs.GreedyBytes:
        return  # PING carries any bytes
    payload = build(opcode, kind, data.draw(strategy_for(con)))
    greedy_tail = any(sc.name == "data" for sc in con.subcons)
    fixed = len(payload) - len(plain(parse(opcode, kind, payload)).get("data", b""))
    for cut in range(len(payload)):
        if cut < fixed or not greedy_tail:
            with pytest.raises(PayloadError):
                parse(opcode, kind, payload[:cut])
    if not greedy_tail:
        with pytest.raises(PayloadError, match="malformed"):
            parse(opcode, kind, payload + b"\x00")


def test_fixed_sizes_match_the_definitions() -> None:
    assert len(m.build_request(Opcode.MAC, row_start=0, n_rows=0, batch=0, data=b"")) == m.MAC_REQUEST_FIXED
    zero_cost = dict(cycles=0, energy_fj=0)
    assert len(m.build_reply(Opcode.MAC_RAW, batch=0, cost=zero_cost, data=b"")) == m.MAC_REPLY_FIXED
    assert len(m.build_request(Opcode.WRITE_WEIGHTS, row_start=0, n_rows=0, data=b"")) == m.ROWS_FIXED
    assert len(m.build_reply(Opcode.READ_WEIGHTS, row_start=0, n_rows=0, data=b"")) == m.ROWS_FIXED


def test_wire_layout_of_a_few_payloads() -> None:
    # little-endian, no padding, fields in the documented order
    assert m.build_request(Opcode.READ_REG, addr=0x0203) == bytes.fromhex("0302")
    assert m.build_request(Opcode.WRITE_REG, addr=3, value=0xDEADBEEF) == bytes.fromhex("0300efbeadde")
    assert m.build_request(Opcode.MAC, row_start=1, n_rows=2, batch=3, data=b"\x09") == bytes.fromhex(
        "01000200030009"
    )
    assert m.build_request(Opcode.RESET, flags=1) == b"\x01"
    assert m.build_request(Opcode.HELLO) == b""


def test_unknown_opcodes_are_payload_errors() -> None:
    for opcode in (0x00, 0x7F, 0x81, 0xFF):
        with pytest.raises(PayloadError, match=f"0x{opcode:02x}"):
            m.parse_request(opcode, b"")
        with pytest.raises(PayloadError):
            m.parse_reply(opcode, b"")


def test_bad_utf8_in_hello_is_a_payload_error() -> None:
    good = m.build_reply(
        Opcode.HELLO,
        protocol_version=1,
        max_payload=65536,
        regmap_version=1,
        chip_id="ab",
        firmware_id="",
        bitstream_id="",
        spec=m.spec_to_wire(MacroSpec()),
    )
    assert good[7:10] == b"\x02ab"  # chip_id: length byte, then its UTF-8 bytes
    bad = good[:8] + b"\xff\xfe" + good[10:]
    with pytest.raises(PayloadError, match="HELLO reply"):
        m.parse_reply(Opcode.HELLO, bad)


@pytest.mark.parametrize(
    ("opcode", "fields", "field"),
    [
        (Opcode.READ_REG, {}, "addr"),
        (Opcode.WRITE_REG, {"addr": 1}, "value"),
        (Opcode.READ_REG, {"addr": 70000}, "addr"),
        (Opcode.WRITE_REG, {"addr": 1, "value": -1}, "value"),
        (Opcode.MAC, {"row_start": 0, "n_rows": 1, "batch": 1, "data": 5}, "MAC request"),
    ],
)
def test_build_with_bad_fields_is_a_payload_error_naming_the_field(
    opcode: Opcode, fields: dict, field: str
) -> None:
    with pytest.raises(PayloadError, match=field):
        m.build_request(opcode, **fields)


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
    raw = m.MACRO_SPEC.build(fields)
    assert len(raw) == m.MACRO_SPEC.sizeof()
    assert m.spec_from_wire(m.MACRO_SPEC.parse(raw)) == spec
    hello = m.build_reply(
        Opcode.HELLO,
        protocol_version=1,
        max_payload=65536,
        regmap_version=1,
        chip_id="chip",
        firmware_id="fw",
        bitstream_id="bs",
        spec=fields,
    )
    assert m.spec_from_wire(m.parse_reply(Opcode.HELLO, hello).spec) == spec


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
        assert m.spec_from_wire(m.MACRO_SPEC.parse(m.MACRO_SPEC.build(m.spec_to_wire(spec)))) == spec


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"weight_storage": 3}, "weight_storage"),
        ({"rows": 0}, "rows"),
        ({"rows_per_conversion": 300}, "rows_per_conversion"),
        ({"cell_bits": 2}, "weight_storage"),  # twos needs 1-bit cells
        ({"input_slice_bits": 9}, "input_slice_bits"),
    ],
)
def test_invalid_spec_from_the_wire_is_a_payload_error(change: dict, field: str) -> None:
    fields = m.spec_to_wire(MacroSpec())
    fields.update(change)
    parsed = m.MACRO_SPEC.parse(m.MACRO_SPEC.build(fields))
    with pytest.raises(PayloadError, match=field):
        m.spec_from_wire(parsed)

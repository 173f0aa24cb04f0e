"""Golden frame vectors: exact bytes written out by hand from the layout in frame.py's docstring.

Each vector is sync a7 3c | version | opcode | status | seq (LE16) | length (LE32) | header CRC-16
(binascii.crc_hqx, init 0, over bytes 0..10, LE16) | payload | CRC-32 (zlib, over everything before it, LE32).
They are checked against ``encode_frame`` and fed to ``Framer.feed`` whole, split in two at every position,
byte by byte, and all of them back to back.
"""

from __future__ import annotations

import binascii
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import HEADER_SIZE, OVERHEAD, PROTOCOL_VERSION, Frame, Framer, encode_frame

# (name, version, opcode, status, seq, payload, frame hex)
GOLDEN = [
    (
        "HELLO request, seq 0, the host accepts 65536-byte payloads, no token",
        2,
        0x01,
        0,
        0x0000,
        bytes.fromhex("0000010000"),
        "a7 3c 02 01 00 0000 05000000 797d 0000010000 57eb7059",
    ),
    (
        "PING request, seq 0x1234, payload 'hi'",
        2,
        0x02,
        0,
        0x1234,
        b"hi",
        "a7 3c 02 02 00 3412 02000000 d58d 6869 768af247",
    ),
    (
        "WRITE_REG reply OK, seq 0xffff, addr 3 value 0xdeadbeef",
        2,
        0x86,
        0,
        0xFFFF,
        bytes.fromhex("0300efbeadde"),
        "a7 3c 02 86 00 ffff 06000000 2cd2 0300efbeadde 5a0cbb5a",
    ),
    (
        "error reply UNKNOWN_OPCODE (3) to opcode 0x55, seq 0x0102",
        2,
        0xD5,
        3,
        0x0102,
        b"unknown opcode 0x55",
        "a7 3c 02 d5 03 0201 13000000 5c81 756e6b6e6f776e206f70636f64652030783535 64af8aa5",
    ),
    (
        "PING whose seq and payload contain the sync word",
        2,
        0x02,
        0,
        0xA73C,
        b"\xa7\x3c\xa7",
        "a7 3c 02 02 00 3ca7 03000000 4afb a73ca7 d37dcba6",
    ),
]
IDS = [g[0] for g in GOLDEN]


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def _check(events: list, version: int, opcode: int, status: int, seq: int, payload: bytes) -> None:
    assert events == [Frame(version, opcode, status, seq, payload)]


def test_crc_algorithms_are_the_documented_ones() -> None:
    # standard check values: CRC-16/XMODEM ("123456789") = 0x31C3, CRC-32/ISO-HDLC = 0xCBF43926
    assert binascii.crc_hqx(b"123456789", 0) == 0x31C3
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert HEADER_SIZE == 13 and OVERHEAD == 17


@pytest.mark.parametrize(("name", "version", "opcode", "status", "seq", "payload", "wire"), GOLDEN, ids=IDS)
def test_encode_matches_golden(name, version, opcode, status, seq, payload, wire) -> None:
    assert encode_frame(opcode, seq, payload, status=status, version=version) == _hex(wire)


@pytest.mark.parametrize(("name", "version", "opcode", "status", "seq", "payload", "wire"), GOLDEN, ids=IDS)
def test_feed_whole_split_and_bytewise(name, version, opcode, status, seq, payload, wire) -> None:
    data = _hex(wire)
    framer = Framer()
    _check(framer.feed(data), version, opcode, status, seq, payload)
    assert framer.pending == 0

    for cut in range(len(data) + 1):
        framer = Framer()
        events = framer.feed(data[:cut]) + framer.feed(data[cut:])
        _check(events, version, opcode, status, seq, payload)
        assert framer.pending == 0
        assert framer.stats.frames == 1 and framer.stats.bytes_discarded == 0

    framer = Framer()
    events = []
    for i in range(len(data)):
        events += framer.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert events == [], f"frame reported after only {i + 1} of {len(data)} bytes"
    _check(events, version, opcode, status, seq, payload)
    assert framer.stats.resyncs == 0 and framer.stats.header_errors == 0


def test_all_golden_back_to_back_any_split() -> None:
    stream = b"".join(_hex(g[-1]) for g in GOLDEN)
    expected = [Frame(g[1], g[2], g[3], g[4], g[5]) for g in GOLDEN]
    assert Framer().feed(stream) == expected
    for cut in range(len(stream) + 1):
        framer = Framer()
        assert framer.feed(stream[:cut]) + framer.feed(stream[cut:]) == expected
    framer = Framer()
    events = []
    for b in stream:
        events += framer.feed(bytes([b]))
    assert events == expected
    assert framer.stats.frames == len(GOLDEN) and framer.stats.bytes_discarded == 0


def test_reply_flag_and_seq_wrap() -> None:
    assert Framer().feed(_hex(GOLDEN[2][-1]))[0].is_reply
    assert not Framer().feed(_hex(GOLDEN[1][-1]))[0].is_reply
    # seq wraps at 16 bits: 0x11234 goes out as 0x1234
    assert encode_frame(0x02, 0x11234, b"hi") == _hex(GOLDEN[1][-1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(opcode=256, seq=0), "opcode"),
        (dict(opcode=-1, seq=0), "opcode"),
        (dict(opcode=1, seq=0, status=256), "status"),
        (dict(opcode=1, seq=0, version=256), "version"),
        (dict(opcode=1, seq=0, version=-1), "version"),
    ],
)
def test_encode_rejects_fields_that_do_not_fit(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        encode_frame(**kwargs)


def _reference_frame(version: int, opcode: int, status: int, seq: int, payload: bytes) -> bytes:
    """The docstring's layout, written with struct: independent of frame.py's construct definition."""
    head = b"\xa7\x3c" + struct.pack("<BBBHI", version, opcode, status, seq, len(payload))
    head += struct.pack("<H", binascii.crc_hqx(head, 0))
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


@settings(max_examples=150, deadline=None)
@given(
    version=st.integers(0, 255),
    opcode=st.integers(0, 255),
    status=st.integers(0, 255),
    seq=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=300),
    cut=st.integers(0, 400),
)
def test_any_fields_match_reference_and_decode(version, opcode, status, seq, payload, cut) -> None:
    wire = encode_frame(opcode, seq, payload, status=status, version=version)
    assert wire == _reference_frame(version, opcode, status, seq, payload)
    framer = Framer()
    cut = min(cut, len(wire))
    assert framer.feed(wire[:cut]) + framer.feed(wire[cut:]) == [Frame(version, opcode, status, seq, payload)]


def test_protocol_version_is_two() -> None:
    # the golden vectors above (and the message vectors in test_messages.py) are written for version 2; a version
    # bump must revisit them
    assert PROTOCOL_VERSION == 2

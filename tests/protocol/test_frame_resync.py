"""The framer after damage: garbage, bad header and payload CRCs, oversize lengths, truncation; and its cost."""

from __future__ import annotations

import binascii
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimlab.firmware_bridge import frame as frame_mod
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import (
    HEADER_SIZE,
    MAX_PAYLOAD_LIMIT,
    OVERHEAD,
    PROTOCOL_VERSION,
    SYNC,
    BadFrame,
    Frame,
    Framer,
    encode_frame,
)

A = encode_frame(0x02, 0x0101, b"first frame")
B = encode_frame(0x10, 0x0202, bytes(range(40)))
C = encode_frame(0x84, 0x0303, b"", status=5)
FA = Frame(PROTOCOL_VERSION, 0x02, 0, 0x0101, b"first frame")
FB = Frame(PROTOCOL_VERSION, 0x10, 0, 0x0202, bytes(range(40)))
FC = Frame(PROTOCOL_VERSION, 0x84, 5, 0x0303, b"")


def header(opcode: int, seq: int, length: int, *, version: int = PROTOCOL_VERSION, status: int = 0, good: bool = True) -> bytes:
    """A 13-byte header claiming ``length``, with a correct (or deliberately wrong) header CRC."""
    head = SYNC + struct.pack("<BBBHI", version, opcode, status, seq, length)
    crc = binascii.crc_hqx(head, 0) ^ (0 if good else 0x0001)
    return head + struct.pack("<H", crc)


def feed_ways(data: bytes, max_payload: int = 64 * 1024) -> list[list]:
    """Events from feeding ``data`` whole, split at every position, and byte by byte."""
    results = []
    framer = Framer(max_payload)
    results.append(framer.feed(data))
    for cut in range(len(data) + 1):
        framer = Framer(max_payload)
        results.append(framer.feed(data[:cut]) + framer.feed(data[cut:]))
    framer = Framer(max_payload)
    events = []
    for i in range(len(data)):
        events += framer.feed(data[i : i + 1])
    results.append(events)
    return results


GARBAGE = {
    "plain": b"\x00\xff\x13\x37 hello \x3c\xa7",
    "sync_words": SYNC + b"\x01" + SYNC + SYNC[:1] + SYNC,
    "forged_header_bad_crc": header(0x02, 0x0999, 5, good=False) + b"12345",
    "forged_header_short": SYNC + b"\x01\x02\x00",
    "lone_first_sync_byte": b"\xa7\xa7\xa7",
    "almost_a_frame": A[:-1] + b"\x00",  # valid header, wrong CRC: reported as BadFrame crc
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_before_between_and_after(name: str) -> None:
    junk = GARBAGE[name]
    stream = junk + A + junk + B + junk + C + junk
    good = [FA, FB, FC]
    for events in feed_ways(stream):
        frames = [e for e in events if isinstance(e, Frame)]
        bad = [e for e in events if isinstance(e, BadFrame)]
        assert frames == good
        if name == "almost_a_frame":
            assert [(b.reason, b.seq) for b in bad] == [("crc", 0x0101)] * 4
        else:
            assert bad == []


def test_garbage_counters() -> None:
    junk = b"\x00" * 10 + header(0x02, 7, 3, good=False)
    framer = Framer()
    assert framer.feed(junk + A + junk) == [FA]
    s = framer.stats
    assert s.frames == 1 and s.bad_frames == 0
    assert s.header_errors == 2  # one forged header before and one after A
    # the trailing forged header leaves its sync skipped and the rest discarded
    assert s.bytes_discarded == 2 * len(junk)
    assert s.bytes_in == 2 * len(junk) + len(A)
    assert framer.pending == 0
    assert s.resyncs >= 2


def test_sync_split_across_reads_after_garbage() -> None:
    framer = Framer()
    assert framer.feed(b"junk\xa7") == []
    assert framer.pending == 1  # the lone first sync byte is kept: it may start a sync word
    assert framer.feed(A[1:]) == [FA]
    # a trailing 0xa7 that ended a frame is not kept as a half sync word
    tail_a7 = next(encode_frame(0x02, s, b"x") for s in range(1000) if encode_frame(0x02, s, b"x")[-1] == 0xA7)
    framer = Framer()
    assert len(framer.feed(tail_a7)) == 1 and framer.pending == 0
    assert framer.feed(b"\x3c" + A) == [FA]


def test_bad_header_crc_is_skipped_silently() -> None:
    damaged = bytearray(A)
    damaged[5] ^= 0x40  # seq byte: the header CRC no longer matches
    for events in feed_ways(bytes(damaged) + B):
        assert events == [FB]
    framer = Framer()
    framer.feed(bytes(damaged) + B)
    assert framer.stats.header_errors == 1 and framer.stats.bad_frames == 0


@pytest.mark.parametrize("where", ["payload", "crc"])
def test_bad_payload_crc_reports_seq_and_next_frame_found(where: str) -> None:
    damaged = bytearray(B)
    damaged[HEADER_SIZE + 3 if where == "payload" else -1] ^= 0x01
    for events in feed_ways(bytes(damaged) + A):
        assert events == [BadFrame(PROTOCOL_VERSION, 0x10, 0x0202, 40, "crc"), FA]
    framer = Framer()
    framer.feed(bytes(damaged) + A)
    assert framer.stats.bad_frames == 1 and framer.stats.frames == 1


def test_good_frame_inside_rejected_frame_is_found() -> None:
    inner = encode_frame(0x02, 0x0505, b"inner")
    outer = bytearray(encode_frame(0x02, 0x0909, b"xx" + inner + b"yy"))
    outer[-2] ^= 0xFF  # outer CRC wrong: its bytes must be hunted again
    for events in feed_ways(bytes(outer) + C):
        assert events == [
            BadFrame(PROTOCOL_VERSION, 0x02, 0x0909, len(inner) + 4, "crc"),
            Frame(PROTOCOL_VERSION, 0x02, 0, 0x0505, b"inner"),
            FC,
        ]


def test_forged_valid_header_swallowing_a_good_frame() -> None:
    # garbage whose header CRC happens to be valid claims 30 bytes: A (28 bytes) and part of B land in it
    forged = header(0x03, 0x0777, 30)
    for events in feed_ways(forged + A + B):
        assert events == [BadFrame(PROTOCOL_VERSION, 0x03, 0x0777, 30, "crc"), FA, FB]


@pytest.mark.parametrize("cap", [0, 16, 100, 64 * 1024])
def test_oversize_length_rejected_at_the_cap(cap: int) -> None:
    at_cap = encode_frame(0x02, 1, bytes(cap))
    assert Framer(cap).feed(at_cap) == [Frame(PROTOCOL_VERSION, 0x02, 0, 1, bytes(cap))]
    over = encode_frame(0x02, 2, bytes(cap + 1))
    events = Framer(cap).feed(over + C)
    assert events[0] == BadFrame(PROTOCOL_VERSION, 0x02, 2, cap + 1, "oversize")
    # the oversize frame's payload is then hunted through as garbage; the next frame is still found
    assert events[1:] == [FC]


def test_huge_claimed_length_allocates_nothing() -> None:
    huge = header(0x10, 0x4242, 0xFFFFFFFF)
    framer = Framer(MAX_PAYLOAD_LIMIT)
    tracemalloc.start()
    try:
        events = framer.feed(huge)
        events += framer.feed(A)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert events == [BadFrame(PROTOCOL_VERSION, 0x10, 0x4242, 0xFFFFFFFF, "oversize"), FA]
    assert peak < 256 * 1024, f"framer peaked at {peak} bytes for a 4 GiB claim"
    assert framer.pending == 0 and framer.stats.bad_frames == 1


def test_claimed_length_inside_cap_waits_without_preallocating() -> None:
    framer = Framer(MAX_PAYLOAD_LIMIT)
    tracemalloc.start()
    try:
        assert framer.feed(header(0x10, 9, MAX_PAYLOAD_LIMIT)) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert framer.pending == HEADER_SIZE


def test_truncated_frame_then_silence_then_drop_partial() -> None:
    framer = Framer()
    assert framer.feed(B[:25]) == []
    assert framer.pending == 25
    assert framer.drop_partial() is True
    assert framer.stats.partials_dropped == 1
    assert framer.feed(A) == [FA]
    assert framer.pending == 0
    assert framer.drop_partial() is False


def test_truncated_frame_followed_at_once_by_a_good_one() -> None:
    # without silence the good frame is held as the truncated frame's payload; the inter-frame timeout
    # (drop_partial) lets the framer hunt through the held bytes and find it
    framer = Framer()
    assert framer.feed(B[:25] + A) == []
    assert framer.drop_partial()
    assert framer.feed(b"") == [FA]
    assert framer.pending == 0


def test_reset_forgets_buffered_bytes() -> None:
    framer = Framer()
    framer.feed(A[:10])
    framer.reset()
    assert framer.pending == 0
    assert framer.feed(A[10:] + B) == [FB]


@pytest.mark.parametrize("cap", [-1, MAX_PAYLOAD_LIMIT + 1])
def test_framer_cap_is_validated(cap: int) -> None:
    with pytest.raises(ConfigError, match="max_payload"):
        Framer(cap)


@settings(max_examples=60, deadline=None)
@given(
    junk=st.lists(
        st.binary(max_size=40) | st.sampled_from([SYNC, SYNC[:1], header(1, 2, 3, good=False)]), max_size=8
    ),
    chunk=st.integers(1, 64),
)
def test_random_garbage_never_hides_good_frames(junk: list[bytes], chunk: int) -> None:
    frames = [A, B, C]
    stream = bytearray()
    for i, f in enumerate(frames):
        stream += b"".join(junk[i::3]) + f
    stream += b"".join(junk)
    framer = Framer()
    events = []
    for i in range(0, len(stream), chunk):
        events += framer.feed(bytes(stream[i : i + chunk]))
    while framer.drop_partial():  # end of stream: the caller's inter-frame timeouts
        events += framer.feed(b"")
    assert [e for e in events if isinstance(e, Frame)] == [FA, FB, FC]


class _CountingBuffer(bytearray):
    """The framer's buffer, counting the bytes its sync search looks at."""

    scanned = 0

    def find(self, sub, start=0, *args):  # type: ignore[override]
        idx = super().find(sub, start, *args)
        _CountingBuffer.scanned += (len(self) if idx < 0 else idx + len(sub)) - start
        return idx


def test_framer_work_is_linear_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    crc_bytes = 0
    real_crc32 = zlib.crc32

    def counting_crc32(data, value=0):
        nonlocal crc_bytes
        crc_bytes += len(data)
        return real_crc32(data, value)

    class _Zlib:
        crc32 = staticmethod(counting_crc32)

    cap = 64 * 1024
    frames = [encode_frame(0x10, i, bytes([i]) * (cap - i)) for i in range(8)]
    stream = b"".join(frames)
    monkeypatch.setattr(frame_mod, "zlib", _Zlib)
    _CountingBuffer.scanned = 0
    framer = Framer(cap)
    framer._buf = _CountingBuffer()
    n_events = 0
    chunk = 4096
    biggest = 0
    for i in range(0, len(stream), chunk):
        n_events += len(framer.feed(stream[i : i + chunk]))
        biggest = max(biggest, framer.pending)
    assert n_events == len(frames) and framer.stats.frames == len(frames)
    n_chunks = -(-len(stream) // chunk)
    # every payload byte is CRC'd exactly once (headers add 13 bytes per frame)
    assert crc_bytes == len(stream) - 4 * len(frames)
    # the sync search touches each byte about once plus a sync word per read, never rescanning held bytes
    assert _CountingBuffer.scanned <= len(stream) + 2 * (n_chunks + len(frames))
    # memory held is at most one frame plus one read
    assert biggest <= cap + OVERHEAD + chunk

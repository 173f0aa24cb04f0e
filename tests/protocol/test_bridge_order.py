"""The bridge's execution order: requests execute in seq order, exactly once, whatever order they arrive in.

A request ahead of a missing one is held and the device answers MISSING for the gap once; the missing request
drains the held ones in order; holds expire through ``poll``; HELLO and requests outside the reorder window start
a new order; the replay cache still answers retries of executed requests.
"""

from __future__ import annotations

import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_fakes import SMALL_SPEC

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.bridge import REORDER_WINDOW
from cimlab.firmware_bridge.frame import REPLY_FLAG, encode_frame
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.firmware_bridge.registers import BY_NAME

SCRATCH = BY_NAME["SCRATCH"].addr
SPEC = SMALL_SPEC
MISSING_OPCODE = REPLY_FLAG  # a MISSING reply has opcode 0: the device cannot know the lost request's opcode


def write(seq: int, value: int | None = None) -> bytes:
    """WRITE_REG SCRATCH = ``value`` (default: the seq) at ``seq``: its controller call shows which ran when."""
    payload = m.RegValue(SCRATCH, seq if value is None else value).encode()
    return encode_frame(Opcode.WRITE_REG, seq & 0xFFFF, payload)


def hello(seq: int) -> bytes:
    return encode_frame(Opcode.HELLO, seq & 0xFFFF, m.Hello(1 << 16).encode())


def writes(*seqs: int) -> list[tuple]:
    """The controller calls that WRITE_REGs at ``seqs`` make, in that order."""
    return [("write_reg", SCRATCH, s & 0xFFFF) for s in seqs]


def feed(bridge, decode, *frames: bytes) -> list[tuple[int, int, int]]:
    """Feed frames one read each; return (seq, status, opcode) of every reply, in order."""
    out = []
    for frame in frames:
        out += [(r.seq, r.status, r.opcode) for r in decode(bridge.receive(frame))]
    return out


def ok(*seqs: int, opcode: int = Opcode.WRITE_REG) -> list[tuple[int, int, int]]:
    return [(s & 0xFFFF, Status.OK, opcode | REPLY_FLAG) for s in seqs]


def missing(seq: int) -> tuple[int, int, int]:
    return (seq & 0xFFFF, Status.MISSING, MISSING_OPCODE)


# ---- hold, one MISSING, in-order drain -----------------------------------------------------------------------
def test_requests_behind_a_missing_one_are_held_then_drain_in_order(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    assert feed(bridge, decode, write(10)) == ok(10)
    # 11 is lost: 12 is held and the device asks for 11 once; 13 and 14 wait silently
    replies = decode(bridge.receive(write(12)))
    assert [(r.seq, r.status, r.opcode) for r in replies] == [missing(11)]
    assert "seq 11" in replies[0].payload.decode() and Status.MISSING in m.RETRYABLE_STATUS
    assert feed(bridge, decode, write(13), write(14)) == []
    assert ctl.calls == writes(10) and bridge.stats.held == 3
    # a duplicate of a held request is neither held twice nor answered yet
    assert feed(bridge, decode, write(13)) == [] and bridge.stats.held == 3
    # the missing request arrives: it and the held ones execute, in seq order, each once
    assert feed(bridge, decode, write(11)) == ok(11, 12, 13, 14)
    assert ctl.calls == writes(10, 11, 12, 13, 14) and ctl.regs[SCRATCH] == 14
    assert bridge.wake_at() is None and bridge.stats.holds_expired == 0
    # and the order goes on from 15
    assert feed(bridge, decode, write(15)) == ok(15)


def test_a_further_gap_is_reported_when_the_first_is_filled(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    assert feed(bridge, decode, write(0)) == ok(0)
    assert feed(bridge, decode, write(3), write(4)) == [missing(1)]  # 1 and 2 were lost
    assert feed(bridge, decode, write(1)) == [*ok(1), missing(2)]
    assert feed(bridge, decode, write(2)) == ok(2, 3, 4)
    assert ctl.calls == writes(0, 1, 2, 3, 4)


def test_a_damaged_request_is_answered_bad_crc_and_its_retry_releases_the_held(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    damaged = bytearray(write(6))
    damaged[-1] ^= 0x55
    bad_crc = (6, Status.BAD_CRC, Opcode.WRITE_REG | REPLY_FLAG)
    assert feed(bridge, decode, write(5), bytes(damaged)) == [*ok(5), bad_crc]
    # BAD_CRC did not execute it: 6 is still expected, and the host already knows: one answer per loss, no MISSING
    assert feed(bridge, decode, write(7)) == []
    assert feed(bridge, decode, write(6)) == ok(6, 7)
    assert ctl.calls == writes(5, 6, 7)


@settings(max_examples=60, deadline=None)
@given(base=st.integers(0, 0xFFFF), order=st.permutations(range(12)))
def test_the_controller_sees_seq_order_whatever_order_frames_arrive_in(make_bridge, decode, base, order) -> None:
    bridge, ctl = make_bridge()
    assert feed(bridge, decode, write(base)) == ok(base)  # the first request sets the order
    arrived: set[int] = set()
    nacked: list[int] = []
    answered: list[int] = []
    for i in order:
        seq = (base + 1 + i) & 0xFFFF
        arrived.add(seq)
        for r_seq, status, _ in feed(bridge, decode, write(seq)):
            if status == Status.MISSING:
                assert r_seq not in arrived, "MISSING names only a request that has not arrived"
                nacked.append(r_seq)
            else:
                assert status == Status.OK
                answered.append(r_seq)
    assert ctl.calls == writes(*range(base, base + 13))
    assert answered == [(base + 1 + i) & 0xFFFF for i in range(12)]  # replies leave in seq order too
    assert len(nacked) == len(set(nacked)), "each gap is reported once"
    assert bridge.wake_at() is None and bridge.stats.holds_expired == 0


# ---- holds expire through poll -------------------------------------------------------------------------------
def test_a_hold_expires_at_wake_at_and_the_held_execute_in_order(make_bridge, decode) -> None:
    bridge, ctl = make_bridge(hold_s=0.75)
    assert bridge.wake_at() is None
    feed(bridge, decode, write(20))
    t0 = time.monotonic()
    assert feed(bridge, decode, write(22)) == [missing(21)]
    t1 = time.monotonic()
    wake = bridge.wake_at()
    assert wake is not None and t0 + 0.75 <= wake <= t1 + 0.75
    assert feed(bridge, decode, write(23)) == []
    t2 = time.monotonic()
    later = bridge.wake_at()
    assert later is not None and wake <= later <= t2 + 0.75, "bytes still arriving keep the hold open"
    wake = later
    assert bridge.poll(now=np.nextafter(wake, 0)) == [] and ctl.calls == writes(20)
    # at wake_at the hold gives up on 21: the held requests execute in seq order
    assert [(r.seq, r.status) for r in decode(bridge.poll(now=wake))] == [(22, Status.OK), (23, Status.OK)]
    assert ctl.calls == writes(20, 22, 23) and bridge.stats.holds_expired == 1
    assert bridge.wake_at() is None and bridge.poll(now=wake + 100) == []
    assert feed(bridge, decode, write(24)) == ok(24)


def test_an_expired_hold_releases_up_to_the_next_gap_and_reports_it(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    feed(bridge, decode, write(0))
    assert feed(bridge, decode, write(2), write(4)) == [missing(1)]  # 1 and 3 lost
    first = bridge.wake_at()
    assert first is not None
    t0 = time.monotonic()
    assert [(r.seq, r.status) for r in decode(bridge.poll(now=first))] == [(2, Status.OK), (3, Status.MISSING)]
    t1 = time.monotonic()
    assert ctl.calls == writes(0, 2)
    wake = bridge.wake_at()  # the hold behind the new gap starts now
    assert wake is not None and t0 + bridge.hold_s <= wake <= t1 + bridge.hold_s
    assert feed(bridge, decode, write(3)) == ok(3, 4)
    assert ctl.calls == writes(0, 2, 3, 4) and bridge.wake_at() is None


def test_wake_at_reports_the_inter_frame_timeout_of_a_partial_frame(make_bridge, decode) -> None:
    bridge, ctl = make_bridge(idle_s=0.2)
    frame = write(1)
    t0 = time.monotonic()
    assert bridge.receive(frame[:9]) == []
    t1 = time.monotonic()
    wake = bridge.wake_at()
    assert wake is not None and t0 + 0.2 <= wake <= t1 + 0.2
    assert bridge.poll(now=np.nextafter(wake, 0)) == [] and bridge.framer.pending == 9
    assert bridge.poll(now=wake) == [] and bridge.framer.pending == 0 and bridge.wake_at() is None
    assert ctl.calls == []


# ---- new orders ----------------------------------------------------------------------------------------------
def test_hello_executes_at_once_and_restarts_the_order(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    feed(bridge, decode, write(100))
    assert feed(bridge, decode, hello(30_000)) == ok(30_000, opcode=Opcode.HELLO)
    assert feed(bridge, decode, write(30_001)) == ok(30_001)  # not held behind 101
    # a HELLO inside the window executes at once too, and the order goes on after it
    assert feed(bridge, decode, hello(30_005)) == ok(30_005, opcode=Opcode.HELLO)
    assert feed(bridge, decode, write(30_006)) == ok(30_006)
    assert ctl.calls == [*writes(100), ("identity",), *writes(30_001), ("identity",), *writes(30_006)]


def test_a_restart_gives_up_the_hold_before_it_executes(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    feed(bridge, decode, write(10))
    assert feed(bridge, decode, write(12)) == [missing(11)]
    # a HELLO after the held request: the hold gives up, 12 executes, then HELLO, and the order goes on after it
    assert feed(bridge, decode, hello(13)) == [*ok(12), *ok(13, opcode=Opcode.HELLO)]
    assert feed(bridge, decode, write(14)) == ok(14)
    assert ctl.calls == [*writes(10, 12), ("identity",), *writes(14)] and bridge.wake_at() is None


def test_a_request_held_for_an_old_host_never_executes_inside_a_new_order(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    feed(bridge, decode, write(10))
    assert feed(bridge, decode, write(12, value=0xAA)) == [missing(11)]  # the old host goes away
    replies = feed(bridge, decode, hello(0))  # a new host: what was held executes first, not later
    assert replies == [*ok(12), *ok(0, opcode=Opcode.HELLO)]
    assert ctl.calls == [*writes(10), ("write_reg", SCRATCH, 0xAA), ("identity",)]
    ctl.calls.clear()
    # the new host's requests (other bytes than the old host's: same seq and bytes would be a replay)
    for seq in range(1, 12):
        assert feed(bridge, decode, write(seq, value=0x100 + seq)) == ok(seq)
    r = decode(bridge.receive(write(12, value=0xBB)))  # the new host's own seq 12
    assert [(f.seq, f.status) for f in r] == [(12, Status.OK)]
    assert m.RegValue.decode(r[0].payload).value == 0xBB
    new_writes = [("write_reg", SCRATCH, 0x100 + seq) for seq in range(1, 12)]
    assert ctl.calls == [*new_writes, ("write_reg", SCRATCH, 0xBB)] and ctl.regs[SCRATCH] == 0xBB
    assert bridge.wake_at() is None


def test_requests_far_ahead_or_behind_execute_at_once_and_restart_the_order(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    feed(bridge, decode, write(100))
    # the last seq inside the window is held; the first outside it is a new order
    assert feed(bridge, decode, write(101 + REORDER_WINDOW - 1)) == [missing(101)]
    assert feed(bridge, decode, write(101 + REORDER_WINDOW)) == [*ok(101 + REORDER_WINDOW - 1),
                                                                 *ok(101 + REORDER_WINDOW)]
    assert feed(bridge, decode, write(102 + REORDER_WINDOW)) == ok(102 + REORDER_WINDOW)
    # behind the order: executes at once (new bytes, so not a replay) and the order restarts after it
    assert feed(bridge, decode, write(90)) == ok(90)
    assert feed(bridge, decode, write(91)) == ok(91)
    assert ctl.calls == writes(100, 100 + REORDER_WINDOW, 101 + REORDER_WINDOW, 102 + REORDER_WINDOW, 90, 91)
    assert bridge.wake_at() is None


def test_a_straggler_behind_the_order_runs_at_once_and_leaves_the_order_alone(make_bridge, decode) -> None:
    """11 is resent after its hold gave up: it runs, and 13 is not then held waiting for a 12 that already ran."""
    bridge, ctl = make_bridge(hold_s=0.5)
    feed(bridge, decode, write(10))
    assert feed(bridge, decode, write(12)) == [missing(11)]
    wake = bridge.wake_at()
    assert wake is not None
    assert [(r.seq, r.status) for r in decode(bridge.poll(now=wake))] == [(12, Status.OK)]
    assert feed(bridge, decode, write(11)) == ok(11)
    assert feed(bridge, decode, write(13)) == ok(13)
    assert ctl.calls == writes(10, 12, 11, 13)
    assert bridge.wake_at() is None


def test_hello_starts_a_session_that_nothing_earlier_is_replayed_into(make_bridge, decode) -> None:
    """A new host that reuses an old host's seqs and bytes gets its requests executed, not old replies."""
    bridge, ctl = make_bridge()
    feed(bridge, decode, hello(5), write(6))
    feed(bridge, decode, hello(5))  # a new session, same seq and bytes as before
    assert feed(bridge, decode, write(6)) == ok(6)
    assert ctl.calls == [("identity",), *writes(6), ("identity",), *writes(6)]


def test_the_order_wraps_from_65535_to_0(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    feed(bridge, decode, write(0xFFFE))
    assert feed(bridge, decode, write(1), write(0)) == [missing(0xFFFF)]
    assert feed(bridge, decode, write(0xFFFF)) == ok(0xFFFF, 0, 1)
    assert feed(bridge, decode, write(2)) == ok(2)
    assert ctl.calls == writes(0xFFFE, 0xFFFF, 0, 1, 2)


def test_an_expired_hold_across_the_wrap_executes_in_seq_order(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    feed(bridge, decode, write(0xFFFD))
    assert feed(bridge, decode, write(1), write(0), write(0xFFFF)) == [missing(0xFFFE)]
    wake = bridge.wake_at()
    assert wake is not None
    assert [r.seq for r in decode(bridge.poll(now=wake))] == [0xFFFF, 0, 1]
    assert ctl.calls == writes(0xFFFD, 0xFFFF, 0, 1)


# ---- the replay cache and retryable refusals ---------------------------------------------------------------
def test_a_retry_of_an_executed_request_comes_from_the_cache_and_keeps_the_order(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    first = bridge.receive(write(5))
    feed(bridge, decode, write(6))
    assert feed(bridge, decode, write(8)) == [missing(7)]
    # the host resends 5 (its reply was lost): answered from memory, not executed, the order still waits for 7
    assert bridge.receive(write(5)) == first and bridge.stats.replays == 1
    assert feed(bridge, decode, write(7)) == ok(7, 8)
    assert bridge.receive(write(5)) == first and bridge.stats.replays == 2
    assert ctl.calls == writes(5, 6, 7, 8)


def test_a_busy_request_keeps_its_place_in_the_order(make_bridge, decode) -> None:
    bridge, ctl = make_bridge()
    feed(bridge, decode, write(1))
    x = np.full((1, 4), 2)
    payload = m.MacInputs.of(SPEC, 0, x).encode()
    mac = encode_frame(Opcode.MAC, 2, payload)
    ctl.busy_next = 1
    assert feed(bridge, decode, mac) == [(2, Status.BUSY, Opcode.MAC | REPLY_FLAG)]
    # the request after it waits for the retry; the BUSY reply already asked for it, so no MISSING
    assert feed(bridge, decode, write(3)) == []
    assert feed(bridge, decode, mac) == [*ok(2, opcode=Opcode.MAC), *ok(3)]
    assert ctl.calls == [*writes(1), ("mac", 0, (1, 4)), ("mac", 0, (1, 4)), *writes(3)] and ctl.ops == 1


def test_a_final_refusal_answers_its_seq_and_the_order_moves_on(make_bridge, decode) -> None:
    bridge, ctl = make_bridge(max_payload=64)
    feed(bridge, decode, write(1))
    oversize = encode_frame(Opcode.PING, 2, bytes(65))
    other_version = encode_frame(Opcode.WRITE_REG, 3, m.RegValue(SCRATCH, 9).encode(), version=1)
    assert [s for _, s, _ in feed(bridge, decode, oversize, other_version)] == [Status.TOO_LARGE,
                                                                               Status.BAD_VERSION]
    assert feed(bridge, decode, write(4)) == ok(4)  # not held behind 2 and 3: those were answered
    assert ctl.calls == writes(1, 4) and bridge.wake_at() is None


"""The driver's transactions under losses it can see frame by frame: retransmission accounting, no stalls, deadlines,
the payload agreed at HELLO and the splitting of what does not fit."""

from __future__ import annotations

import os
import socket
import time
import tty
from collections.abc import Callable

import numpy as np
import pytest

from cimlab.driver import DEADLINE_BASE_S, Chip
from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError, LinkError
from cimlab.firmware_bridge.frame import Frame, Framer, encode_frame
from cimlab.firmware_bridge.messages import Opcode
from cimlab.links import open_link

IDEAL = "sim://?profile=ideal"


class ReplyFilter:
    """An in-process twin whose replies pass a rule: ``drop(frame, index)`` True loses that reply frame.

    ``index`` counts the reply frames the twin sent (0 first). Requests always arrive.
    """

    def __init__(self, url: str, drop: Callable[[Frame, int], bool], *, cut: bool = False) -> None:
        self.inner = open_link(url)
        self.cut = cut  # a dropped reply loses its second half only (a lost chunk), not the whole frame
        self.url = url
        self.rate_hint = None
        self.drop = drop
        self.framer = Framer(1 << 24)
        self.sent = 0
        self.dropped: list[int] = []
        self.requests: list[int] = []  # seqs as they arrive at the device

    def write(self, data: bytes) -> None:
        self.requests += [f.seq for f in Framer(1 << 24).feed(data) if isinstance(f, Frame)]
        self.inner.write(data)

    def read(self, max_bytes: int, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        while True:
            out = b""
            for f in self.framer.feed(self.inner.read(1 << 24, max(0.0, end - time.monotonic()))):
                if self.drop(f, self.sent):
                    self.dropped.append(self.sent)
                    if self.cut:
                        whole = encode_frame(f.opcode, f.seq, f.payload, status=f.status, version=f.version)
                        out += whole[: len(whole) // 2]
                else:
                    out += encode_frame(f.opcode, f.seq, f.payload, status=f.status, version=f.version)
                self.sent += 1
            if out or time.monotonic() >= end:
                return out

    def close(self) -> None:
        self.inner.close()


def _setup(chip: Chip) -> tuple[np.ndarray, np.ndarray]:
    spec = chip.spec
    rng = np.random.default_rng(0)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
    chip.write_weights(w)
    return w, rng.integers(0, spec.input_max + 1, size=(64 * 16, spec.rows))


def test_a_lost_reply_is_resent_once_and_spends_no_retry() -> None:
    """Eight frames in flight, the third reply lost: before, each later reply counted one more attempt at it and
    the call failed past ``retries``; now the loss costs one fast retransmit and no timeout."""
    link = ReplyFilter(IDEAL, lambda f, i: f.opcode == Opcode.MAC | 0x80 and i == 5)
    chip = Chip(link, timeout=5.0, retries=0, window=8)  # type: ignore[arg-type]
    w, x = _setup(chip)
    link.sent = 0
    np.testing.assert_array_equal(chip.mac(x), x @ w)
    assert link.dropped == [5]
    assert chip.stats.requests - 2 >= 16  # HELLO and the write, then two windows' worth of frames
    assert (chip.stats.fast_retransmits, chip.stats.timeouts, chip.stats.retries) == (1, 0, 1)
    assert chip.last_call.seconds < 2.0  # repaired at once, long before the 5 s resend interval


def test_a_run_of_lost_replies_costs_one_resend_each() -> None:
    lost = set(range(4, 8))
    link = ReplyFilter(IDEAL, lambda f, i: i in lost)
    chip = Chip(link, timeout=5.0, retries=0, window=8)  # type: ignore[arg-type]
    w, x = _setup(chip)
    link.sent = 0
    np.testing.assert_array_equal(chip.mac(x), x @ w)
    assert chip.stats.fast_retransmits == 4 and chip.stats.timeouts == 0


def test_a_reply_cut_short_is_resent_without_waiting_for_the_timeout() -> None:
    """The last reply of a call loses its second half (a lost chunk): no later byte will complete it, so the driver
    gives it up after ``GAP_S`` of silence and resends at once, instead of waiting for the resend interval."""
    link = ReplyFilter(IDEAL, lambda f, i: f.opcode == Opcode.MAC | 0x80 and i == 0, cut=True)
    chip = Chip(link, timeout=5.0, retries=0)  # type: ignore[arg-type]
    w, x = _setup(chip)
    link.sent = 0
    np.testing.assert_array_equal(chip.mac(x[:3]), x[:3] @ w)
    assert link.dropped == [0]
    assert (chip.stats.fast_retransmits, chip.stats.timeouts) == (1, 0)
    assert chip.last_call.seconds < 1.0


def test_losing_the_last_window_of_replies_costs_one_resend_interval_and_nothing_after() -> None:
    """Every reply of the call's last window is lost once: before, the deadlines backed off one behind the other
    and the inflated pace slowed later calls (a 128-vector MAC took 139 s); now the call takes about one resend
    interval and the next call is as fast as a clean one."""
    timeout = 0.25
    state = {"armed": False, "lost": 0}

    def drop(f: Frame, i: int) -> bool:
        if state["armed"] and f.opcode == Opcode.MAC | 0x80 and f.seq in last_window:
            last_window.discard(f.seq)
            state["lost"] += 1
            return True
        return False

    link = ReplyFilter(IDEAL, drop)
    chip = Chip(link, timeout=timeout, retries=2, window=8)  # type: ignore[arg-type]
    w, x = _setup(chip)
    t0 = time.monotonic()
    chip.mac(x[:128])
    clean = time.monotonic() - t0
    frames = chip.stats.requests
    chip.mac(x[:128])  # learn how many frames the call takes, then lose the replies of the last eight
    per_call = chip.stats.requests - frames
    first_seq = (chip._seq + 1) & 0xFFFF
    last_window = {(first_seq + k) & 0xFFFF for k in range(max(0, per_call - 8), per_call)}
    expected = len(last_window)
    state["armed"] = True
    np.testing.assert_array_equal(chip.mac(x[:128]), x[:128] @ w)
    lossy = chip.last_call.seconds
    assert state["lost"] == expected >= 4 and not last_window
    assert timeout <= lossy < 2 * timeout + clean + 0.3, (lossy, clean, chip.stats.as_dict())
    assert chip.stats.timeouts <= 8
    state["armed"] = False
    t0 = time.monotonic()
    np.testing.assert_array_equal(chip.mac(x[:128]), x[:128] @ w)
    assert time.monotonic() - t0 < clean + 0.3  # the loss did not slow the next call
    assert chip._pace_s < timeout


def test_silent_tcp_peer_fails_hello_within_the_deadline() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(CimTimeoutError) as info:
            Chip.open(f"tcp://127.0.0.1:{port}", timeout=0.2, deadline=1.0)
        elapsed = time.monotonic() - t0
        conn, _ = listener.accept()
        conn.close()
    assert 0.9 < elapsed < 1.5
    text = str(info.value)
    assert "no answer from tcp://127.0.0.1" in text and "HELLO sent" in text and "-> HELLO" in text


def test_silent_pty_fails_within_the_deadline() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        t0 = time.monotonic()
        with pytest.raises(CimTimeoutError, match="HELLO sent 2 times"):
            Chip.open(os.ttyname(slave), timeout=1.0, deadline=1.5)
        assert time.monotonic() - t0 < 1.5 + 0.3  # was 31 x timeout
    finally:
        os.close(master)
        os.close(slave)


def test_a_dead_port_fails_at_once_with_a_link_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        t0 = time.monotonic()
        with pytest.raises(LinkError, match=str(port)):
            Chip.open(f"tcp://127.0.0.1:{port}")
        assert time.monotonic() - t0 < 1.0


class _GoesSilent(ReplyFilter):
    """Answers until ``mute`` is set, then drops every reply."""

    def __init__(self) -> None:
        self.mute = False
        super().__init__(IDEAL, lambda f, i: self.mute)


def test_a_bulk_call_to_a_device_gone_silent_ends_at_its_deadline() -> None:
    link = _GoesSilent()
    chip = Chip(link, timeout=0.1, retries=100, deadline=1.0)  # type: ignore[arg-type]
    _, x = _setup(chip)
    link.mute = True
    t0 = time.monotonic()
    with pytest.raises(CimTimeoutError, match="deadline of 1 s"):
        chip.mac(x)
    assert 0.95 < time.monotonic() - t0 < 1.4  # was 241 x timeout
    assert chip.stats.deadline_misses == 1


def test_the_default_deadline_grows_with_the_bytes_at_the_line_rate() -> None:
    link = open_link("sim://?profile=ideal#rate=10000")  # 1000 bytes/s
    with Chip(link) as chip:
        assert chip.call_deadline(0) == DEADLINE_BASE_S
        assert chip.call_deadline(10_000) == pytest.approx(DEADLINE_BASE_S + 20.0)
    with Chip(open_link(IDEAL), deadline=2.5) as chip:
        assert chip.call_deadline(10**9) == 2.5
    with pytest.raises(ConfigError, match="deadline"):
        Chip(open_link(IDEAL), deadline=0)


# ---- the payload both ends agree, and what does not fit ------------------------------------------------------------
def test_the_payload_cap_is_the_smaller_of_both_ends() -> None:
    with Chip.open("sim://?profile=ideal&max_payload=262144") as chip:
        assert chip.payload_cap == 262144  # this host accepts up to 1 MiB unless told otherwise
    with Chip.open("sim://?profile=ideal&max_payload=262144", max_payload=4096) as chip:
        assert chip.payload_cap == 4096
        assert chip.link.bridge.session_cap == 4096  # type: ignore[attr-defined]
        w, x = _setup(chip)
        np.testing.assert_array_equal(chip.mac(x[:300]), x[:300] @ w)
        assert chip.stats.requests > 10


LARGE_IDEAL = ("sim://?profile=ideal&rows=1152&cols=256&weight_bits=8&input_bits=8&rows_per_conversion=128"
               "&adc_bits=7&adc_full_scale=127")


def test_codes_of_a_large_macro_are_split_by_row_group() -> None:
    """One vector's 147,456 codes (129 kB at 7 bits) exceed the 64 KiB cap: the driver asks by row group."""
    with Chip.open(LARGE_IDEAL) as chip:
        spec = chip.spec
        rng = np.random.default_rng(1)
        w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
        chip.write_weights(w)
        x = rng.integers(0, spec.input_max + 1, size=(3, spec.rows))
        codes = chip.mac_raw(x)
        np.testing.assert_array_equal(codes, spec.ideal_codes(spec.ideal_levels(x, w)))
        assert chip.stats.requests >= 3 + 2  # HELLO, the weights, and at least two row chunks
        part = chip.mac_raw(x[:, 100:700], row_start=100)  # groups 0..5 of a row range that starts mid-group
        np.testing.assert_array_equal(part, spec.ideal_codes(spec.ideal_levels(x[:, 100:700], w, 100)))


def test_a_mac_too_wide_for_the_cap_is_split_by_row_group_and_summed() -> None:
    with Chip.open("sim://?profile=ideal&rows=1024&max_payload=256") as chip:
        assert chip.payload_cap == 256
        w, _ = _setup(chip)
        x = np.random.default_rng(2).integers(0, chip.spec.input_max + 1, size=(5, 1024))
        np.testing.assert_array_equal(chip.mac(x), x @ w)


def test_what_cannot_be_split_is_refused_naming_the_sizes() -> None:
    with Chip.open("sim://?profile=default&max_payload=256") as chip, pytest.raises(ConfigError, match="single row"):
        chip.mac_raw(np.zeros((1, 256), dtype=np.int64))
    coarse = "sim://?profile=ideal&rows=1024&rows_per_conversion=16&adc_full_scale=16&max_payload=256"
    with Chip.open(coarse) as chip, pytest.raises(ConfigError, match="round its outputs"):
        chip.mac(np.zeros((1, 1024), dtype=np.int64))

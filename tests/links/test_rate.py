"""RateLink: the in-process twin paced like a UART of the given baud (10 bits a byte), in both directions."""

from __future__ import annotations

import time

import pytest

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.links import RateLink, open_link
from links_fakes import ping_traffic, read_exactly

BAUD = 1_000_000  # 100 000 bytes/s


def test_rate_hint_and_url(fake_twin):
    with open_link(f"sim://#rate={BAUD}") as link:
        assert isinstance(link, RateLink)
        assert link.rate_hint == BAUD / 10
        assert link.url == f"sim://#rate={BAUD}"


def test_bulk_throughput_matches_the_line_rate(fake_twin):
    req, rep, _ = ping_traffic(20_000, 2_000)  # 10 frames of 2017 bytes each way
    with open_link(f"sim://#rate={BAUD}") as link:
        t0 = time.monotonic()
        link.write(req)
        got = read_exactly(link, len(rep), 5.0)
        elapsed = time.monotonic() - t0
    assert got == rep
    # Full duplex: replies flow while later requests are still being sent, so the total is the request
    # time plus one reply frame.
    expected = (len(req) + len(rep) // 10) / (BAUD / 10)
    assert expected * 0.9 <= elapsed <= expected * 1.3 + 0.1


def test_replies_do_not_arrive_before_the_request_is_on_the_wire(fake_twin):
    req, rep, _ = ping_traffic(5_000, 5_000)
    with open_link(f"sim://#rate={BAUD}") as link:
        t0 = time.monotonic()
        link.write(req)  # returns once all but the 4 KiB transmit buffer is sent
        first = link.read(1, 2.0)
        t_first = time.monotonic() - t0
        rest = read_exactly(link, len(rep) - 1, 2.0)
        t_all = time.monotonic() - t0
    assert first + rest == rep
    line = len(req) / (BAUD / 10)
    assert t_first >= line * 0.95
    assert t_all >= line + len(rep) / (BAUD / 10) * 0.95


def test_empty_read_still_honours_the_timeout(fake_twin):
    with open_link(f"sim://#rate={BAUD}") as link:
        t0 = time.monotonic()
        assert link.read(10, 0.1) == b""
        assert 0.1 <= time.monotonic() - t0 <= 0.35


def test_rate_link_validates_in_code(fake_twin):
    with open_link("sim://") as inner:
        with pytest.raises(ConfigError, match="rate"):
            RateLink(inner, 10)
        with pytest.raises(ConfigError, match="fifo_bytes"):
            RateLink(inner, BAUD, fifo_bytes=-1)

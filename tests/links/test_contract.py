"""The Link contract, run against every backend: sim:// (fake controller), tcp://, a real pty, socket://."""

from __future__ import annotations

import threading
import time

import pytest

from cimlab.firmware_bridge.errors import ConfigError, LinkError
from cimlab.links import open_link
from links_fakes import fds_settle_to, open_fds, read_exactly

SLACK = 0.25  # scheduling slack allowed past a deadline on a shared 2-core machine, seconds


def test_empty_read_returns_after_timeout(peer):
    with open_link(peer.url) as link:
        t0 = time.monotonic()
        assert link.read(100, 0.2) == b""
        elapsed = time.monotonic() - t0
        assert 0.19 <= elapsed <= 0.2 + SLACK
        t0 = time.monotonic()
        assert link.read(100, 0.0) == b""
        assert time.monotonic() - t0 < SLACK


def test_read_returns_as_soon_as_bytes_arrive(peer):
    data, expected = peer.traffic(200, 100)
    with open_link(peer.url) as link:
        link.write(data)
        t0 = time.monotonic()
        got = link.read(1 << 16, 5.0)
        assert time.monotonic() - t0 < 1.0
        assert 1 <= len(got) <= len(expected)
        assert expected.startswith(got)


def test_partial_reads_respect_max_bytes(peer):
    data, expected = peer.traffic(300, 100)
    with open_link(peer.url) as link:
        link.write(data)
        got = bytearray()
        deadline = time.monotonic() + 5
        while len(got) < len(expected) and time.monotonic() < deadline:
            chunk = link.read(7, 0.5)
            assert len(chunk) <= 7
            got += chunk
        assert bytes(got) == expected
        assert link.stats.bytes_out == len(data)
        assert link.stats.bytes_in == len(expected)
        assert link.stats.writes == 1
        assert link.stats.reads >= len(expected) // 7


def test_one_mib_round_trip_with_a_concurrent_reader(peer):
    data, expected = peer.traffic(1 << 20, 65536)
    errors: list[BaseException] = []
    with open_link(peer.url, timeout=10.0) as link:

        def writer() -> None:
            try:
                link.write(data)
            except BaseException as err:  # noqa: BLE001 - reported by the test thread
                errors.append(err)

        t = threading.Thread(target=writer)
        t.start()
        try:
            got = read_exactly(link, len(expected), timeout=30.0)
        finally:
            t.join(30)
        assert not errors
        assert len(got) == len(expected)
        assert got == expected


def test_close_is_idempotent_and_releases_every_fd(peer):
    before = open_fds()
    link = open_link(peer.url)
    data, expected = peer.traffic(64, 64)
    link.write(data)
    assert read_exactly(link, len(expected), 5.0) == expected
    link.close()
    link.close()
    assert link.closed
    with pytest.raises(LinkError, match="closed"):
        link.read(1, 0.1)
    with pytest.raises(LinkError, match="closed"):
        link.write(b"x")
    assert fds_settle_to(before) == before


def test_bad_read_arguments_are_config_errors(peer):
    with open_link(peer.url) as link:
        with pytest.raises(ConfigError, match="max_bytes"):
            link.read(0, 0.1)
        with pytest.raises(ConfigError, match="timeout"):
            link.read(10, -1)
        with pytest.raises(ConfigError, match="timeout"):
            link.read(10, float("nan"))
        with pytest.raises(ConfigError, match="bytes"):
            link.write("text")  # type: ignore[arg-type]

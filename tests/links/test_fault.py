"""FaultLink: each fault does what it says, the counts follow the probabilities, and a seed reproduces a run."""

from __future__ import annotations

import time
from collections import deque

import pytest

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import Framer
from cimlab.links import FaultConfig, FaultLink, RateLink, open_link
from cimlab.links.base import Link
from cimlab.links.fault import MAX_INSERT
from cimlab.links.sim import SimLink
from links_fakes import ping_traffic, read_exactly


class Recorder(Link):
    """A link that records writes and serves queued chunks to reads."""

    def __init__(self) -> None:
        super().__init__("record://")
        self.written: list[bytes] = []
        self.chunks: deque[bytes] = deque()

    def _write(self, data: memoryview) -> None:
        self.written.append(bytes(data))

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        if not self.chunks:
            time.sleep(timeout)
            return b""
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            self.chunks.appendleft(chunk[max_bytes:])
        return chunk[:max_bytes]

    def _close(self) -> None:
        pass


MSG = bytes(range(200))


def _run(cfg: FaultConfig, n: int = 50) -> tuple[FaultLink, list[bytes]]:
    rec = Recorder()
    link = FaultLink(rec, cfg)
    for _ in range(n):
        link.write(MSG)
    return link, rec.written


def test_no_faults_passes_everything_untouched():
    link, written = _run(FaultConfig())
    assert written == [MSG] * 50
    assert link.faults.damaged_writes == 0 and link.faults.writes == 50


def test_drop():
    link, written = _run(FaultConfig(drop=1.0))
    assert written == []
    assert link.faults.write_drop == 50 == link.faults.damaged_writes


def test_flip_changes_exactly_one_bit():
    link, written = _run(FaultConfig(flip=1.0))
    assert len(written) == 50
    for w in written:
        diff = int.from_bytes(w, "big") ^ int.from_bytes(MSG, "big")
        assert len(w) == len(MSG) and diff.bit_count() == 1
    assert link.faults.write_flip == 50


def test_insert_adds_one_to_eight_bytes_somewhere():
    link, written = _run(FaultConfig(insert=1.0))
    for w in written:
        extra = len(w) - len(MSG)
        assert 1 <= extra <= MAX_INSERT
        assert any(w[:i] + w[i + extra :] == MSG for i in range(len(MSG) + 1))
    assert link.faults.write_insert == 50


def test_dup_sends_twice():
    link, written = _run(FaultConfig(dup=1.0))
    assert written == [MSG + MSG] * 50
    assert link.faults.write_dup == 50


def test_truncate_sends_a_strict_prefix():
    link, written = _run(FaultConfig(truncate=1.0), n=200)
    assert all(len(w) < len(MSG) and MSG.startswith(w) for w in written)
    assert len(written) >= 190  # an empty prefix writes nothing; rare at 200 bytes
    assert link.faults.write_truncate == 200


def test_stall_delays_but_does_not_damage():
    t0 = time.monotonic()
    link, written = _run(FaultConfig(stall=1.0, stall_s=0.02), n=5)
    assert time.monotonic() - t0 >= 5 * 0.02
    assert written == [MSG] * 5
    assert link.faults.write_stall == 5 and link.faults.damaged_writes == 0


def test_probabilities_show_in_the_counts():
    cfg = FaultConfig(drop=0.01, flip=0.02, insert=0.01, dup=0.01, truncate=0.01, seed=11)
    link, _ = _run(cfg, n=5000)
    f = link.faults
    # Binomial(5000, p): mean 50 or 100, sd ~7 or ~10; the bounds are > 4 sd wide.
    assert 20 <= f.write_drop <= 80
    assert 60 <= f.write_flip <= 140
    assert 20 <= f.write_insert <= 80 and 20 <= f.write_dup <= 80 and 20 <= f.write_truncate <= 80
    assert f.damaged_writes / f.writes >= 0.01


def test_same_seed_same_faults_other_seed_other_faults():
    cfg = dict(drop=0.1, flip=0.1, insert=0.1, dup=0.1, truncate=0.1)
    a = _run(FaultConfig(**cfg, seed=5), n=300)
    b = _run(FaultConfig(**cfg, seed=5), n=300)
    c = _run(FaultConfig(**cfg, seed=6), n=300)
    assert a[1] == b[1] and a[0].faults == b[0].faults
    assert a[1] != c[1]


def test_read_side_faults():
    rec = Recorder()
    link = FaultLink(rec, FaultConfig(flip=1.0))
    rec.chunks.extend([MSG, MSG])
    got = link.read(1000, 0.1)
    assert (int.from_bytes(got, "big") ^ int.from_bytes(MSG, "big")).bit_count() == 1
    assert link.faults.read_flip == 1

    rec2 = Recorder()
    dropper = FaultLink(rec2, FaultConfig(drop=1.0))
    rec2.chunks.extend([MSG, MSG])
    t0 = time.monotonic()
    assert dropper.read(1000, 0.1) == b""  # both chunks lost, then the deadline
    assert time.monotonic() - t0 >= 0.1
    assert dropper.faults.read_drop == 2

    rec3 = Recorder()
    inserter = FaultLink(rec3, FaultConfig(insert=1.0))
    rec3.chunks.append(MSG)
    first = inserter.read(len(MSG), 0.1)  # the inserted bytes overflow max_bytes and come next
    rest = inserter.read(100, 0.1)
    assert len(first) == len(MSG) and 1 <= len(rest) <= MAX_INSERT
    whole = first + rest
    extra = len(whole) - len(MSG)
    assert any(whole[:i] + whole[i + extra :] == MSG for i in range(len(MSG) + 1))


def test_fragment_builds_the_wrappers(fake_twin):
    with open_link("sim://#drop=0.25&flip=0.5&stall_s=0.01&fault_seed=9") as link:
        assert isinstance(link, FaultLink)
        assert link.config == FaultConfig(drop=0.25, flip=0.5, stall_s=0.01, seed=9)
        assert isinstance(link.inner, SimLink)
        assert link.url == "sim://#drop=0.25&flip=0.5&stall_s=0.01&fault_seed=9"
        assert link.inner.url == "sim://"
    with open_link("sim://#rate=3000000&truncate=0.1") as link:
        assert isinstance(link, FaultLink) and isinstance(link.inner, RateLink)
        assert link.rate_hint == 300_000
    assert len(fake_twin) == 2


def test_faults_through_the_sim_are_never_silent(fake_twin):
    """Every OK reply echoes a payload that was sent intact; every undamaged request still gets its reply."""
    payloads = []
    with open_link("sim://#flip=0.05&truncate=0.05&insert=0.05&fault_seed=3") as link:
        for i in range(200):
            req, _, (payload,) = ping_traffic(32, 32, seed=i)
            payloads.append(payload)
            link.write(req)
        data = read_exactly(link, 1 << 20, 0.5)
        damaged = link.faults.damaged_writes
    replies = [ev for ev in Framer().feed(data) if hasattr(ev, "payload")]
    ok = [r.payload for r in replies if r.status == 0]
    errors = [r for r in replies if r.status != 0]
    assert damaged >= 0.01 * 200
    assert set(ok) <= set(payloads)
    assert len(ok) >= 200 - damaged
    assert errors  # damaged payloads are answered BAD_CRC, not silently accepted


@pytest.mark.parametrize(
    ("fragment", "words"),
    [
        ("drop=2", ["drop", "0..1"]),
        ("flip=-0.1", ["flip", "0..1"]),
        ("flip=abc", ["flip", "number"]),
        ("stall_s=60", ["stall_s", "0..10"]),
        ("fault_seed=-1", ["fault_seed", "0.."]),
        ("bogus=1", ["unknown option", "bogus", "drop"]),
        ("rate=1", ["rate", "300.."]),
        ("rate=fast", ["rate", "integer"]),
    ],
)
def test_bad_fragments(fake_twin, fragment, words):
    with pytest.raises(ConfigError) as info:
        open_link(f"sim://#{fragment}")
    for word in words:
        assert word in str(info.value)
    assert fake_twin == []  # nothing was opened


def test_fault_config_validates_in_code():
    with pytest.raises(ConfigError, match="dup"):
        FaultConfig(dup=1.5)
    with pytest.raises(ConfigError, match="seed"):
        FaultConfig(seed=-3)

"""The driver against the twin: in-process (sim://), over a real pty and over TCP from `cimlab sim serve`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError, DeviceError, ShapeError
from cimlab.firmware_bridge.messages import Status
from cimlab.driver import Chip
from cimlab.links import open_link
from cimlab.twinproc import TwinProcess


def exercise(chip: Chip, seed: int = 0, batch: int = 64) -> None:
    """Program, read back and MAC on an ideal twin; every result exact."""
    spec = chip.spec
    rng = np.random.default_rng(seed)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
    assert chip.write_weights(w) == []
    np.testing.assert_array_equal(chip.read_weights(), w)
    x = rng.integers(0, spec.input_max + 1, size=(batch, spec.rows))
    np.testing.assert_array_equal(chip.mac(x), x @ w)
    r = spec.rows_per_conversion
    codes = chip.mac_raw(x[:3, : 2 * r])  # two row groups: what characterization asks for
    assert codes.shape == (3, spec.n_planes, 2, spec.n_slices, spec.cols)
    np.testing.assert_array_equal(spec.recombine(codes, x[:3, : 2 * r]), x[:3, : 2 * r] @ w[: 2 * r])
    codes = chip.mac_raw(x[:2, 1 : r + 3], row_start=r - 1)  # rows r-1 .. 2r straddle groups 0, 1 and 2
    assert codes.shape[2] == 3
    np.testing.assert_array_equal(spec.recombine(codes, x[:2, 1 : r + 3]), x[:2, 1 : r + 3] @ w[r - 1 : 2 * r + 1])


class TestSim:
    def test_identify_reports_the_profile_spec(self) -> None:
        with Chip.open("sim://?profile=ideal&seed=3&rows=100") as chip:
            hello = chip.identify()
            assert hello.spec.rows == 100
            assert "ideal" in hello.chip_id
            assert hello.max_payload == 64 * 1024

    def test_weights_mac_and_raw_are_exact_on_ideal(self) -> None:
        with Chip.open("sim://?profile=ideal") as chip:
            exercise(chip)

    def test_row_ranges(self) -> None:
        with Chip.open("sim://?profile=ideal") as chip:
            spec = chip.spec
            rng = np.random.default_rng(1)
            w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
            chip.write_weights(w)
            patch = rng.integers(spec.weight_min, spec.weight_max + 1, size=(7, spec.cols))
            chip.write_weights(patch, row_start=40)
            w[40:47] = patch
            np.testing.assert_array_equal(chip.read_weights(38, 12), w[38:50])
            x = rng.integers(0, spec.input_max + 1, size=(5, 20))
            np.testing.assert_array_equal(chip.mac(x, row_start=30), x @ w[30:50])
            one = chip.mac(x[0], row_start=30)
            assert one.shape == (spec.cols,)

    def test_bulk_transfers_split_into_many_frames(self) -> None:
        with Chip.open("sim://?profile=ideal&rows=1024&cols=128&max_payload=8192") as chip:
            assert chip.payload_cap == 8192
            exercise(chip, batch=300)
            assert chip.stats.frames_out > 30
            assert chip.stats.retries == 0

    def test_registers_and_status(self) -> None:
        with Chip.open("sim://?profile=ideal") as chip:
            assert chip.write_reg("SCRATCH", 0xDEADBEEF) == 0xDEADBEEF
            assert chip.read_reg("scratch") == 0xDEADBEEF
            assert chip.read_reg(0x00) == 0xC1A05A3D
            with pytest.raises(DeviceError) as info:
                chip.write_reg("ID", 1)
            assert info.value.status == Status.READ_ONLY
            before = chip.status()
            x = np.ones((10, chip.spec.rows), dtype=np.int64)
            chip.mac(x)
            after = chip.status()
            assert after.ops == before.ops + 10
            assert after.cycles > before.cycles
            assert chip.last_cost.cycles == after.cycles - before.cycles
            assert after.conversions - before.conversions == 10 * chip.spec.conversions_per_vector
            chip.reset()
            assert chip.status().ops == 0

    def test_ping_echoes_up_to_the_cap(self) -> None:
        with Chip.open("sim://?profile=ideal") as chip:
            assert chip.ping(b"") >= 0
            assert chip.ping(bytes(range(256)) * 256) >= 0
            with pytest.raises(ConfigError):
                chip.ping(bytes(64 * 1024 + 1))


class TestValidation:
    """Bad arrays are refused on the host with the field and shape named, before any byte is sent."""

    @pytest.fixture
    def chip(self):
        with Chip.open("sim://?profile=ideal") as chip:
            yield chip

    def test_weight_shape(self, chip: Chip) -> None:
        with pytest.raises(ShapeError, match=r"\[n_rows, 64\]"):
            chip.write_weights(np.zeros((4, 63), dtype=int))

    def test_weight_range(self, chip: Chip) -> None:
        with pytest.raises(ShapeError, match=r"-8\.\.7"):
            chip.write_weights(np.full((4, 64), 8))

    def test_weight_dtype(self, chip: Chip) -> None:
        with pytest.raises(ShapeError, match="integers"):
            chip.write_weights(np.zeros((4, 64)))

    def test_rows_out_of_range(self, chip: Chip) -> None:
        with pytest.raises(ShapeError, match="0..255"):
            chip.write_weights(np.zeros((4, 64), dtype=int), row_start=254)
        with pytest.raises(ShapeError):
            chip.read_weights(250, 10)

    def test_input_range_and_shape(self, chip: Chip) -> None:
        with pytest.raises(ShapeError, match="0..15"):
            chip.mac(np.full((2, 256), 16))
        with pytest.raises(ShapeError, match="shape"):
            chip.mac(np.zeros((2, 3, 4), dtype=int))
        with pytest.raises(ShapeError):
            chip.mac(np.full((2, 256), -1))
        sent = chip.stats.frames_out
        with pytest.raises(ShapeError):
            chip.mac(np.zeros((1, 300), dtype=int))
        assert chip.stats.frames_out == sent

    def test_unknown_register(self, chip: Chip) -> None:
        with pytest.raises(ConfigError, match="SCRATCH"):
            chip.read_reg("NOPE")


class TestRealLinks:
    """The same bytes through a pty and a TCP port served by a `cimlab sim serve` subprocess."""

    @pytest.mark.parametrize("pty", [True, False], ids=["pty", "tcp"])
    def test_served_twin(self, pty: bool) -> None:
        with TwinProcess(pty=pty, profile="ideal") as url:
            assert url.startswith("/dev/pts/" if pty else "tcp://127.0.0.1:")
            with Chip.open(url) as chip:
                exercise(chip, batch=200)
            # the twin's state outlives a host disconnecting, as a board's does
            with Chip.open(url) as chip:
                assert chip.read_reg("OPS") == 205

    def test_same_seed_same_codes_on_every_link(self) -> None:
        x = np.random.default_rng(5).integers(0, 16, size=(64, 256))
        w = np.random.default_rng(6).integers(-8, 8, size=(256, 64))
        results = []
        for url_ctx in (None, True, False):
            if url_ctx is None:
                with Chip.open("sim://?profile=default&seed=9") as chip:
                    chip.write_weights(w)
                    results.append(chip.mac_raw(x))
            else:
                with TwinProcess(pty=url_ctx, profile="default", seed=9) as url, Chip.open(url) as chip:
                    chip.write_weights(w)
                    results.append(chip.mac_raw(x))
        np.testing.assert_array_equal(results[0], results[1])
        np.testing.assert_array_equal(results[0], results[2])


class TestFaults:
    @pytest.mark.soak
    def test_soak_through_faults_never_corrupts(self) -> None:
        """>= 1% of frames damaged each way: every command succeeds or raises a typed error, nothing silent."""
        url = "sim://?profile=ideal&max_payload=2048#drop=0.01&flip=0.01&insert=0.005&dup=0.005&truncate=0.005&stall=0.002&stall_s=0.02&fault_seed=7"
        link = open_link(url, timeout=0.2)
        chip = Chip(link, timeout=0.2, retries=8)
        spec = chip.spec
        rng = np.random.default_rng(11)
        ok = failed = 0
        w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
        deadline = time.monotonic() + 40
        try:
            chip.write_weights(w)
            for i in range(150):
                if time.monotonic() > deadline:
                    break
                try:
                    if i % 3 == 0:
                        np.testing.assert_array_equal(chip.read_weights(), w)
                    else:
                        x = rng.integers(0, spec.input_max + 1, size=(int(rng.integers(1, 40)), spec.rows))
                        np.testing.assert_array_equal(chip.mac(x), x @ w)
                    ok += 1
                except CimTimeoutError:
                    failed += 1
            faults = link.faults
        finally:
            chip.close()
        assert ok >= 100
        assert failed <= ok * 0.05
        assert faults.damaged_writes >= 0.01 * faults.writes
        assert faults.damaged_chunks >= 0.01 * faults.chunks
        assert chip.stats.retries > 0

    def test_silent_device_times_out_within_deadline(self) -> None:
        link = open_link("sim://?profile=ideal#drop=1.0", timeout=0.05)
        chip = Chip(link, timeout=0.05, retries=2)
        t0 = time.monotonic()
        with pytest.raises(CimTimeoutError) as info:
            chip.identify()
        elapsed = time.monotonic() - t0
        chip.close()
        assert elapsed < 1.0
        assert "HELLO" in str(info.value) and "-> HELLO" in str(info.value)


class _GarbageLink:
    """A link whose peer never answers, only streams bytes that are not frames."""

    url = "garbage://"
    rate_hint = None

    def write(self, data: bytes) -> None:
        pass

    def read(self, max_bytes: int, timeout: float) -> bytes:
        time.sleep(min(timeout, 0.005))
        return b"\x00\x55" * 32

    def close(self) -> None:
        pass


def test_a_peer_streaming_garbage_still_times_out_on_schedule() -> None:
    chip = Chip(_GarbageLink(), timeout=0.05, retries=2)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(CimTimeoutError, match="HELLO sent 3 times"):
        chip.identify()
    assert time.monotonic() - t0 < 0.5  # resends on schedule, not at the call's far deadline
    assert chip.stats.retries == 2


class _SlowDeviceLink:
    """The ideal twin behind a bridge that finishes one request every ``per_request_s`` seconds, in order."""

    url = "slow://"
    rate_hint = None

    def __init__(self, per_request_s: float) -> None:
        from cimlab import chip_sim
        from cimlab.firmware_bridge.bridge import Bridge

        self.bridge = Bridge(chip_sim.make_twin("ideal", 0, {}))
        self.per_request_s = per_request_s
        self.queue: list[tuple[float, bytes]] = []
        self.busy_until = time.monotonic()

    def write(self, data: bytes) -> None:
        replays = self.bridge.stats.replays
        for reply in self.bridge.receive(data):
            if self.bridge.stats.replays > replays:  # answered from memory: no work, but replies leave in order
                replays = self.bridge.stats.replays
                self.queue.append((max([time.monotonic()] + [t for t, _ in self.queue[-1:]]), reply))
                continue
            self.busy_until = max(self.busy_until, time.monotonic()) + self.per_request_s
            self.queue.append((self.busy_until, reply))

    def read(self, max_bytes: int, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self.queue and self.queue[0][0] <= now:
                return self.queue.pop(0)[1]
            nxt = self.queue[0][0] if self.queue else end
            if now >= end:
                return b""
            time.sleep(max(0.0, min(nxt, end) - now))

    def close(self) -> None:
        pass


def test_a_device_working_through_a_full_window_is_not_retried() -> None:
    """8 requests in flight, each taking 0.15 s: the last answers 1.2 s after it was sent, past a 0.5 s timeout,
    but replies keep coming, so nothing is resent."""
    chip = Chip(_SlowDeviceLink(0.15), timeout=0.5, window=8)  # type: ignore[arg-type]
    spec = chip.spec
    x = np.random.default_rng(0).integers(0, spec.input_max + 1, size=(32 * 16, spec.rows))
    w = np.zeros((spec.rows, spec.cols), dtype=np.int64)
    chip.mac(x)
    assert chip.stats.frames_out >= 8
    assert chip.stats.retries == 0
    np.testing.assert_array_equal(chip.mac(x[:1]), (x[:1] @ w))


def test_the_driver_learns_a_device_slower_than_its_timeout() -> None:
    """Each request takes 0.1 s, twice the 0.05 s timeout. The first call's timeouts double the resend interval
    (Karn) until replies to requests sent once show the device's pace; from then on the driver waits for it: the
    next call resends nothing."""
    chip = Chip(_SlowDeviceLink(0.1), timeout=0.05, window=4, retries=8)  # type: ignore[arg-type]
    spec = chip.spec
    x = np.random.default_rng(1).integers(0, spec.input_max + 1, size=(64 * 8, spec.rows))
    chip.mac(x)
    first = chip.stats.timeouts
    assert chip.stats.requests >= 8
    assert first <= 4 * chip.stats.requests, chip.stats.as_dict()
    chip.mac(x)
    assert chip.stats.timeouts == first, chip.stats.as_dict()
    assert chip.stats.fast_retransmits == 0  # replies queued behind a resent request are not mistaken for lost

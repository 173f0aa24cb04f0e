"""Helpers for the RTL tests: an RTL twin with test hooks behind a Link, and the operations both twins run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from cimlab.chip_sim.rtl.twin import RtlTwin
from cimlab.driver import Chip
from cimlab.firmware_bridge.errors import DeviceError
from cimlab.links import open_link
from cimlab.links.base import Link

# Small geometries whose Verilator builds the suite shares (one build each per session, cached across sessions).
# TWOS: two's-complement bit slices, 1-bit planes, a partial last row group, the shortest conversions (2 cycles:
# back to back), no decode overhead, buffers small enough that requests take several runs.
TWOS = (
    "default",
    {
        "rows": "40",
        "cols": "3",
        "adc_cycles": "2",
        "op_overhead_cycles": "0",
        "in_buffer_words": "16",
        "out_buffer_words": "32",
    },
)
# NVM: offset storage in 2-bit cells, 2-bit input slices, an ADC whose full scale is not its top code, stuck cells,
# 200-cycle writes.
NVM = ("nvm-2bit", {"rows": "24", "cols": "2", "rows_per_conversion": "8", "stuck_at_0": "0.05"})
GEOMETRIES = {"twos": TWOS, "nvm": NVM}


class RtlLink(Link):
    """The bytes of an ``RtlTwin`` started by a test (hooks and all) as a Link."""

    def __init__(self, twin: RtlTwin, timeout: float = 5.0) -> None:
        super().__init__("rtl-test://", timeout=timeout)
        self.twin = twin

    def _write(self, data: memoryview) -> None:
        self.twin.write(data, self.write_deadline(len(data)))

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        return self.twin.read(max_bytes, timeout)

    def _close(self) -> None:
        self.twin.close()


@contextmanager
def rtl_chip(profile: str, overrides: Mapping[str, str], seed: int = 0, **kwargs: Any) -> Iterator[Chip]:
    """A Chip on an RTL twin (``kwargs`` go to RtlTwin: macro_hooks, run_timeout_s)."""
    twin = RtlTwin(profile, seed, overrides, **kwargs)
    chip = Chip(RtlLink(twin), timeout=5.0)
    try:
        chip.identify()
        yield chip
    finally:
        chip.close()


@contextmanager
def python_chip(profile: str, overrides: Mapping[str, str], seed: int = 0, mode: str = "fast") -> Iterator[Chip]:
    """A Chip on the Python twin (``mode``: fast or reference)."""
    query = "&".join(f"{k}={v}" for k, v in {"profile": profile, "seed": seed, "mode": mode, **overrides}.items())
    with Chip(open_link(f"sim://?{query}"), timeout=5.0) as chip:
        chip.identify()
        yield chip


def exercise(chip: Chip, seed: int, steps: int) -> list[Any]:
    """Random operations over random row ranges and batch sizes; every reply and the STATUS after each."""
    spec = chip.spec
    rng = np.random.default_rng(seed)
    out: list[Any] = []

    def rows() -> tuple[int, int]:
        r0 = int(rng.integers(0, spec.rows))
        return r0, int(rng.integers(1, spec.rows - r0 + 1))

    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    chip.write_weights(w)
    out += [chip.status()]
    for _ in range(steps):
        kind = rng.choice(["write", "read", "mac", "mac", "raw", "vdd"])
        r0, n = rows()
        if kind == "write":
            chip.write_weights(rng.integers(spec.weight_min, spec.weight_max + 1, (n, spec.cols)), row_start=r0)
            out.append(("write", r0, n))
        elif kind == "read":
            out.append(chip.read_weights(r0, n))
        elif kind == "vdd":
            out.append(chip.write_reg("VDD_MV", int(rng.integers(650, 950))))
        else:
            x = rng.integers(0, spec.input_max + 1, (int(rng.integers(1, 24)), n))
            out.append(chip.mac_raw(x, row_start=r0) if kind == "raw" else chip.mac(x, row_start=r0))
            out.append(chip.last_cost)
        out.append(chip.status())
    try:
        chip.write_reg("VDD_MV", 5000)
    except DeviceError as err:
        out.append(("refused", str(err.status)))
    out += [chip.read_reg("ERR_FLAGS"), chip.read_weights(), chip.status()]
    return out


def assert_same(a: list[Any], b: list[Any]) -> None:
    """Two runs of ``exercise`` agree item by item: arrays bit for bit, counters and costs exactly."""
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        if isinstance(u, np.ndarray):
            assert u.dtype == v.dtype and u.shape == v.shape, i
            assert np.array_equal(u, v), f"item {i}: {np.argwhere(u != v)[:5]}"
        else:
            assert u == v, f"item {i}: {u} != {v}"

"""Board bring-up self-test (``cimlab check``): is the link sound and does the macro compute?

Steps: HELLO; PING with payloads up to the frame cap; a scratch register round trip; random weights written and read
back; a batch of MACs and of raw conversions compared with what the MacroSpec says an ideal macro computes on the
weights read back. The comparison is exact when every output matches; otherwise it is statistical (correlation and
normalised RMS error against the ideal), since a real macro has analog errors: the test is there to catch broken
links, swapped bits and dead columns, not to grade accuracy (characterization does that).

The self-test overwrites the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cimlab.firmware_bridge.packing import weight_field
from cimlab.firmware_bridge.registers import ERR_BAD_REQUEST
from cimlab.driver import Chip

MIN_CORRELATION = 0.95
"""Below this, MAC outputs are not the macro's computation (wrong bit order, dead columns, noise)."""
MAX_NRMSE = 0.35
"""RMS error over the ideal outputs' standard deviation above which the macro is judged broken."""


@dataclass
class Step:
    """One self-test step."""

    name: str
    ok: bool
    detail: str


@dataclass
class CheckReport:
    """Everything ``cimlab check`` found."""

    hello: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    link: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every step passed."""
        return all(s.ok for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {
            "ok": self.ok,
            "hello": self.hello,
            "steps": [s.__dict__ for s in self.steps],
            "figures": self.figures,
            "link": self.link,
        }


def compare(y: np.ndarray, ideal: np.ndarray) -> tuple[bool, float, float]:
    """(exact, correlation, normalised RMS error) of outputs against the ideal."""
    y = np.asarray(y, dtype=np.float64).ravel()
    ideal = np.asarray(ideal, dtype=np.float64).ravel()
    exact = bool(np.array_equal(y, ideal))
    sd = float(ideal.std())
    if exact:
        return True, 1.0, 0.0
    if sd == 0.0 or float(y.std()) == 0.0:
        return False, 0.0, float("inf")
    corr = float(np.corrcoef(y, ideal)[0, 1])
    nrmse = float(np.sqrt(np.mean((y - ideal) ** 2)) / sd)
    return False, corr, nrmse


def run_check(chip: Chip, *, seed: int = 0, batch: int = 256, pings: int = 16) -> CheckReport:
    """Run the bring-up self-test on an open chip. Never raises for a failed step; link errors propagate."""
    rng = np.random.default_rng(seed)
    hello = chip.identify()
    spec = hello.spec
    rep = CheckReport(hello=hello.as_dict())
    chip.write_reg("ERR_FLAGS", 0xFFFFFFFF)  # write-1-to-clear: count only what this run causes
    rep.steps.append(Step("hello", True, f"{hello.chip_id} / {hello.firmware_id}: {spec.describe()}"))

    cap = chip.payload_cap
    sizes = np.unique(np.linspace(0, cap, num=max(2, pings)).astype(int))
    rtts = [chip.ping(rng.bytes(int(n))) for n in sizes]
    rep.figures["ping_rtt_ms_median"] = float(np.median(rtts) * 1e3)
    rep.steps.append(Step("ping", True, f"{len(sizes)} echoes of 0..{cap} bytes, median {np.median(rtts) * 1e3:.2f} ms"))

    value = int(rng.integers(0, 2**32))
    chip.write_reg("SCRATCH", value)
    back = chip.read_reg("SCRATCH")
    rep.steps.append(Step("registers", back == value, f"SCRATCH wrote 0x{value:08x}, read 0x{back:08x}"))

    w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
    t0 = time.perf_counter()
    bad_ranges = chip.write_weights(w)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    w_back = chip.read_weights()
    t_read = time.perf_counter() - t0
    mismatched = np.argwhere(w_back != w)
    nbytes = weight_field(spec).nbytes(w.size)  # the weights' bytes as they travel, packed
    rep.figures["weights_write_Bps"] = nbytes / t_write
    rep.figures["weights_read_Bps"] = nbytes / t_read
    detail = f"{spec.rows}x{spec.cols} written in {t_write * 1e3:.1f} ms, read in {t_read * 1e3:.1f} ms"
    if len(mismatched):
        cells = ", ".join(f"({r},{c})" for r, c in mismatched[:8])
        detail += f"; {len(mismatched)} cells differ on read-back (first: {cells}); CRC flagged {len(bad_ranges)} frame(s)"
    rep.steps.append(Step("weights", len(mismatched) == 0, detail))
    rep.figures["weight_cells_mismatched"] = float(len(mismatched))

    x = rng.integers(0, spec.input_max + 1, size=(batch, spec.rows))
    t0 = time.perf_counter()
    y = chip.mac(x)
    t_mac = time.perf_counter() - t0
    ideal = spec.recombine(spec.ideal_codes(spec.ideal_levels(x, w_back)), x)
    exact, corr, nrmse = compare(y, ideal)
    ok = exact or (corr >= MIN_CORRELATION and nrmse <= MAX_NRMSE)
    how = "exact" if exact else f"statistical: r={corr:.4f} (>= {MIN_CORRELATION}), nrmse={nrmse:.3f} (<= {MAX_NRMSE})"
    mismatch = int(np.count_nonzero(y != ideal))
    rep.steps.append(Step("mac", ok, f"{batch} vectors, {mismatch}/{y.size} outputs differ from ideal; {how}"))
    rep.figures.update(mac_vectors_per_s=batch / t_mac, mac_exact=float(exact), mac_correlation=corr, mac_nrmse=nrmse)
    rep.figures["mac_cycles"] = float(chip.last_cost.cycles)
    rep.figures["mac_energy_pj"] = chip.last_cost.energy_fj / 1e3

    n_raw = min(batch, 16)
    codes = chip.mac_raw(x[:n_raw])
    ideal_codes = spec.ideal_codes(spec.ideal_levels(x[:n_raw], w_back))
    exact_r, corr_r, nrmse_r = compare(codes, ideal_codes)
    ok_r = exact_r or (corr_r >= MIN_CORRELATION and nrmse_r <= MAX_NRMSE)
    how = "exact" if exact_r else f"statistical: r={corr_r:.4f}, nrmse={nrmse_r:.3f}"
    diff = np.abs(codes.astype(np.int64) - ideal_codes)
    rep.steps.append(Step("mac_raw", ok_r, f"{codes.size} conversions, mean |code error| {diff.mean():.3f}; {how}"))
    rep.figures.update(raw_exact=float(exact_r), raw_mean_abs_code_error=float(diff.mean()))

    st = chip.status()
    # bad frames (ERR_BAD_FRAME) are link damage the driver recovered from; a bad request is a host bug
    rep.steps.append(Step("status", not (st.error_flags & ERR_BAD_REQUEST) and not st.busy,
                          f"cycles {st.cycles}, ops {st.ops}, conversions {st.conversions}, "
                          f"energy {st.energy_fj / 1e6:.3f} nJ, error flags 0x{st.error_flags:x}"))
    rep.link = chip.stats.as_dict()
    return rep

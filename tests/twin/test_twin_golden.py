"""Golden codes: the twin draws the same codes as it did when they were recorded, however a batch is split.

``golden_codes.json`` holds, per case, the SHA-256 of the outputs of a fixed sequence of operations (MAC_RAW codes
and MAC outputs over whole and partial row ranges, after a VDD change and after a NOISE_SEED rekey; cycle and energy
counters are checked against the reference mode elsewhere). It was recorded on main's twin before the fused fast
path of issue 15 (commit ``recorded_on``) by running this module as a script on that checkout::

    .venv/bin/python tests/twin/test_twin_golden.py --record

Each case is replayed here with several splits of every batch (one vector, uneven pieces, pieces that cross the fast
path's chunk boundaries), so a change of chunking or kernel that alters a single code fails the test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cimlab import chip_sim
from cimlab.chip_sim.controller import TwinController
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.registers import BY_NAME
from cimlab.firmware_bridge.spec import MacroSpec

GOLDEN = Path(__file__).with_name("golden_codes.json")

# name -> (profile, seed, overrides, batch, splits)
CASES: dict[str, tuple[str, int, dict[str, str], int, list[list[int]]]] = {
    "default-s0": ("default", 0, {}, 70, [[70], [1, 69], [33, 37], [5] * 14]),
    "default-s-big": ("default", 2**63 + 12345, {}, 40, [[40], [31, 9]]),
    "default-lsb-not-one": ("default", 4, {"adc_full_scale": "20", "noise_sigma_lsb": "0.5", "stuck_at_0": "0.02",
                                           "stuck_at_1": "0.02"}, 40, [[40], [7, 33]]),
    "large-s1": ("large", 1, {}, 12, [[12], [3, 9], [5, 7]]),
    "nvm-2bit-s5": ("nvm-2bit", 5, {}, 50, [[50], [17, 1, 32]]),
    "nvm-4bit-s6": ("nvm-4bit", 6, {}, 30, [[30], [29, 1], [8, 22]]),
    "ideal-s0": ("ideal", 0, {}, 40, [[40], [39, 1]]),
    "data-driven-s3": ("default", 3, {"error_model": "*"}, 70, [[70], [1, 69], [40, 30]]),
}


def synthetic_model(spec: MacroSpec) -> ErrorModel:
    """An error model that does not depend on the twin: the ideal code, often one off, now and then two off."""
    rng = np.random.default_rng(2024)
    J, L, C = spec.physical_cols, spec.n_levels, spec.n_codes
    ideal = spec.ideal_codes(np.arange(L))
    counts = np.zeros((J, L, C), dtype=np.int64)
    for delta, (lo, hi) in {0: (500, 1000), -1: (0, 60), 1: (0, 60), -2: (0, 5), 2: (0, 5)}.items():
        code = np.clip(ideal + delta, 0, spec.adc_max)
        np.add.at(counts, (slice(None), np.arange(L), code), rng.integers(lo, hi, (J, L)))
    return ErrorModel(spec, counts, chip_id="golden")


def make_case_twin(name: str, folder: Path) -> TwinController:
    """The twin of case ``name`` (its error model, if any, written under ``folder``)."""
    profile, seed, overrides, _, _ = CASES[name]
    if overrides.get("error_model") == "*":
        spec = chip_sim.load_profile(profile).spec
        path = synthetic_model(spec).save(folder / f"{name}.npz")
        overrides = {**overrides, "error_model": str(path)}
    return chip_sim.make_twin(profile, seed, overrides)


def _digest(parts: list[np.ndarray]) -> str:
    whole = np.concatenate(parts)
    h = hashlib.sha256(f"{whole.dtype.str}{whole.shape}".encode())
    h.update(np.ascontiguousarray(whole).tobytes())
    return h.hexdigest()


def observe(twin: TwinController, batch: int, split: list[int]) -> dict[str, str]:
    """Run the case's fixed operations, each batch split as ``split``; the digest of every output."""
    spec = twin.spec
    rng = np.random.default_rng(77)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (batch, spec.rows)).astype(spec.input_dtype)
    twin.write_weights(0, w)
    assert sum(split) == batch

    def run(op: Callable[[int, np.ndarray], tuple[np.ndarray, object]], row0: int, xs: np.ndarray) -> str:
        parts, start = [], 0
        for n in split:
            parts.append(op(row0, xs[start : start + n])[0])
            start += n
        return _digest(parts)

    lo, hi = spec.rows // 8 + 3, spec.rows * 3 // 4 + 1
    seen = {
        "mac_raw": run(twin.mac_raw, 0, x),
        "mac": run(twin.mac, 0, x),
        "mac_raw_rows": run(twin.mac_raw, lo, x[:, lo:hi]),
        "mac_rows": run(twin.mac, lo, x[:, lo:hi]),
    }
    twin.write_reg(BY_NAME["VDD_MV"].addr, 700)
    seen["mac_raw_700mv"] = run(twin.mac_raw, 0, x)
    twin.write_reg(BY_NAME["NOISE_SEED"].addr, 99)
    seen["mac_rekeyed"] = run(twin.mac, 0, x)
    return seen


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, str]]:
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_codes_equal_the_recorded_ones_whatever_the_split(
    name: str, golden: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    _, _, _, batch, splits = CASES[name]
    for split in splits:
        got = observe(make_case_twin(name, tmp_path), batch, split)
        assert got == golden[name], f"case {name}, split {split}"


def record() -> None:
    """Write ``golden_codes.json`` from the twin as it is now (with each case's first split)."""
    import tempfile

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                            cwd=GOLDEN.parent).stdout.strip()
    cases = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (_, _, _, batch, splits) in CASES.items():
            cases[name] = observe(make_case_twin(name, Path(folder)), batch, splits[0])
    GOLDEN.write_text(json.dumps({"recorded_on": commit, "cases": cases}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--record", action="store_true", help="overwrite golden_codes.json")
    if ap.parse_args().record:
        record()
    else:
        sys.exit(pytest.main([__file__, "-q"]))

#!/usr/bin/env python3
"""The RTL twin next to the Python twin: does it agree bit for bit, and how fast does it simulate?

    .venv/bin/python scripts/bench_rtl.py                          # default profile, 64 rows
    .venv/bin/python scripts/bench_rtl.py --set rows=256 --batch 64 --steps 40

1. **Agreement** on the profile (``default`` here; small geometries run in tests/rtl): both twins, the same seed,
   the same random operations (WRITE_WEIGHTS, READ_WEIGHTS, MAC, MAC_RAW over random row ranges and batch sizes,
   VDD changes); every reply and the STATUS after it must be identical (codes, outputs, weights, cycles from the
   RTL's own counters, conversions, energy).
2. **Speed**, through the same link code (``sim://`` and ``sim://?backend=rtl``), on a batch of MACs over every
   row: MAC vectors/s and the chip's simulated cycles per wall-clock second, for each twin; the Python twin is the
   baseline (ratios = RTL / Python). The RTL twin's build is cached; its first start is not timed.

Prints a table, then, as its last line, one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "rtl"))
from cimlab.driver import Chip  # noqa: E402
from rtl_helpers import assert_same, exercise  # noqa: E402


def _url(backend: str, profile: str, seed: int, sets: dict[str, str], simulator: str) -> str:
    query = {"profile": profile, "seed": seed, **sets}
    if backend == "rtl":
        query = {"backend": "rtl", "simulator": simulator, **query}
    return "sim://?" + "&".join(f"{k}={v}" for k, v in query.items())


def _speed(url: str, batch: int, repeat: int) -> dict[str, float]:
    with Chip.open(url, timeout=30.0) as chip:
        spec = chip.spec
        rng = np.random.default_rng(1)
        chip.write_weights(rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols)))
        x = rng.integers(0, spec.input_max + 1, (batch, spec.rows))
        best, cycles = float("inf"), 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            chip.mac(x)
            best = min(best, time.perf_counter() - t0)
            cycles = chip.last_cost.cycles
    return {"vectors_per_s": batch / best, "cycles_per_s": cycles / best, "seconds": best, "cycles": cycles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="random operations in the agreement check")
    ap.add_argument("--batch", type=int, default=64, help="MAC vectors in the speed run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--simulator", default="verilator", choices=["verilator"])
    args = ap.parse_args()
    sets = {"rows": "64", **dict(s.split("=", 1) for s in args.sets)}
    urls = {b: _url(b, args.profile, args.seed, sets, args.simulator) for b in ("python", "rtl")}

    t0 = time.perf_counter()
    runs = {}
    for backend, url in urls.items():
        with Chip.open(url, timeout=30.0) as chip:
            spec = chip.spec
            runs[backend] = exercise(chip, seed=args.seed, steps=args.steps)
    assert_same(runs["rtl"], runs["python"])  # raises, naming the first item that differs
    agree_s = time.perf_counter() - t0
    n_arrays = sum(isinstance(v, np.ndarray) for v in runs["rtl"])

    speed = {b: _speed(url, args.batch, args.repeat) for b, url in urls.items()}
    ratio = {k: speed["rtl"][k] / speed["python"][k] for k in ("vectors_per_s", "cycles_per_s")}
    print(f"{spec.describe()}; profile {args.profile}, overrides {sets}, seed {args.seed}")
    print(
        f"agreement: {args.steps} random operations, {len(runs['rtl'])} replies and STATUS ({n_arrays} arrays)"
        f" identical between the RTL twin ({args.simulator}) and the Python twin [{agree_s:.1f} s]"
    )
    print(f"{'twin':8} {'MAC vectors/s':>14} {'sim cycles/s':>14} {'batch s':>8} {'chip cycles':>12}")
    for backend, s in speed.items():
        print(
            f"{backend:8} {s['vectors_per_s']:>14.1f} {s['cycles_per_s']:>14.3g} {s['seconds']:>8.3f}"
            f" {s['cycles']:>12}"
        )
    print(f"RTL / Python: vectors/s {ratio['vectors_per_s']:.4f}, simulated cycles/s {ratio['cycles_per_s']:.4f}")
    print(
        json.dumps(
            {
                "identical": True,
                "operations": args.steps,
                "replies": len(runs["rtl"]),
                "rtl_vectors_per_s": round(speed["rtl"]["vectors_per_s"], 2),
                "python_vectors_per_s": round(speed["python"]["vectors_per_s"], 1),
                "rtl_cycles_per_s": round(speed["rtl"]["cycles_per_s"]),
                "python_cycles_per_s": round(speed["python"]["cycles_per_s"]),
                "rtl_over_python_vectors_per_s": round(ratio["vectors_per_s"], 5),
                "rtl_over_python_cycles_per_s": round(ratio["cycles_per_s"], 5),
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark the twin's fast MAC path against a bound measured in the same process.

For each profile: program random weights, then time ``TwinController.mac`` on a batch of random input vectors
(best of ``--repeat``). The bound is what any twin must at least do: float32 BLAS computing the same partial sums
(every input slice x row group x weight slice x column, as a batched matmul over row groups, in the same chunks of
vectors and with its inputs prepared outside the timing) plus one float32 normal draw per conversion
(``Generator.standard_normal(dtype=float32)`` into a reused buffer); its best chunk size and best repeat are kept.

    efficiency = bound time / twin time        (target >= 0.5; above 1 the twin beats the bound)

The same is measured for a data-driven twin of the first profile (codes drawn from an error model measured on
that profile's twin), against the same bound.

Also reported: MAC vectors/s, multiply-accumulates/s and conversions/s of the twin, and what the modelled chip
itself would take (cycles, latency at its clock and energy per vector, TOPS and TOPS/W at 2 ops per MAC).

The twin beats the bound's noise cost by drawing 16 random bits per conversion (four conversions per 64-bit
PCG64 word) and looking up a table of 65536 normal quantiles, instead of a ziggurat normal per conversion.

Prints a readable table, then, as its last line, one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

import cimlab.chip_sim.controller as twin_controller
from cimlab import chip_sim
from cimlab.firmware_bridge.errmodel import ErrorModel


def _best(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measured_model(profile: str, seed: int, folder: str) -> str:
    """Characterize a twin of ``profile`` (random weights and inputs through MAC_RAW); the model's path."""
    twin = chip_sim.make_twin(profile, seed)
    spec = twin.spec
    rng = np.random.default_rng(seed + 2)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    twin.write_weights(0, w)
    model = ErrorModel.empty(spec, chip_id=twin.identity().chip_id, provenance={"tool": "bench_twin"})
    for _ in range(8):
        x = rng.integers(0, spec.input_max + 1, (50, spec.rows)).astype(spec.input_dtype)
        codes, _ = twin.mac_raw(0, x)
        model.add(spec.ideal_levels(x, w), codes)
    return str(model.save(os.path.join(folder, f"{profile}.npz")))


def bench_profile(
    profile: str, batch: int, repeat: int, seed: int, overrides: dict[str, str] | None = None, label: str = ""
) -> dict[str, float | int | str]:
    """Figures of one profile."""
    twin = chip_sim.make_twin(profile, seed, overrides)
    spec = twin.spec
    rng = np.random.default_rng(seed)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (batch, spec.rows)).astype(spec.input_dtype)
    twin.write_weights(0, w)
    chunk = twin.chunk_vectors
    twin.mac(0, x[:chunk])  # warm-up (tables, allocator)

    # ---- the bound: float32 BLAS partial sums + one float32 normal per conversion ----------------------------
    P, G, R, J = spec.n_planes, spec.n_groups, spec.rows_per_conversion, spec.physical_cols
    digits = np.zeros((G * R, J), dtype=np.float32)
    digits[: spec.rows] = spec.weights_to_slices(w).reshape(spec.rows, J)
    weights = digits.reshape(G, R, J)  # every (row group, row, physical column) cell
    planes = spec.inputs_to_planes(x)  # [batch, P, rows]
    pad = np.zeros((batch, P, G * R), dtype=planes.dtype)
    pad[:, :, : spec.rows] = planes
    normal = np.random.default_rng(seed + 1)

    def bound_run(bchunk: int):  # noqa: ANN202
        blocks = [
            np.ascontiguousarray(pad[b : b + bchunk].reshape(-1, G, R).transpose(1, 0, 2), dtype=np.float32)
            for b in range(0, batch, bchunk)
        ]
        out = {n: np.empty((G, n, J), dtype=np.float32) for n in {blk.shape[1] for blk in blocks}}
        noise = {n: np.empty(G * n * J, dtype=np.float32) for n in out}

        def run() -> None:
            for blk in blocks:
                n = blk.shape[1]
                np.matmul(blk, weights, out=out[n])
                normal.standard_normal(out=noise[n], dtype=np.float32)

        run()  # warm-up
        return run

    bounds = [bound_run(c) for c in sorted({chunk, 4 * chunk, 16 * chunk}) if c <= max(batch, chunk)]
    # interleave twin and bound repeats so a change in machine load hits both alike
    twin_s = bound_s = float("inf")
    for _ in range(repeat):
        twin_s = min(twin_s, _best(lambda: twin.mac(0, x), 1))
        bound_s = min(bound_s, *(_best(run, 1) for run in bounds))
    _, cost = twin.mac(0, x[:1])
    conversions = batch * spec.conversions_per_vector
    macs = batch * spec.rows * spec.cols
    latency = cost.cycles / spec.clock_hz
    ops = 2 * spec.rows * spec.cols
    return {
        "profile": label or profile,
        "batch": batch,
        "chunk_vectors": chunk,
        "twin_s": twin_s,
        "bound_s": bound_s,
        "efficiency": bound_s / twin_s,
        "vectors_per_s": batch / twin_s,
        "macs_per_s": macs / twin_s,
        "conversions_per_s": conversions / twin_s,
        "chip_cycles_per_vector": cost.cycles,
        "chip_latency_us_per_vector": latency * 1e6,
        "chip_energy_pj_per_vector": cost.energy_fj / 1e3,
        "chip_tops": ops / latency / 1e12,
        "chip_tops_per_w": ops / (cost.energy_fj * 1e-15) / 1e12,
    }


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default="default,large", help="comma-separated profile names or files")
    ap.add_argument("--batch", type=int, default=4096, help="input vectors per timed MAC (default profile)")
    ap.add_argument("--large-batch", type=int, default=1024, help="input vectors per timed MAC on other profiles")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats (best kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-data-driven", action="store_true", help="skip the data-driven twin of the first profile")
    args = ap.parse_args()
    rows = []
    profiles = args.profiles.split(",")
    for profile in profiles:
        batch = args.batch if profile == "default" else args.large_batch
        rows.append(bench_profile(profile, batch, args.repeat, args.seed))
    if not args.no_data_driven:
        first = profiles[0]
        with tempfile.TemporaryDirectory() as folder:
            path = measured_model(first, args.seed, folder)
            batch = args.batch if first == "default" else args.large_batch
            rows.append(bench_profile(first, batch, args.repeat, args.seed, {"error_model": path},
                                      label=f"{first}-data-driven"))

    header = ("profile", "batch", "twin s", "bound s", "efficiency", "vectors/s", "MAC/s", "conversions/s",
              "chip us/vec", "chip pJ/vec", "chip TOPS/W")
    widths = [max(13, max(len(str(r["profile"])) for r in rows))] + [13] * (len(header) - 1)
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for r in rows:
        cells = (r["profile"], r["batch"], f"{r['twin_s']:.3f}", f"{r['bound_s']:.3f}", f"{r['efficiency']:.2f}",
                 f"{r['vectors_per_s']:.4g}", f"{r['macs_per_s']:.4g}", f"{r['conversions_per_s']:.4g}",
                 f"{r['chip_latency_us_per_vector']:.3f}", f"{r['chip_energy_pj_per_vector']:.1f}",
                 f"{r['chip_tops_per_w']:.1f}")
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    figures = {
        "target_efficiency": 0.5,
        "chunk_conversions": twin_controller.CHUNK_CONVERSIONS,
        "profiles": {r["profile"]: {k: v for k, v in r.items() if k != "profile"} for r in rows},
    }
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark the twin's MAC against what its conversion stage cannot beat on this machine, in the same process.

For every profile and both converters (the analytic model, and a data-driven twin drawing from an error model
measured on that profile's twin): program random weights, then time ``TwinController.mac`` on a batch of random
inputs (wall clock; once after every timed run of the baselines, so a change of machine load hits all alike and
the twin gets as many tries as they do; the best kept). Baselines, each the best over chunk sizes, over the BLAS on
one thread and on all, and over ``--repeat`` tries:

- **limit**: the partial sums by float32 BLAS (every input slice x row group x weight slice x column, as a batched
  matmul over row groups into a reused buffer, inputs prepared outside the timing) plus one pass over the
  conversions' values (one in-place float32 operation on each chunk of sums while it is in cache). A conversion
  stage needs at least its inputs and to touch each once: ``limit ratio = limit / twin`` (target >= 0.5).
- **old bound**: the same BLAS plus one float32 normal per conversion (numpy's ziggurat into a reused buffer), the
  bound this script reported before issue 15: ``old-bound ratio = old bound / twin`` (target >= 1).

Where the time goes is measured by ablation: the fused kernel (``cimlab.chip_sim.kernels``) run on the same batch
with its stages switched off from the last one back (input patterns and loop, random items, partial sums,
scale/offset/noise, look-up, codes out), single-threaded CPU time per conversion, the stages run in turn and each
the best of ``3 x --repeat``; "recombination" also holds what ``mac`` does after the kernel (slice weights,
full-scale ratio).

Last, the same layer as issue 15 (the ``default`` profile: 256 inputs x 64 outputs, 4-bit weights and inputs, 16
rows per conversion, 5-bit ADC, read noise; batch 4096, best of 3) as conversions/s and MAC/s next to the published
figures of a comparable simulator, with their sources. Prints the tables, then one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from cimlab import chip_sim
from cimlab.chip_sim import kernels
from cimlab.chip_sim.controller import TwinController
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.spec import MacroSpec

STAGE_NAMES = ("patterns", "random items", "partial sums", "scale/offset/noise", "look-up", "recombination")
LAYER = {"profile": "default", "batch": 4096, "repeat": 3}
"""Issue 15's layer: the default profile's macro, batch 4096, best of 3."""

CIFAR_IMAGES = 10_000
ASIM_PUBLISHED = (
    # (what, seconds for CIFAR_IMAGES images of ResNet-18 W4A4 on CIFAR-10, source)
    ("ASiM, i9-13980HX CPU", 6000.0, "github.com/Keio-CSG/ASiM README, 'Simulation Time' (batch 128)"),
    ("ASiM, RTX 4080 Laptop GPU", 230.0, "github.com/Keio-CSG/ASiM README, 'Simulation Time' (batch 1024)"),
)
ASIM_SAME_LAYER_S = (1.06, 1.39)
"""ASiM's ASiMLinear (simulation mode, torch on 2 threads) on issue 15's layer, quiet 2-core machine (issue 15)."""


def resnet18_cifar_macs() -> int:
    """Multiply-accumulates of one 32x32 image through the CIFAR-10 ResNet-18 (3x3 stem, four stages of two basic
    blocks, 1x1 projection shortcuts, 512 -> 10 classifier), counted from its layer shapes."""
    macs = 32 * 32 * 64 * 3 * 9
    size, c_in = 32, 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        size //= stride
        macs += size * size * c_out * c_in * 9 + 3 * size * size * c_out * c_out * 9
        if c_in != c_out:
            macs += size * size * c_out * c_in
        c_in = c_out
    return macs + 512 * 10


def _blas_threads(n: int | None) -> AbstractContextManager[object]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it the BLAS runs on its default threads only
        return nullcontext()
    return threadpool_limits(n) if n else nullcontext()


def _wall(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measured_model(profile: str, seed: int, folder: str) -> str:
    """Characterize a twin of ``profile`` (random weights and inputs through MAC_RAW); the model's path."""
    twin = chip_sim.make_twin(profile, seed)
    spec = twin.spec
    rng = np.random.default_rng(seed + 2)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    twin.write_weights(0, w)
    model = ErrorModel.empty(spec, chip_id=twin.identity().chip_id, provenance={"tool": "bench_twin"})
    vectors = max(8, min(400, (1 << 23) // spec.conversions_per_vector))
    for _ in range(4):
        x = rng.integers(0, spec.input_max + 1, (vectors // 4, spec.rows)).astype(spec.input_dtype)
        codes, _ = twin.mac_raw(0, x)
        model.add(spec.ideal_levels(x, w), codes)
    return str(model.save(os.path.join(folder, f"{profile}.npz")))


class Baselines:
    """The limit and the old bound of one profile's batch (see the module docstring)."""

    def __init__(self, spec: MacroSpec, weights: np.ndarray, x: np.ndarray, chunks: list[int], seed: int) -> None:
        P, G, R, J = spec.n_planes, spec.n_groups, spec.rows_per_conversion, spec.physical_cols
        digits = np.zeros((G * R, J), dtype=np.float32)
        digits[: spec.rows] = spec.weights_to_slices(weights).reshape(spec.rows, J)
        self.w = digits.reshape(G, R, J)  # every (row group, row, physical column) cell
        planes = np.zeros((x.shape[0], P, G * R), dtype=np.uint8)
        planes[:, :, : spec.rows] = spec.inputs_to_planes(x)
        # per chunk size, the BLAS inputs [G, vectors * P, R], prepared outside the timing
        self.runs = [
            [np.ascontiguousarray(planes[b : b + c].reshape(-1, G, R).transpose(1, 0, 2), dtype=np.float32)
             for b in range(0, x.shape[0], c)]
            for c in chunks
        ]
        self.normal = np.random.default_rng(seed + 1)
        self.scale = np.float32(1.0001)

    def time(self, repeat: int, twin: Callable[[], object]) -> tuple[float, float, float]:
        """(twin, limit, old bound) seconds, the baselines each the best over chunk sizes, BLAS threads and
        ``repeat`` tries; ``twin`` is timed after each of their runs, as many times, and its best kept."""
        G, _, J = self.w.shape
        best_twin = limit = old = float("inf")
        for blocks in self.runs:
            out = {n: np.empty((G, n, J), dtype=np.float32) for n in {b.shape[1] for b in blocks}}
            noise = {n: np.empty(G * n * J, dtype=np.float32) for n in out}

            def with_pass() -> None:
                for b in blocks:
                    o = out[b.shape[1]]
                    np.matmul(b, self.w, out=o)
                    np.multiply(o, self.scale, out=o)

            def with_normal() -> None:
                for b in blocks:
                    n = b.shape[1]
                    np.matmul(b, self.w, out=out[n])
                    self.normal.standard_normal(out=noise[n], dtype=np.float32)

            for threads in (1, None):
                with _blas_threads(threads):
                    with_pass()  # warm-up
                    for _ in range(repeat):
                        limit = min(limit, _wall(with_pass))
                        old = min(old, _wall(with_normal))
                        best_twin = min(best_twin, _wall(twin))
        return best_twin, limit, old


def stage_breakdown(twin: TwinController, x: np.ndarray, repeat: int) -> dict[str, float]:
    """CPU seconds per conversion of each kernel stage on one thread (ablation; see the module docstring)."""
    spec = twin.spec
    engine = twin._engine  # noqa: SLF001 - the benchmark times the engine's stages directly
    op = twin.converter.fused()
    state = twin._stream.pcg_state() if twin._stream is not None else None  # noqa: SLF001
    args = (x, 0, 0, spec.n_groups, twin._w32, twin._rowsum, op, state, 0)  # noqa: SLF001
    runs = [lambda s=s: engine.mac(*args, raw=False, stages=s) for s in range(kernels.ALL_STAGES + 1)]
    runs.append(lambda: twin.mac(0, x))
    threads = engine.threads
    engine.threads = 1
    try:
        for run in runs:  # compile, tables
            run()
        best = [float("inf")] * len(runs)
        for _ in range(repeat):
            for i, run in enumerate(runs):  # interleaved, so that a change of machine load hits every stage alike
                t0 = time.thread_time()
                run()
                best[i] = min(best[i], time.thread_time() - t0)
    finally:
        engine.threads = threads
    cumulative = best[:-1]
    cumulative[-1] = max(best[-1], cumulative[-1])
    conversions = x.shape[0] * spec.conversions_per_vector
    steps = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:], strict=False)]
    return {name: max(0.0, s) / conversions for name, s in zip(STAGE_NAMES, steps, strict=True)}


def bench(profile: str, batch: int, repeat: int, seed: int, model: str | None, breakdown: bool
          ) -> dict[str, object]:
    """Figures of one profile and converter."""
    twin = chip_sim.make_twin(profile, seed, {"error_model": model} if model else None)
    spec = twin.spec
    rng = np.random.default_rng(seed)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (batch, spec.rows)).astype(spec.input_dtype)
    twin.write_weights(0, w)
    twin.mac(0, x[:8])  # compile (first use), tables
    per_vector = spec.conversions_per_vector
    chunks = sorted({max(1, c // per_vector) for c in (1 << 17, 1 << 19, 1 << 21)})
    baselines = Baselines(spec, w, x, chunks, seed)
    twin_s, limit_s, old_s = baselines.time(repeat, lambda: twin.mac(0, x))
    conversions = batch * per_vector
    row: dict[str, object] = {
        "profile": profile, "converter": "data-driven" if model else "analytic", "batch": batch,
        "twin_s": twin_s, "limit_s": limit_s, "old_bound_s": old_s,
        "limit_ratio": limit_s / twin_s, "old_bound_ratio": old_s / twin_s,
        "conversions_per_s": conversions / twin_s, "macs_per_s": batch * spec.rows * spec.cols / twin_s,
    }
    if breakdown:
        row["ns_per_conversion"] = {k: v * 1e9 for k, v in stage_breakdown(twin, x[: max(1, batch // 4)],
                                                                         3 * repeat).items()}
    return row


def layer_figures(repeat: int, seed: int) -> dict[str, object]:
    """Issue 15's layer: the twin's conversions/s and MAC/s next to the published figures."""
    twin = chip_sim.make_twin(LAYER["profile"], seed)
    spec = twin.spec
    rng = np.random.default_rng(seed)
    twin.write_weights(0, rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols)))
    x = rng.integers(0, spec.input_max + 1, (LAYER["batch"], spec.rows)).astype(spec.input_dtype)
    twin.mac(0, x[:8])
    best = min(_wall(lambda: twin.mac(0, x)) for _ in range(max(repeat, LAYER["repeat"])))
    macs = LAYER["batch"] * spec.rows * spec.cols
    published = [
        {"simulator": what, "macs_per_s": CIFAR_IMAGES * resnet18_cifar_macs() / seconds,
         "how": f"estimated: {CIFAR_IMAGES} images x {resnet18_cifar_macs() / 1e9:.3f} GMAC / {seconds:g} s",
         "source": source}
        for what, seconds, source in ASIM_PUBLISHED
    ]
    published.append({
        "simulator": "ASiM ASiMLinear, this layer, 2 CPU threads",
        "macs_per_s": macs / float(np.mean(ASIM_SAME_LAYER_S)),
        "how": f"measured side by side: {ASIM_SAME_LAYER_S[0]}-{ASIM_SAME_LAYER_S[1]} s for the batch",
        "source": "issue 15 (quiet 2-core machine)",
    })
    return {
        "twin_s": best, "conversions_per_s": LAYER["batch"] * spec.conversions_per_vector / best,
        "macs_per_s": macs / best, "speedup_vs_asim_same_layer": [s / best for s in ASIM_SAME_LAYER_S],
        "published": published, "spec": spec.describe(),
    }


def _table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print(" | ".join(f"{c!s:>{w}}" for c, w in zip(r, widths, strict=True)))


def main() -> None:
    """Command-line entry point."""
    from cimlab.chip_sim.fastpath import default_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", default=",".join(name for name, _ in chip_sim.list_profiles()),
                    help="comma-separated profile names or files (default: every bundled profile)")
    ap.add_argument("--batch", type=int, default=4096, help="input vectors per timed MAC on the default profile")
    ap.add_argument("--large-batch", type=int, default=1024, help="input vectors per timed MAC on other profiles")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats (best kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-data-driven", action="store_true", help="skip the data-driven twins")
    ap.add_argument("--no-breakdown", action="store_true", help="skip where-the-time-goes")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for profile in args.profiles.split(","):
            batch = args.batch if profile == "default" else args.large_batch
            models = [None] if args.no_data_driven else [None, measured_model(profile, args.seed, folder)]
            for model in models:
                rows.append(bench(profile, batch, args.repeat, args.seed, model, not args.no_breakdown))
    layer = layer_figures(args.repeat, args.seed)

    print(f"twin on {default_threads()} threads; limit and old bound: the best of the BLAS on 1 thread and on all")
    _table(("profile", "converter", "batch", "twin s", "limit s", "limit ratio", "old bound s", "old-bound ratio",
            "conversions/s", "MAC/s"),
           [(r["profile"], r["converter"], r["batch"], f"{r['twin_s']:.4f}", f"{r['limit_s']:.4f}",
             f"{r['limit_ratio']:.2f}", f"{r['old_bound_s']:.4f}", f"{r['old_bound_ratio']:.2f}",
             f"{r['conversions_per_s']:.3g}", f"{r['macs_per_s']:.3g}") for r in rows])
    if not args.no_breakdown:
        print("\nwhere the time goes: ns per conversion, one thread, CPU time (kernel stages by ablation)")
        _table(("profile", "converter", *STAGE_NAMES, "total"),
               [(r["profile"], r["converter"], *(f"{r['ns_per_conversion'][k]:.2f}" for k in STAGE_NAMES),
                 f"{sum(r['ns_per_conversion'].values()):.2f}") for r in rows])
    print(f"\nissue 15's layer ({layer['spec']}), batch {LAYER['batch']}: {layer['twin_s']:.3f} s, "
          f"{layer['conversions_per_s']:.3g} conversions/s, {layer['macs_per_s']:.3g} MAC/s; "
          f"{layer['speedup_vs_asim_same_layer'][0]:.1f}-{layer['speedup_vs_asim_same_layer'][1]:.1f}x ASiM's "
          "time on it (issue 15's figures)")
    _table(("simulator", "MAC/s", "how", "source"),
           [(p["simulator"], f"{p['macs_per_s']:.3g}", p["how"], p["source"]) for p in layer["published"]])
    figures = {
        "target_limit_ratio": 0.5, "target_old_bound_ratio": 1.0, "threads": default_threads(),
        "rows": rows, "layer": layer,
    }
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()

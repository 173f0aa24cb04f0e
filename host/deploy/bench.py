"""``cimlab bench``: inference on the chip, compared with what training predicts, and how close it runs to its
bounds (imports torch).

Steps (``bench_package``):

1. the chip's HELLO is checked against the package; the first page is verified by read-back and programmed where it
   differs (``cimlab.deploy.program.deploy_package``);
2. the test images go through the network in batches of ``batch_size`` with every CIM layer's MACs on the chip
   (``cimlab.deploy.runner``), pages switched as the schedule says; the chip's STATUS counters and the driver's link
   counters are read before and after;
3. the prediction: the same network on the host at the package's placement, with ideal MACs, and under the error
   model (mean and standard deviation of the accuracy over ``draws`` draws of the sampled codes, draw ``i`` seeded
   ``seed + i`` as ``cimlab evaluate`` does). The gap is ``(chip - mean) / std``; the chip is *within the
   prediction's spread* when ``|chip - mean| <= SPREAD_SIGMAS * std + 1 / images`` (one image of slack, as
   accuracies move in steps of ``1 / images``).

Bounds, in images/s:

- macro bound: ``clock_hz / (chip cycles per image)``, the cycles the chip reported (STATUS) for the inference
  phase, page switches included: what the macro could do if nothing else limited it;
- link bound: ``rate / (bytes per image in the busier direction)``; the link carries both directions at once (UART,
  TCP, DMA). ``rate`` is the link's ``rate_hint`` (a UART's baud/10) or, when the link does not know it, measured
  here with PING echoes of growing size on the same link: ``2 * frame bytes / round trip`` (out and back do not
  overlap in one echo, so this is a lower bound on the line rate);
- efficiency: images/s ÷ min(link bound, macro bound); the target is >= 0.8.

Determinism: the same package, twin seed and operations give the same result over ``sim://``, TCP and a pty, and
through a lossy link with any window: the device executes each request once, in seq order.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cimlab.deploy.package import DeployPackage
from cimlab.deploy.program import DEFAULT_MAX_REWRITES, PageLoader
from cimlab.deploy.runner import ChipRunner, attach_chip, build_model, column_decoder, placed_transfer, predict
from cimlab.driver import Chip
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import OVERHEAD
from cimlab.training.layers import calibrate_columns, set_transfer
from cimlab.training.loop import accuracy_draws, progress_bar
from cimlab.training.transfer import ColumnDecoder, ColumnTrim, Transfer, check_spec, file_sha256

SPREAD_SIGMAS = 3.0
"""Standard deviations of the prediction within which the chip's accuracy counts as predicted."""
RATE_PROBE_S = 0.5
"""Seconds spent measuring the link's rate with PING when it does not report one."""


def measure_link_rate(chip: Chip, *, budget_s: float = RATE_PROBE_S) -> float:
    """Line rate of the chip's link, bytes/s per direction, from PING echoes of growing size (see the module
    docstring); the best of the echoes within ``budget_s`` seconds (at least one echo of each size tried)."""
    cap = chip.payload_cap
    size = min(cap, 4096)
    pattern = bytes(range(256)) * (cap // 256 + 1)
    best = 0.0
    deadline = time.monotonic() + budget_s
    while True:
        dt = chip.ping(pattern[:size])
        best = max(best, 2.0 * (size + OVERHEAD) / max(dt, 1e-9))
        if time.monotonic() >= deadline:
            return best
        if size < cap and dt < budget_s / 8:
            size = min(cap, size * 4)


def resolve_error_model(pkg: DeployPackage, path: str | os.PathLike | None) -> tuple[str | None, str]:
    """The error model file for the prediction, and a note saying where it came from.

    ``path`` when given; else the file the checkpoint was trained with, when it still exists with the same SHA-256;
    else None (the prediction is then the ideal MACs only).
    """
    if path is not None:
        return str(path), "given"
    em = pkg.manifest.get("error_model") or {}
    src = em.get("source")
    if not src:
        return None, "no error model given and the checkpoint was not trained with one"
    if not os.path.isfile(src):
        return None, f"the training error model {src!r} is not there; give --error-model"
    if em.get("sha256") and file_sha256(src) != em["sha256"]:
        return None, f"the file at {src!r} is not the training error model (SHA-256 differs); give --error-model"
    return str(src), "the error model the checkpoint was trained with"


def _gap(chip_acc: float, mean: float | None, std: float | None, n: int) -> tuple[float | None, bool | None]:
    if mean is None or std is None:
        return None, None
    within = abs(chip_acc - mean) <= SPREAD_SIGMAS * std + 1.0 / n + 1e-12
    if std > 0:
        return (chip_acc - mean) / std, within
    return (0.0 if chip_acc == mean else None), within


@dataclass
class ChipRun:
    """The network's pass over the test images on the chip, and what it cost."""

    logits: torch.Tensor
    seconds: float
    link: dict[str, int]
    """Driver counters over the pass (bytes, frames, retries ...)."""
    cycles: int
    energy_fj: int
    conversions: int
    runner: ChipRunner
    loader: PageLoader
    deploy: Any
    calibration_s: float
    """Seconds the deploy step's calibration took on the chip (before the timed pass)."""


def run_on_chip(pkg: DeployPackage, chip: Chip, x: torch.Tensor, *, batch_size: int, progress: bool,
                max_rewrites: int, trim: ColumnTrim | ColumnDecoder | None = None,
                calibration: Sequence[torch.Tensor] = ()) -> ChipRun:
    """Verify the first page, apply the deploy step (``trim``, then per-output calibration on the chip with the
    ``calibration`` batches), then run every image with each CIM layer's MACs on the chip; the chip's STATUS and
    the driver's counters are read around the timed pass. The progress bar counts tile MACs (``Chip.mac`` calls)."""
    model = build_model(pkg)
    loader = PageLoader(chip, pkg, max_rewrites=max_rewrites)
    first_page = min(t.page for _, lm in pkg.schedule.layers for t in lm.tiles)
    deploy_rep = loader.verify(first_page)
    runner = attach_chip(model, pkg, chip, loader, trim)
    t_cal = time.perf_counter()
    if calibration:
        calibrate_columns(model, calibration)
    calibration_s = time.perf_counter() - t_cal
    tiles = sum(len(lm.tiles) for _, lm in pkg.schedule.layers)
    batches = math.ceil(x.shape[0] / batch_size)
    st0, s0 = chip.status(), chip.stats.as_dict()
    t0 = time.perf_counter()
    with progress_bar(progress, batches * tiles, f"bench on {chip.hello.chip_id}: tile MACs") as advance:
        runner.on_call = advance
        logits = predict(model, x, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    s1, st1 = chip.stats.as_dict(), chip.status()
    return ChipRun(logits, seconds, {k: s1[k] - s0[k] for k in s1}, st1.cycles - st0.cycles,
                   st1.energy_fj - st0.energy_fj, st1.conversions - st0.conversions, runner, loader, deploy_rep,
                   calibration_s)


def host_prediction(pkg: DeployPackage, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, draws: int,
                    error_model: str | os.PathLike | None, pooled: bool, seed: int,
                    trim: ColumnTrim | ColumnDecoder | None = None, calibration: Sequence[torch.Tensor] = ()
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The same network on the host: logits with ideal MACs, and the accuracy under the error model (mean, std
    over ``draws``) with the same deploy step as the chip path."""
    host = build_model(pkg)
    ideal_logits = predict(host, x, batch_size=batch_size)
    acc_ideal = int((ideal_logits.argmax(1) == y).sum()) / int(x.shape[0])
    em_path, em_note = resolve_error_model(pkg, error_model)
    prediction: dict[str, Any] = {"ideal": acc_ideal, "error_model": em_path, "note": em_note, "pooled": None,
                                  "draws": [], "mean": None, "std": None}
    if em_path is not None and draws > 0:
        transfer = Transfer.load(em_path, pooled=pooled).decoded(column_decoder(trim, pkg.spec))
        check_spec(pkg.spec, transfer.spec, f"error model {em_path!r}")
        set_transfer(host, placed_transfer(pkg, transfer))
        if calibration:
            calibrate_columns(host, calibration)
        accs = accuracy_draws(host, x, y, draws, seed=seed, batch_size=batch_size)
        prediction.update(pooled=pooled, sha256=transfer.info.sha256, draws=accs, mean=statistics.fmean(accs),
                          std=statistics.stdev(accs) if len(accs) > 1 else 0.0)
    return ideal_logits, prediction


def link_rate_of(chip: Chip, given: float | None) -> tuple[float, str]:
    """The link's rate (bytes/s) and where it came from: given, the link's hint, or measured with PING."""
    if given is not None:
        return given, "given"
    if chip.link.rate_hint:
        return chip.link.rate_hint, "rate_hint"
    return measure_link_rate(chip), "measured (PING)"


def bounds(spec: Any, run: ChipRun, n: int, rate: float) -> dict[str, Any]:
    """Link and macro bounds on images/s, which one holds, and the efficiency against the lower one."""
    busier = max(run.link["bytes_out"], run.link["bytes_in"]) / n
    link_bound = rate / busier if busier > 0 else math.inf
    macro_bound = spec.clock_hz * n / run.cycles if run.cycles > 0 else math.inf
    limit = min(link_bound, macro_bound)
    return {
        "link_images_per_s": _finite(link_bound), "macro_images_per_s": _finite(macro_bound),
        "holds": "link" if link_bound <= macro_bound else "macro",
        "efficiency": n / run.seconds / limit if math.isfinite(limit) else None,
    }


def bench_package(pkg: DeployPackage, chip: Chip, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512,
                  draws: int = 5, error_model: str | os.PathLike | None = None, pooled: bool = False,
                  seed: int = 0, progress: bool = False, max_rewrites: int = DEFAULT_MAX_REWRITES,
                  link_rate: float | None = None, trim: ColumnTrim | ColumnDecoder | None = None,
                  calibration: torch.Tensor | None = None) -> dict[str, Any]:
    """Benchmark the package on the chip with test inputs ``x`` and labels ``y`` (see the module docstring).

    Args:
        batch_size: images per inference batch (each page is loaded once per batch).
        draws: draws of the error model for the prediction (0: ideal prediction only).
        error_model: the error model file (default: the training one, when still present).
        pooled: one error table for all columns (as most training runs) instead of one per physical column (as
            the chip and the data-driven twin draw).
        seed: first seed of the prediction's draws.
        progress: show a progress bar on stderr.
        link_rate: the link's rate, bytes/s (default: its ``rate_hint``, else measured with PING).
        trim, calibration: the per-chip deploy step. ``trim``: how each physical column's raw codes are decoded,
            from a short characterization of this chip: its gain and offset (``ColumnTrim``), or a table of the
            expected ideal level of each code (``ColumnDecoder``); the chip then returns raw codes (MAC_RAW) and
            the host recombines the decoded values. ``calibration``: inputs (no labels) on which each layer's
            per-output gain and offset are fitted on the chip against the exact MACs, and the batch-norm
            statistics measured on the chip (``cimlab.training.layers.calibrate_columns``), before the timed run.
            The prediction applies the same step under the error model.

    Returns:
        The figures (JSON-friendly), plus ``"_chip_logits"`` and ``"_ideal_logits"`` (torch tensors, dropped by
        ``public``).

    Raises:
        VersionMismatch, ArtifactError: the chip is not the package's macro, or the package is inconsistent.
        ConfigError: bad arguments (shapes, batch size, draws).
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"need as many labels as images (>= 1), got {x.shape[0]} images and {y.shape[0]} labels")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if draws < 0:
        raise ConfigError(f"draws must be >= 0, got {draws}")
    n, spec, hello = int(x.shape[0]), pkg.spec, chip.hello
    column_decoder(trim, spec)  # ConfigError for another macro's
    pkg.check_hello(hello, f"the chip at {chip.link.url}")
    batches = _batches(calibration, batch_size)
    run = run_on_chip(pkg, chip, x, batch_size=batch_size, progress=progress, max_rewrites=max_rewrites,
                      trim=trim, calibration=batches)
    ideal_logits, prediction = host_prediction(pkg, x, y, batch_size=batch_size, draws=draws,
                                               error_model=error_model, pooled=pooled, seed=seed, trim=trim,
                                               calibration=batches)
    chip_pred, ideal_pred = run.logits.argmax(1), ideal_logits.argmax(1)
    acc_chip = int((chip_pred == y).sum()) / n
    gap, within = _gap(acc_chip, prediction["mean"], prediction["std"], n)
    rate, rate_source = link_rate_of(chip, link_rate)
    d = run.link
    return {
        "package": str(pkg.path) if pkg.path else None,
        "model": pkg.manifest["model"]["name"], "mode": pkg.manifest["mode"], "task": pkg.task,
        "link": chip.link.url, "chip_id": hello.chip_id, "images": n, "batch": batch_size,
        "accuracy_chip": acc_chip, "accuracy_ideal": prediction["ideal"],
        "agreement_ideal": int((chip_pred == ideal_pred).sum()) / n,
        "prediction": prediction, "gap_sigma": gap, "within_spread": within,
        "predictions_sha256": hashlib.sha256(chip_pred.to(torch.int64).numpy().tobytes()).hexdigest(),
        "seconds": run.seconds, "images_per_s": n / run.seconds,
        "link_stats": {
            "bytes_out": d["bytes_out"], "bytes_in": d["bytes_in"],
            "bytes_per_image": (d["bytes_out"] + d["bytes_in"]) / n, "frames_out": d["frames_out"],
            "frames_in": d["frames_in"], "retries": d["retries"], "bad_frames": d["bad_frames"],
            "timeouts": d["timeouts"], "rate_Bps": rate, "rate_source": rate_source,
        },
        "chip": {
            "cycles": run.cycles, "cycles_per_image": run.cycles / n,
            "latency_us_per_image": run.cycles / n / spec.clock_hz * 1e6,
            "energy_nj": run.energy_fj / 1e6, "energy_nj_per_image": run.energy_fj / n / 1e6,
            "energy_source": "estimated by the chip model (its energy counters)",
            "conversions": run.conversions, "mac_vectors": run.runner.vectors,
            "mac_calls": run.runner.calls, "clock_hz": spec.clock_hz,
        },
        "bounds": bounds(spec, run, n, rate),
        "schedule": {**pkg.schedule.summary(), "page_loads": run.loader.loads,
                     "rows_written": run.loader.rows_written},
        "deploy": run.deploy.as_dict(max_cells=20),
        "weight_mismatches": len(run.loader.mismatches),
        "deploy_step": {"trim": trim.source if trim is not None else None,
                        "decoder": None if trim is None else "line" if isinstance(trim, ColumnTrim) else trim.kind,
                        "calibration_images": int(calibration.shape[0]) if calibration is not None else 0,
                        "calibration_s": run.calibration_s},
        "_chip_logits": run.logits, "_ideal_logits": ideal_logits,
    }


def _batches(x: torch.Tensor | None, batch_size: int) -> list[torch.Tensor]:
    if x is None:
        return []
    if x.shape[0] == 0:
        raise ConfigError("the deploy step's calibration needs at least one input")
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a bench result (without the ``_``-prefixed tensors)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def chip_ideal_equal(result: dict[str, Any]) -> bool:
    """Whether the chip's logits equal the host's ideal-MAC logits bit for bit."""
    a, b = result["_chip_logits"], result["_ideal_logits"]
    return bool(torch.equal(a, b))


__all__ = ["RATE_PROBE_S", "SPREAD_SIGMAS", "bench_package", "chip_ideal_equal", "measure_link_rate", "public",
           "resolve_error_model"]

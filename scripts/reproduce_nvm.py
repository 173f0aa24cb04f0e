#!/usr/bin/env python3
"""The NVM crossbar study (García-Redondo et al. 2020) on the twin: what uniform ranges, unipolar weights and 2-bit
cells cost in accuracy under device errors, and what they save in crossbar area and energy.

Rows, each trained with ``cimlab train`` from one float model (``digits_mlp`` on digits; ``har_cnn`` on HAR with
``--data``):

- ``float``: the float model (no macro);
- ``baseline``: differential per-layer 4-bit: ``nvm-4bit`` cells on two arrays (``weight_storage=differential``),
  each layer its own weight and input ranges: the denominator of every area and energy figure;
- ``per-layer 4-bit``: ``nvm-4bit``, one unipolar array, every layer bipolar on column pairs, per-layer ranges;
- ``uniform 4-bit``: the same with one weight range and one input range for every layer (``--quant uniform``);
- ``uniform 2-bit unipolar (searched)``: ``nvm-2bit`` (2-bit cells, 6-bit ADC), uniform ranges, each layer's polarity
  from the evolutionary search (``--polarity search``): unipolar layers on one array, bipolar ones on pairs.

Accuracy under device errors is measured **on the twin through the real chip path** (``cimlab bench``: compile,
program, every MAC over the wire) on ``--draws`` twins of the row's profile with different seeds (each a different
chip: its cells' programming error and relaxation drawn anew, read noise per conversion); mean +- std over them.
The ideal accuracy is the host's prediction with ideal MACs, and the chip's logits are checked to equal the host's
on an ideal twin of the same macro (on the first test images). Arrays, area and energy per inference come from
``cimlab estimate`` (estimated from ISAAC's Table 2, not measured), relative to the baseline, also under the gentler
ADC scaling of ``isaac-32nm-saberi`` (a sensitivity check). HAR runs shorter (12 float and 5 quant epochs) and benches
the first 300 test windows: a ``har_cnn`` window costs about 750k conversions on the twin.

Targets: uniform 2-bit unipolar within 3 points of float on digits; savings in the direction and of the order of
the paper's (up to 80 % crossbar area, up to 45 % energy).

Prints the table and, as the last line, one JSON object. Checkpoints and packages stay in ``--out``.

Usage: python scripts/reproduce_nvm.py [--out DIR] [--draws K] [--data 'UCI HAR Dataset'] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _study import progress_log, study_folder

FLOAT_TARGET_POINTS = 3.0
"""Uniform 2-bit unipolar must come within this many points of float (digits)."""
PAPER_SAVINGS = {"area": 0.80, "energy": 0.45}
"""What García-Redondo et al. 2020 report at most: crossbar area and energy saved."""


@dataclass(frozen=True)
class Row:
    """One row of the study: a macro (twin profile and overrides) and how the network is trained for it."""

    key: str
    label: str
    profile: str
    overrides: str = ""
    quant: str = "per-layer"
    polarity: str = "bipolar"

    def url(self, seed: int = 0, *, ideal: bool = False) -> str:
        """The twin of this row's macro (``ideal``: the same MacroSpec without analog or device errors)."""
        if ideal:
            return f"sim://?profile=ideal&seed={seed}&" + "&".join(f"{k}={v}" for k, v in self.spec().to_dict().items())
        return f"sim://?profile={self.profile}&seed={seed}{self.overrides}"

    @property
    def macro(self) -> str:
        """The profile and its storage, for the table."""
        return f"{self.profile}, {self.spec().weight_storage}"

    def spec(self) -> Any:
        """The MacroSpec of this row's macro."""
        from cimlab.chip_sim.profiles import load_profile

        spec = load_profile(self.profile).spec
        fields = dict(kv.split("=", 1) for kv in self.overrides.strip("&").split("&") if kv)
        return spec.replace(**{k: (v if k == "weight_storage" else int(v)) for k, v in fields.items()})


ROWS = (
    Row("baseline", "differential per-layer 4-bit (baseline)", "nvm-4bit", "&weight_storage=differential"),
    Row("per_layer_4bit", "per-layer 4-bit", "nvm-4bit"),
    Row("uniform_4bit", "uniform 4-bit", "nvm-4bit", quant="uniform"),
    Row("uniform_2bit_unipolar", "uniform 2-bit unipolar (searched)", "nvm-2bit", quant="uniform", polarity="search"),
)


@dataclass
class Plan:
    """How long everything runs."""

    float_epochs: int = 40
    quant_epochs: int = 20
    lr_quant: float = 2e-3
    limit: int | None = None  # training and test samples (None: all)
    test_images: int | None = None  # digits images benched on the twin (None: the whole test set)
    search: dict[str, int] = field(default_factory=lambda: {"generations": 6, "offspring": 3, "steps": 80})
    har_float_epochs: int = 12  # a har_cnn epoch over UCI HAR's 7352 windows takes about a minute on 2 cores
    har_quant_epochs: int = 5
    har_test_images: int = 300  # about 750k conversions a window: ~1 min per twin at the twin's ~4.5 Mconv/s
    equality_images: int = 32  # images benched on the ideal twin to check the chip path equals the host


def quick_plan() -> Plan:
    """A smoke test of every step (figures not meaningful)."""
    return Plan(float_epochs=1, quant_epochs=1, limit=240, test_images=48,
                search={"generations": 1, "offspring": 1, "steps": 4}, har_float_epochs=1, har_quant_epochs=1,
                har_test_images=24, equality_images=8)


# ---- one task -------------------------------------------------------------------------------------------------
def train_float(task: str, model: str, out: Path, plan: Plan, data_dir: str | None, seed: int) -> dict[str, Any]:
    from cimlab.training.api import train_run
    from cimlab.training.loop import TrainConfig

    cfg = TrainConfig(epochs=plan.float_epochs if task == "digits" else plan.har_float_epochs, lr=3e-3, seed=seed)
    return train_run(task, "float", out, model_name=model, data_dir=data_dir, cfg=cfg, limit=plan.limit, draws=1)


def train_row(row: Row, task: str, flt: Path, out: Path, plan: Plan, data_dir: str | None,
              seed: int) -> dict[str, Any]:
    from cimlab.training.api import train_run
    from cimlab.training.loop import TrainConfig

    cfg = TrainConfig(epochs=plan.quant_epochs if task == "digits" else plan.har_quant_epochs, lr=plan.lr_quant,
                      seed=seed)
    return train_run(task, "quant", out, link=row.url(), init=flt, data_dir=data_dir, cfg=cfg, limit=plan.limit,
                     draws=1, quant=row.quant, polarity=row.polarity, search=plan.search)


def bench_on_twin(pkg: Any, url: str, x: Any, y: Any) -> dict[str, Any]:
    from cimlab.deploy.bench import bench_package, chip_ideal_equal, public
    from cimlab.driver import Chip

    with Chip.open(url, timeout=5.0) as chip:
        r = bench_package(pkg, chip, x, y, draws=0, batch_size=256)
    return {**public(r), "chip_equals_host": chip_ideal_equal(r)}


def estimates(pkg: Any) -> dict[str, Any]:
    from cimlab.estimate import estimate_package, load_tech

    return {name: estimate_package(pkg, load_tech(name)).as_dict() for name in ("isaac-32nm", "isaac-32nm-saberi")}


def run_row(row: Row, task: str, flt: Path, out: Path, plan: Plan, data: Any, data_dir: str | None, draws: int,
            seed: int, log: Any) -> dict[str, Any]:
    from cimlab.deploy.compile import compile_checkpoint
    from cimlab.deploy.package import DeployPackage

    t0 = time.perf_counter()
    ckpt = out / f"{task}-{row.key}.safetensors"
    trained = train_row(row, task, flt, ckpt, plan, data_dir, seed)
    compile_checkpoint(ckpt, spec=row.spec(), spec_source=row.url()).save(out / f"{task}-{row.key}.npz")
    pkg = DeployPackage.load(out / f"{task}-{row.key}.npz")
    n = plan.test_images if task == "digits" else plan.har_test_images
    x, y = data.x_test[:n], data.y_test[:n]
    benches = [bench_on_twin(pkg, row.url(seed=1 + d), x, y) for d in range(draws)]
    chips = [b["accuracy_chip"] for b in benches]
    k = plan.equality_images
    equal = bench_on_twin(pkg, row.url(ideal=True), x[:k], y[:k])["chip_equals_host"]
    est = estimates(pkg)
    log(f"{task} {row.key}: ideal {benches[0]['accuracy_ideal']:.4f}, chips {[round(a, 4) for a in chips]}, "
        f"{est['isaac-32nm']['arrays']} arrays ({time.perf_counter() - t0:.0f} s)")
    return {
        "key": row.key, "label": row.label, "macro": row.macro, "twin": row.url(), "spec": pkg.spec.describe(),
        "quant": row.quant,
        "polarity": trained["polarity"], "polarity_search": trained["polarity_search"],
        "accuracy_ideal": benches[0]["accuracy_ideal"], "chip_equals_host_on_ideal_twin": equal,
        "conversions_per_image": benches[0]["chip"]["conversions"] / benches[0]["images"],
        "accuracy_chips": chips, "accuracy_chips_mean": statistics.fmean(chips),
        "accuracy_chips_std": statistics.stdev(chips) if len(chips) > 1 else 0.0,
        "test_images": int(x.shape[0]), "estimate": est, "seconds": time.perf_counter() - t0,
    }


def relative(rows: list[dict[str, Any]]) -> None:
    """Each row's area and energy over the baseline's (both technology tables), in place."""
    base = next(r for r in rows if r["key"] == "baseline")["estimate"]
    for r in rows:
        r["relative"] = {
            tech: {"area": e["total_area_um2"] / base[tech]["total_area_um2"],
                   "energy": e["total_energy_pj_per_inference"] / base[tech]["total_energy_pj_per_inference"]}
            for tech, e in r["estimate"].items()}


def run_task(task: str, model: str, out: Path, plan: Plan, data_dir: str | None, draws: int, seed: int,
             log: Any) -> dict[str, Any]:
    from cimlab.training.tasks import load_task

    t0 = time.perf_counter()
    data = load_task(task, data_dir, limit=plan.limit)
    flt = out / f"{task}-float.safetensors"
    f = train_float(task, model, flt, plan, data_dir, seed)
    log(f"{task} float: {f['accuracy_float']:.4f}")
    rows = [run_row(row, task, flt, out, plan, data, data_dir, draws, seed, log) for row in ROWS]
    relative(rows)
    return {"task": task, "model": model, "accuracy_float": f["accuracy_float"], "rows": rows,
            "targets": targets(f["accuracy_float"], rows, task), "seconds": time.perf_counter() - t0}


def targets(acc_float: float, rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Each target, met or by how much it is missed."""
    uni2 = next(r for r in rows if r["key"] == "uniform_2bit_unipolar")
    gap = 100.0 * (acc_float - uni2["accuracy_chips_mean"])
    rel = uni2["relative"]["isaac-32nm"]
    out: dict[str, Any] = {
        "uniform_2bit_points_below_float": gap,
        "area_saved": 1.0 - rel["area"], "energy_saved": 1.0 - rel["energy"],
        "area_saved_saberi": 1.0 - uni2["relative"]["isaac-32nm-saberi"]["area"],
        "energy_saved_saberi": 1.0 - uni2["relative"]["isaac-32nm-saberi"]["energy"],
        "paper": dict(PAPER_SAVINGS),
    }
    if task == "digits":
        out["within_3_points"] = gap <= FLOAT_TARGET_POINTS
        out["missed_by_points"] = max(0.0, gap - FLOAT_TARGET_POINTS)
    return out


# ---- output -----------------------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def print_table(results: dict[str, Any]) -> None:
    """The study's tables (rich), on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    for t in results["tasks"]:
        tab = Table(title=f"NVM crossbars, {t['task']} ({t['model']}): accuracy % (ideal MACs; on the twin through "
                          f"the chip path, mean +- std over {results['draws']} chips); arrays, area and energy per "
                          "inference estimated (ISAAC 32 nm), relative to the baseline")
        for col in ("row", "macro", "ideal", "device errors (twin)", "vs float", "arrays", "area", "energy",
                    "area / energy, Saberi ADCs"):
            tab.add_column(col)
        tab.add_row("float", "-", _pct(t["accuracy_float"]), "-", "-", "-", "-", "-", "-")
        for r in t["rows"]:
            rel, sab = r["relative"]["isaac-32nm"], r["relative"]["isaac-32nm-saberi"]
            tab.add_row(r["label"], r["macro"],
                        _pct(r["accuracy_ideal"]),
                        f"{_pct(r['accuracy_chips_mean'])} +- {100 * r['accuracy_chips_std']:.1f}",
                        f"{100 * (r['accuracy_chips_mean'] - t['accuracy_float']):+.1f}",
                        str(r["estimate"]["isaac-32nm"]["arrays"]), f"{rel['area']:.2f}", f"{rel['energy']:.2f}",
                        f"{sab['area']:.2f} / {sab['energy']:.2f}")
        console.print(tab)
        g = t["targets"]
        line = (f"uniform 2-bit unipolar: {g['uniform_2bit_points_below_float']:.1f} points below float"
                + ("" if "within_3_points" not in g else
                   (" (target 3: met)" if g["within_3_points"]
                    else f" (target 3: missed by {g['missed_by_points']:.1f})"))
                + f"; saves {100 * g['area_saved']:.0f} % area (paper: up to 80 %), {100 * g['energy_saved']:.0f} % "
                  f"energy (paper: up to 45 %); with Saberi-scaled ADCs {100 * g['area_saved_saberi']:.0f} % / "
                  f"{100 * g['energy_saved_saberi']:.0f} % (estimated)")
        console.print(line, highlight=False)
        for r in t["rows"]:
            if r["polarity_search"]:
                ps = r["polarity_search"]
                console.print(f"{r['label']}: search chose {ps['assignment']} ({ps['evaluations']} candidates, "
                              f"{ps['seconds']:.0f} s)", highlight=False)
    console.print(f"total {results['seconds']:.0f} s; checkpoints and packages in {results['out']}", highlight=False)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON line's headline figures."""
    out: dict[str, Any] = {"seconds": results["seconds"],
                           "denominator": "the differential per-layer 4-bit baseline (area, energy)"}
    for t in results["tasks"]:
        out[t["task"]] = {
            "float": t["accuracy_float"],
            **{r["key"]: {"accuracy_chips_mean": r["accuracy_chips_mean"],
                          "accuracy_chips_std": r["accuracy_chips_std"],
                          "area_rel": r["relative"]["isaac-32nm"]["area"],
                          "energy_rel": r["relative"]["isaac-32nm"]["energy"]} for r in t["rows"]},
            "targets": t["targets"],
        }
    return out


# ---- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for checkpoints and packages (default: a temp folder)")
    ap.add_argument("--draws", type=int, default=3, help="twins (chips) each row is benched on under device errors")
    ap.add_argument("--data", help="the UCI HAR Dataset folder: also run the study on HAR (har_cnn)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; figures not meaningful)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = study_folder(args.out, "cimlab-nvm-")
    log = progress_log(t_start)

    plan = quick_plan() if args.quick else Plan()
    draws = 1 if args.quick else args.draws
    tasks = [("digits", "digits_mlp", None)]
    if args.data:
        tasks.append(("har", "har_cnn", args.data))
    results: dict[str, Any] = {"draws": draws, "seed": args.seed, "out": str(out), "quick": args.quick,
                               "accuracy_under_errors": "on the twin through the real chip path (cimlab bench)",
                               "estimates": "cimlab estimate from ISAAC's Table 2 (estimated, not measured)"}
    results["tasks"] = [run_task(task, model, out, plan, data_dir, draws, args.seed, log)
                        for task, model, data_dir in tasks]
    results["seconds"] = time.perf_counter() - t_start
    results["summary"] = summary(results)
    print_table(results)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())

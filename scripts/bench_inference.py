"""Inference benchmark: how close does ``cimlab bench`` run to its bounds, on paced links and on the bare twin?

Trains two small quant networks on digits in this process (an MLP on one macro load, the default CNN on three),
compiles them for the ``ideal`` profile and benches each on:

- twins served by ``cimlab sim serve --tcp 127.0.0.1:0 --baud B`` (a separate process pacing every byte at B/10
  bytes/s, both ways), reached as ``tcp://...?baud=B`` so the link knows its rate: the link bound holds, and
  images/s ÷ link bound is how well the bench keeps the line busy (target >= 0.8);
- the in-process twin (``sim://``): the line is fast (rate measured by PING), the macro bound from the chip's
  cycles is far above what a Python twin simulates, so the ratio there measures the twin, not the bench.

Prints a table, then one JSON object of the figures as the last line.

    .venv/bin/python scripts/bench_inference.py [--bauds 921600,3000000] [--limit 360] [--cnn-limit 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cimlab.chip_sim import load_profile
from cimlab.deploy.bench import bench_package
from cimlab.deploy.compile import compile_checkpoint
from cimlab.deploy.package import DeployPackage
from cimlab.driver import Chip
from cimlab.training.api import train_run
from cimlab.training.loop import TrainConfig
from cimlab.training.tasks import load_task
from cimlab.twinproc import TwinProcess

console = Console()


def make_packages(folder: Path) -> dict[str, DeployPackage]:
    """Quant digits MLP and CNN, trained briefly, compiled for the ideal profile."""
    spec = load_profile("ideal").spec
    out = {}
    for model, epochs in (("digits_mlp", 3), ("digits_cnn", 2)):
        ck = folder / f"{model}.safetensors"
        train_run("digits", "quant", ck, model_name=model, profile="ideal", cfg=TrainConfig(epochs=epochs))
        out[model] = compile_checkpoint(ck, spec=spec, spec_source="twin profile 'ideal'")
        out[model].save(folder / f"{model}.npz")
    return out


def bench_one(pkg: DeployPackage, url: str, limit: int, window: int) -> dict:
    """Bench ``pkg`` at ``url`` on the first ``limit`` test images (no error-model draws: speed only)."""
    data = load_task("digits", limit=limit)
    with Chip.open(url, window=window) as chip:
        r = bench_package(pkg, chip, data.x_test, data.y_test, draws=0)
    return {
        "link": url, "images": r["images"], "images_per_s": r["images_per_s"],
        "bytes_per_image": r["link_stats"]["bytes_per_image"], "rate_Bps": r["link_stats"]["rate_Bps"],
        "rate_source": r["link_stats"]["rate_source"], "link_bound": r["bounds"]["link_images_per_s"],
        "macro_bound": r["bounds"]["macro_images_per_s"], "holds": r["bounds"]["holds"],
        "efficiency": r["bounds"]["efficiency"], "cycles_per_image": r["chip"]["cycles_per_image"],
        "energy_nj_per_image": r["chip"]["energy_nj_per_image"], "accuracy_chip": r["accuracy_chip"],
        "exact": r["agreement_ideal"] == 1.0,
    }


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    ap = argparse.ArgumentParser(description="inference on the twin against its link and macro bounds")
    ap.add_argument("--bauds", default="921600,3000000", help="paced line rates to bench at")
    ap.add_argument("--limit", type=int, default=360, help="test images for the MLP")
    ap.add_argument("--cnn-limit", type=int, default=40, help="test images for the CNN (56 kB each on the link)")
    ap.add_argument("--window", type=int, default=8, help="frames in flight")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a 2-core machine responsive)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = make_packages(Path(tmp))
        for model, pkg in pkgs.items():
            limit = args.limit if model == "digits_mlp" else args.cnn_limit
            for baud in (int(b) for b in args.bauds.split(",")):
                with TwinProcess(profile="ideal", baud=baud) as url:
                    rows.append({"model": model, "baud": baud, **bench_one(pkg, f"{url}?baud={baud}", limit,
                                                                           args.window)})
            inproc = bench_one(pkg, "sim://?profile=ideal", limit, args.window)
            rows.append({"model": model, "baud": None, **inproc})
    t = Table(title="cimlab bench, ideal twin: images/s ÷ min(link bound, macro bound)")
    for col in ("model", "link", "img/s", "B/img", "link bnd", "macro bnd", "÷ bound", "exact"):
        t.add_column(col, justify="right")
    for r in rows:
        link = f"tcp {r['baud'] / 1e6:g} MBd" if r["baud"] else "sim://"
        t.add_row(r["model"].removeprefix("digits_"), link, f"{r['images_per_s']:.1f}",
                  f"{r['bytes_per_image']:,.0f}",
                  f"{r['link_bound']:,.1f}", f"{r['macro_bound']:,.0f}", f"{r['efficiency']:.3f} {r['holds']}",
                  "yes" if r["exact"] else "NO")
    console.print(t)
    paced = [r for r in rows if r["baud"]]
    figures = {f"{r['model']}@{r['baud'] or 'sim'}": round(r["efficiency"], 4) for r in rows}
    figures["target_paced_efficiency_met"] = all(r["efficiency"] >= 0.8 for r in paced)
    figures["all_exact"] = all(r["exact"] for r in rows)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Inference benchmark: how close does ``cimlab bench`` run to the line rate, on paced links and on the bare twin?

Trains two small quant networks on digits in this process (an MLP on one macro load, the default CNN on three),
compiles them for the ``ideal`` profile and benches each on:

- twins served by ``cimlab sim serve --tcp 127.0.0.1:0 --baud B`` (a separate process pacing every byte at B/10
  bytes/s, both ways), reached as ``tcp://...?baud=B`` so the link knows its rate;
- the in-process twin (``sim://``): the line is fast (rate measured by PING), the macro bound from the chip's
  cycles is far above what a Python twin simulates, so the ratio there measures the twin, not the bench.

Figures per run: bytes on the link per image (both directions, frames included), and images/s ÷ packed bound. The
packed bound is the line rate ÷ the bytes per image that a packed encoding of the image's work needs in the busier
direction (the line carries both at once): to the chip, every MAC input at ``input_bits`` and every weight written
during inference at ``weight_bits``; back, every MAC output at the width its rows need. No frame headers, no
acknowledgements, no padding: what a user would compare a link protocol against. Target >= 0.8 on the paced links.
(``cimlab bench``'s own ratio, against min(link bound from the bytes actually sent, macro bound), is shown too.)

Prints a table, then one JSON object of the figures as the last line.

    .venv/bin/python scripts/bench_inference.py [--bauds 921600,3000000] [--limit 360] [--cnn-limit 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from cimlab.chip_sim import load_profile
from cimlab.deploy.bench import bench_package
from cimlab.deploy.compile import compile_checkpoint
from cimlab.deploy.package import DeployPackage
from cimlab.driver import Chip
from cimlab.firmware_bridge.packing import input_field, output_field, weight_field
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


class CountingChip(Chip):
    """A Chip that adds up the packed bits its MACs and weight writes need (see the module docstring)."""

    counting = False
    to_chip_bits = 0
    from_chip_bits = 0

    def mac(self, inputs: np.ndarray, row_start: int = 0) -> np.ndarray:
        if self.counting:
            x = np.atleast_2d(inputs)
            spec = self.spec
            self.to_chip_bits += x.size * input_field(spec).bits
            self.from_chip_bits += x.shape[0] * spec.cols * output_field(spec, row_start, x.shape[1]).bits
        return super().mac(inputs, row_start)

    def write_weights(self, weights: np.ndarray, row_start: int = 0) -> list[tuple[int, int]]:
        if self.counting:
            self.to_chip_bits += np.size(weights) * weight_field(self.spec).bits
        return super().write_weights(weights, row_start)


def bench_one(pkg: DeployPackage, url: str, limit: int, window: int) -> dict:
    """Bench ``pkg`` at ``url`` on the first ``limit`` test images (no error-model draws: speed only)."""
    data = load_task("digits", limit=limit)
    with CountingChip.open(url, window=window) as chip:
        chip.status()  # HELLO done; the first page is verified inside bench_package before the timed part
        chip.counting = True
        r = bench_package(pkg, chip, data.x_test, data.y_test, draws=0)
    n = r["images"]
    verify = r["deploy"]["rows_written"] * pkg.spec.cols * pkg.spec.weight_bits  # before the timed part
    packed = max(chip.to_chip_bits - verify, chip.from_chip_bits) / 8 / n
    rate = r["link_stats"]["rate_Bps"]
    return {
        "packed_bytes_per_image": packed,
        "packed_bound": rate / packed,
        "packed_efficiency": r["images_per_s"] / (rate / packed),
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
    ap.add_argument("--cnn-limit", type=int, default=40, help="test images for the CNN")
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
    t = Table(title="cimlab bench, ideal twin: bytes per image and images/s ÷ packed bound (line rate ÷ packed bytes"
                    " per image, busier direction)")
    for col in ("model", "link", "img/s", "B/img on link", "packed B/img", "packed bnd", "÷ packed",
                "÷ min(link, macro)", "exact"):
        t.add_column(col, justify="right")
    for r in rows:
        link = f"tcp {r['baud'] / 1e6:g} MBd" if r["baud"] else "sim://"
        t.add_row(r["model"].removeprefix("digits_"), link, f"{r['images_per_s']:.1f}",
                  f"{r['bytes_per_image']:,.0f}", f"{r['packed_bytes_per_image']:,.0f}",
                  f"{r['packed_bound']:,.1f}", f"{r['packed_efficiency']:.3f}",
                  f"{r['efficiency']:.3f} {r['holds']}", "yes" if r["exact"] else "NO")
    console.print(t)
    paced = [r for r in rows if r["baud"]]
    figures: dict[str, object] = {f"{r['model']}@{r['baud'] or 'sim'}": round(r["packed_efficiency"], 4)
                                  for r in rows}
    figures.update({f"{r['model']}_bytes_per_image@{r['baud'] or 'sim'}": round(r["bytes_per_image"], 1)
                    for r in rows})
    figures["target_paced_efficiency_met"] = all(r["packed_efficiency"] >= 0.8 for r in paced)
    figures["all_exact"] = all(r["exact"] for r in rows)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

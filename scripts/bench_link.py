"""Link benchmark: how close does the protocol get to the line rate of a UART?

For each baud rate B, a twin is served by ``cimlab sim serve --tcp 127.0.0.1:0 --baud B`` (a separate process that
paces every byte at B/10 bytes/s, both ways), and this process drives it with the real driver. Efficiency is useful
bits / wire bits: the bits of information delivered per second (a 4-bit weight is 4 bits, however it travels) over
the data bits the line carries per second (8 x B/10; start and stop bits are the UART's, not ours):

- bulk weight writes: weights x weight_bits delivered;
- MAC streaming: the busier direction, inputs (x input_bits) to the chip or outputs back (x the bits their range
  needs, ``cimlab.firmware_bridge.packing.output_field``);
- host CPU per frame ÷ wire time per frame, from this process's CPU time over the bulk phase.

Targets (issue "The wire"): useful/wire bits >= 0.90 at 3 Mbaud for 4-bit data; CPU/wire <= 0.1 at 12 Mbaud.
Prints a table, then one JSON object of the figures as the last line.

    .venv/bin/python scripts/bench_link.py [--bauds 921600,3000000,12000000] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from cimlab.driver import Chip
from cimlab.firmware_bridge.packing import output_field
from cimlab.links import open_link
from cimlab.twinproc import TwinProcess

ROWS = 2048  # one bulk write is 128 KiB of 4-bit weights, on a geometry the fabric's buffers can hold
COLS = 128


def bench_one(baud: int, seconds: float, window: int) -> dict[str, float]:
    """Measure one baud rate; return its figures."""
    line = baud / 10
    line_bits = 8 * line  # data bits/s the line carries
    with TwinProcess(profile="ideal", sets=[f"rows={ROWS}", f"cols={COLS}"], baud=baud) as url:
        chip = Chip(open_link(f"{url}?baud={baud}"), window=window)
        try:
            spec = chip.identify().spec
            rng = np.random.default_rng(0)
            w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
            chip.write_weights(w[:64])  # warm-up
            frames0, cpu0, useful = chip.stats.frames_out, time.process_time(), 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                chip.write_weights(w)
                useful += w.size * spec.weight_bits
            t_bulk = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            frames = chip.stats.frames_out - frames0
            frame_bytes = (chip.stats.bytes_out / max(1, chip.stats.frames_out))
            wire_per_frame = frame_bytes / line
            bulk_eff = useful / t_bulk / line_bits
            if not np.array_equal(chip.read_weights(), w):
                raise SystemExit(f"weights read back wrong at {baud} baud")

            n_rows = 256
            per_vec_bits = max(n_rows * spec.input_bits, spec.cols * output_field(spec, 0, n_rows).bits)
            batch = max(64, int(line_bits * seconds / per_vec_bits))
            x = rng.integers(0, spec.input_max + 1, size=(batch, n_rows))
            t0 = time.perf_counter()
            y = chip.mac(x)
            t_mac = time.perf_counter() - t0
            if not np.array_equal(y, x @ w[:n_rows]):
                raise SystemExit(f"MAC results wrong at {baud} baud")
            mac_eff = batch * per_vec_bits / t_mac / line_bits
            return {
                "baud": baud,
                "bulk_efficiency": bulk_eff,
                "bulk_kBps": useful / 8 / t_bulk / 1e3,
                "mac_efficiency": mac_eff,
                "mac_vectors_per_s": batch / t_mac,
                "cpu_per_frame_ms": cpu / max(1, frames) * 1e3,
                "wire_per_frame_ms": wire_per_frame * 1e3,
                "cpu_over_wire": (cpu / max(1, frames)) / wire_per_frame,
                "retries": chip.stats.retries,
            }
        finally:
            chip.close()


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    ap = argparse.ArgumentParser(description="link efficiency against paced twins")
    ap.add_argument("--bauds", default="921600,3000000,12000000")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each phase")
    ap.add_argument("--window", type=int, default=8, help="frames in flight")
    args = ap.parse_args()
    results = [bench_one(int(b), args.seconds, args.window) for b in args.bauds.split(",")]
    t = Table(title="link efficiency (useful bits/s ÷ 8 x line rate B/10), twin paced over TCP;\n"
                    "kB/s of useful bits; host CPU and wire time are per frame")
    for col in ("baud", "bulk", "kB/s", "MAC", "vec/s", "CPU ms", "wire ms", "CPU/wire", "retry"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(f"{r['baud']:,}", f"{r['bulk_efficiency']:.3f}", f"{r['bulk_kBps']:.0f}",
                  f"{r['mac_efficiency']:.3f}", f"{r['mac_vectors_per_s']:.0f}", f"{r['cpu_per_frame_ms']:.2f}",
                  f"{r['wire_per_frame_ms']:.1f}", f"{r['cpu_over_wire']:.4f}", str(r["retries"]))
    Console().print(t)
    by = {r["baud"]: r for r in results}
    figures: dict[str, object] = {
        f"{k}@{r['baud']}": round(float(r[k]), 4)
        for r in results
        for k in ("bulk_efficiency", "mac_efficiency", "cpu_over_wire")
    }
    if 3_000_000 in by:
        figures["target_bulk_eff_3M_met"] = by[3_000_000]["bulk_efficiency"] >= 0.90
    if 12_000_000 in by:
        figures["target_cpu_wire_12M_met"] = by[12_000_000]["cpu_over_wire"] <= 0.1
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

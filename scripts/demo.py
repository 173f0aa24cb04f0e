"""The demo: a twin served on a real pseudo-terminal, driven by the host exactly as a board would be.

For each twin profile: start ``cimlab sim serve --pty``, identify it, program random weights, read them back, run a
batch of MACs, compare them with numpy, and print a table with what the link and the chip reported.
Run through ``./scripts/demo`` (which sets up .venv first).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from host.driver import Chip
from host.twinproc import TwinProcess

console = Console()
ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "demo"
SIM_BENCH = ROOT / "host" / "instruments" / "sim" / "bench.yaml"


def cimlab(*args: str) -> None:
    """Run one ``cimlab`` command as a user would; stop the demo if it fails."""
    console.print(f"[dim]$ cimlab {' '.join(args)}[/]", highlight=False)
    proc = subprocess.run([sys.executable, "-m", "host.cli", *args], timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"cimlab {args[0]} failed with exit status {proc.returncode}")


def characterize(seed: int, repeats: int) -> Path:
    """Characterize the default twin over a pty at two supply voltages (a simulated SMU); write the report."""
    out = RUNS / "characterize"
    console.print("[bold]characterization[/]: sweeping the 'default' twin over a pty, SMU simulated by pyvisa-sim ...")
    with TwinProcess(pty=True, profile="default", seed=seed) as url:
        cimlab("characterize", "--link", url, "--out", str(out), "--repeats", str(repeats), "--vdd", "0.8,0.6",
               "--smu", "GPIB0::24::INSTR", "--visa-library", f"{SIM_BENCH}@sim", "--no-progress")
    cimlab("report", str(out))
    return out


def run_one(profile: str, seed: int, batch: int) -> dict[str, object]:
    """Serve ``profile`` on a pty and put it through the steps; return the figures of one table row."""
    with TwinProcess(pty=True, profile=profile, seed=seed) as url, Chip.open(url) as chip:
        spec = chip.spec
        rng = np.random.default_rng(seed)
        w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
        t0 = time.perf_counter()
        chip.write_weights(w)
        back = chip.read_weights()
        t_w = time.perf_counter() - t0
        x = rng.integers(0, spec.input_max + 1, size=(batch, spec.rows))
        t0 = time.perf_counter()
        y = chip.mac(x)
        t_mac = time.perf_counter() - t0
        expected = x @ w  # numpy's integer product: what an ideal macro computes
        err = (y * spec.adc_lsb - expected).astype(np.float64)
        st = chip.status()
        stats = chip.stats
        return {
            "profile": profile,
            "link": url,
            "chip": chip.hello.chip_id,
            "macro": f"{spec.rows}x{spec.cols} w{spec.weight_bits} x{spec.input_bits} adc{spec.adc_bits}",
            "readback": "exact" if np.array_equal(back, w) else f"{int((back != w).sum())} cells differ",
            "exact": f"{np.mean(y == expected) * 100:.1f}%",
            "rms_err": f"{np.sqrt(np.mean(err**2)):.2f}",
            "corr": f"{np.corrcoef(y.ravel(), expected.ravel())[0, 1]:.4f}",
            "weights_kBps": f"{2 * w.size * spec.weight_dtype.itemsize / t_w / 1e3:.0f}",
            "mac_per_s": f"{batch / t_mac:.0f}",
            "frames": f"{stats.frames_out}/{stats.frames_in}",
            "retries": str(stats.retries),
            "chip_cycles": f"{st.cycles:,}",
            "chip_energy_nJ": f"{st.energy_fj / 1e6:.1f}",
        }


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default="ideal,default", help="comma-separated twin profiles")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1024, help="MAC vectors per profile")
    ap.add_argument("--repeats", type=int, default=200, help="characterization: conversions per column and level")
    args = ap.parse_args(argv)
    if RUNS.exists():
        shutil.rmtree(RUNS)  # the demo's own outputs from an earlier run
    rows = []
    for profile in args.profiles.split(","):
        console.print(f"[bold]twin '{profile}'[/]: serving on a pty, driving it as a board ...")
        rows.append(run_one(profile, args.seed, args.batch))
    t = Table(title="cimlab demo: host <-> twin over a pseudo-terminal")
    t.add_column("")
    for r in rows:
        t.add_column(str(r["profile"]), overflow="fold")
    labels = [
        ("link", "link"), ("chip", "chip id"), ("macro", "macro"), ("readback", "weights read back"),
        ("exact", "MAC outputs = numpy"), ("rms_err", "RMS error (levels)"), ("corr", "correlation with numpy"),
        ("weights_kBps", "weights write+read kB/s"), ("mac_per_s", "MAC vectors/s (host)"),
        ("frames", "frames out/in"), ("retries", "retries"), ("chip_cycles", "chip cycles (STATUS)"),
        ("chip_energy_nJ", "chip energy nJ (STATUS)"),
    ]
    for key, title in labels:
        t.add_row(title, *(str(r[key]) for r in rows))
    console.print(t)
    char = characterize(args.seed, args.repeats)
    console.print(f"error model: {char / 'dmacem.npz'}; plots and summary: {char / 'report'}/", highlight=False)
    ideal = [r for r in rows if r["profile"] == "ideal"]
    if ideal and ideal[0]["exact"] != "100.0%":
        console.print("[red]the ideal twin did not match numpy exactly[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

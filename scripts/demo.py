"""The demo: the whole loop on twins served on real pseudo-terminals, driven by the host as boards would be.

1. For each twin profile: start ``cimlab sim serve --pty``, identify it, program random weights, read them back,
   run a batch of MACs, compare them with numpy; one table of what the link and the chip reported.
2. Characterize the ``default`` twin at 0.8 V and 0.6 V, powered by the served twin's simulated SMU (reached over
   VISA like a bench instrument: its voltage is the twin's VDD, its current follows the twin's energy counters), write
   the report's plots, and fit the error model of the 0.6 V condition (``cimlab characterize``, ``report``, ``fit``).
3. Train on digits: ``float``, then ``quant`` (the ideal quantized model) from it, then ``dnat`` from that through
   the 0.6 V error model (``cimlab train``).
4. "The chip": the twin's data-driven mode with that error model, served on a pty. Compile the quant and the D-NAT
   checkpoints for it, deploy, and bench both on it (``cimlab compile``, ``deploy``, ``bench``).
5. One table: float, ideal quantized, naive on the chip, D-NAT on the chip, each chip figure next to what the host
   predicted (mean ± std over draws of the error model), and where the plots are.

Every step runs the ``cimlab`` command a user would type. Run through ``./scripts/demo`` (which sets up .venv).
Exits 1 when the ideal twin does not match numpy or a chip accuracy lands outside its prediction's spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cimlab.driver import Chip
from cimlab.errmodel import MacErrorModel
from cimlab.twinproc import TwinProcess

console = Console()
ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "demo"


def _env() -> dict[str, str]:
    # one OpenMP thread per torch process: the served twin runs beside it on 2 cores, and two spinning OpenMP
    # threads competing with it slow small tensor operations down many times
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def cimlab(*args: str) -> None:
    """Run one ``cimlab`` command as a user would; stop the demo if it fails."""
    console.print(f"[dim]$ cimlab {' '.join(args)}[/]", highlight=False)
    proc = subprocess.run([sys.executable, "-m", "cimlab.cli", *args], timeout=600, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"cimlab {args[0]} failed with exit status {proc.returncode}")


def cimlab_json(*args: str) -> dict:
    """Run one ``cimlab`` command with ``--json``; echo what it printed but the JSON line, return that object."""
    console.print(f"[dim]$ cimlab {' '.join(args)} --json[/]", highlight=False)
    proc = subprocess.run([sys.executable, "-m", "cimlab.cli", *args, "--json"], timeout=600, env=_env(),
                          stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.rstrip("\n").splitlines()
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"cimlab {args[0]} failed with exit status {proc.returncode}")
    if len(lines) > 1:
        sys.stdout.write("\n".join(lines[:-1]) + "\n")
    return json.loads(lines[-1])


def characterize(seed: int, repeats: int) -> Path:
    """Characterize the default twin over a pty at two supply voltages, powered by its simulated SMU; write the
    report and say how the energy measured through the SMU compares with the chip's own estimate."""
    out = RUNS / "characterize"
    console.print("[bold]characterization[/]: sweeping the 'default' twin over a pty, powered by its simulated SMU "
                  "(VISA over a raw SCPI socket) ...")
    twin = TwinProcess(pty=True, profile="default", seed=seed, smu=True)
    with twin as url:
        cimlab("characterize", "--link", url, "--out", str(out), "--repeats", str(repeats), "--vdd", "0.8,0.6",
               "--profile", "default", "--smu", twin.smu_resource, "--visa-library", "@py", "--no-progress")
    cimlab("report", str(out))
    for label in ("vdd800mV", "vdd600mV"):
        energy = MacErrorModel.load(out / f"dmacem_{label}.npz").meta["provenance"]["energy"]
        console.print(f"{label}: {energy['supply_fj_per_conversion']:.2f} fJ/conversion measured through the SMU, "
                      f"{energy['chip_fj_per_conversion']:.2f} estimated by the chip model (ratio "
                      f"{energy['supply_vs_chip']:.7f})", highlight=False)
    return out


def fit_condition(char: Path, condition: str) -> Path:
    """Fit the error model of one measured condition from the characterization store."""
    out = RUNS / f"dmacem_{condition}.npz"
    fit = cimlab_json("fit", str(char), "--condition", condition, "--out", str(out))
    console.print(f"error model {out.name}: {fit['conversions']:,} conversions, "
                  f"{fit['exact_code_rate'] * 100:.1f} % of the codes exact", highlight=False)
    return out


def train_all(error_model: Path, epochs: tuple[int, int, int], seed: int) -> dict[str, dict]:
    """float -> quant (ideal quantized) -> dnat (through the error model, one table per physical column)."""
    ck = RUNS / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    common = ["--task", "digits", "--seed", str(seed)]
    out = {"float": cimlab_json("train", *common, "--mode", "float", "--out", str(ck / "float.safetensors"),
                                "--epochs", str(epochs[0]))}
    out["quant"] = cimlab_json("train", *common, "--mode", "quant", "--profile", "default",
                               "--init", str(ck / "float.safetensors"), "--out", str(ck / "quant.safetensors"),
                               "--epochs", str(epochs[1]))
    out["naive"] = cimlab_json("evaluate", str(ck / "quant.safetensors"), "--error-model", str(error_model),
                               "--per-column", "--draws", "5")
    out["dnat"] = cimlab_json("train", *common, "--mode", "dnat", "--error-model", str(error_model),
                              "--per-column", "--init", str(ck / "quant.safetensors"),
                              "--out", str(ck / "dnat.safetensors"),
                              "--epochs", str(epochs[2]))
    return out


def on_chip(error_model: Path, seed: int, draws: int) -> dict[str, dict]:
    """Serve the data-driven twin of the measured chip on a pty; compile, deploy and bench quant and dnat on it."""
    ck = RUNS / "checkpoints"
    out = {}
    console.print(f"[bold]the chip[/]: the twin's data-driven mode with {error_model.name}, served on a pty ...")
    with TwinProcess(pty=True, profile="default", seed=seed, sets=[f"error_model={error_model}"]) as url:
        for mode in ("quant", "dnat"):
            pkg = RUNS / f"{mode}.npz"
            cimlab_json("compile", str(ck / f"{mode}.safetensors"), "--link", url, "--out", str(pkg))
            cimlab_json("deploy", str(pkg), "--link", url)
            out[mode] = cimlab_json("bench", str(pkg), "--link", url, "--error-model", str(error_model),
                                    "--draws", str(draws), "--seed", str(seed))
    return out


def pct(v: float | None) -> str:
    """A fraction as a percentage."""
    return "-" if v is None else f"{v * 100:.1f} %"


def final_table(trained: dict[str, dict], chip: dict[str, dict], error_model: Path) -> Table:
    """float, ideal quantized, naive on the chip, D-NAT on the chip: accuracy and what the host predicted."""
    t = Table(title=f"cimlab demo: digits on the chip at 0.6 V\n"
                    f"(data-driven twin of {error_model.name}, over a pty)")
    for col in ("network", "accuracy", "host prediction", "gap"):
        t.add_column(col)
    f, q = trained["float"], trained["quant"]
    t.add_row("float (host)", pct(f.get("accuracy_float", f.get("accuracy"))), "", "")
    t.add_row("ideal quantized (host)", pct(q["accuracy_ideal"]), "", "")
    for label, mode in (("naive on the chip", "quant"), ("D-NAT on the chip", "dnat")):
        r = chip[mode]
        p = r["prediction"]
        pred = "-" if p["mean"] is None else f"{p['mean'] * 100:.1f} ± {p['std'] * 100:.1f} %"
        gap = "-" if r["gap_sigma"] is None else f"{r['gap_sigma']:+.2f} σ"
        t.add_row(label, pct(r["accuracy_chip"]), pred, gap)
    return t


def chip_figures(chip: dict[str, dict], char: Path) -> str:
    """What the chip's counters and the link said, for both networks, and where the plots are."""
    lines = []
    for label, mode in (("naive", "quant"), ("D-NAT", "dnat")):
        r = chip[mode]
        b, c, ls = r["bounds"], r["chip"], r["link_stats"]
        lines.append(
            f"{label} on the chip: {r['images_per_s']:.0f} images/s, {ls['bytes_per_image']:,.0f} link bytes, "
            f"{c['latency_us_per_image']:.0f} µs and {c['energy_nj_per_image']:.1f} nJ per image (STATUS); "
            f"{b['efficiency']:.3f} of the {b['holds']} bound (link {b['link_images_per_s']:,.0f}/s, macro "
            f"{b['macro_images_per_s']:,.0f}/s)"
        )
    draws = len(chip["dnat"]["prediction"]["draws"])
    lines.append(f"host prediction: the same network on the host under the error model, mean ± std over {draws} "
                 "draws; gap = (chip - mean) / std")
    lines.append(f"the report's plots: {char / 'report'}/")
    return "\n".join(lines)


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
        err = (y - expected).astype(np.float64)  # MAC outputs are in levels (MacroSpec.recombine)
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
    ap.add_argument("--epochs", default="10,5,3", help="training epochs of float, quant and dnat")
    ap.add_argument("--draws", type=int, default=5, help="draws of the error model for each bench prediction")
    args = ap.parse_args(argv)
    epochs = tuple(int(e) for e in args.epochs.split(","))
    if len(epochs) != 3:
        ap.error("--epochs takes three numbers: float,quant,dnat")
    t_start = time.perf_counter()
    if RUNS.exists():
        shutil.rmtree(RUNS)  # the demo's own outputs from an earlier run
    RUNS.mkdir(parents=True)
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
    ideal = [r for r in rows if r["profile"] == "ideal"]
    if ideal and ideal[0]["exact"] != "100.0%":
        console.print("[red]the ideal twin did not match numpy exactly[/]")
        return 1
    char = characterize(args.seed, args.repeats)
    console.print(f"error models: {char}/dmacem*.npz; plots and summary: {char / 'report'}/", highlight=False)
    error_model = fit_condition(char, "vdd600mV")
    console.print("[bold]training[/] on digits: float, quant (ideal quantized), D-NAT through the 0.6 V error "
                  "model")
    trained = train_all(error_model, epochs, args.seed)
    chip = on_chip(error_model, args.seed, args.draws)
    console.print(final_table(trained, chip, error_model))
    console.print(chip_figures(chip, char), highlight=False)
    naive, dnat = trained["naive"], trained["dnat"]
    console.print(f"training's own figures under the error model: naive {pct(naive['accuracy_errors_mean'])}, "
                  f"D-NAT {pct(dnat.get('accuracy_errors_mean'))}; "
                  f"demo took {time.perf_counter() - t_start:.0f} s",
                  highlight=False)
    outside = [m for m in ("quant", "dnat") if chip[m]["within_spread"] is False]
    if outside:
        console.print(f"[red]on-chip accuracy outside the prediction's spread: {', '.join(outside)}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``cimlab compile``, ``cimlab deploy`` and ``cimlab bench``: a trained network onto the chip, and its numbers
there.

Registered into the ``cimlab`` group by ``cimlab.cli`` (``register(cli)``). This module imports neither ``cimlab.cli``
nor torch: the commands that need torch (compile, bench) import it when they run, so ``cimlab info`` never does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cimlab.cli_common import (
    LINK_HELP,
    TIMEOUT_HELP,
    call_options,
    cim_errors,
    console,
    emit_json,
    err_console,
    json_option,
    link_option,
    open_chip,
)
from cimlab.deploy.schedule import PACK_MODES
from cimlab.firmware_bridge.errors import ConfigError


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


# ---- compile ---------------------------------------------------------------------------------------------------
@click.command("compile")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--link", "link_url", default=None, help="Compile for the chip here. " + LINK_HELP)
@click.option("--timeout", type=click.FloatRange(min=0.001), default=1.0, show_default=True, help=TIMEOUT_HELP)
@call_options
@click.option("--profile", default=None, help="Compile for this twin profile (name or TOML file).")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The package to write (.npz).")
@click.option("--pack", type=click.Choice(PACK_MODES), default="rows", show_default=True,
              help="How tiles share a load of the macro: rows (keep training's columns, stack in free row "
                   "groups), full (also move columns: fewest loads), none (one tile per load).")
@click.option("--place-on", "place_on", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An error model of the target die (a short `cimlab characterize`): put the busiest columns on "
                   "the columns it converts best. For a network trained on a population of dies; a network trained "
                   "on one die keeps training's columns.")
@json_option
@cim_errors
def compile_cmd(checkpoint: Path, link_url: str | None, timeout: float, profile: str | None, out_file: Path,
                pack: str, place_on: Path | None, as_json: bool) -> None:
    """Compile CHECKPOINT (a quant or dnat checkpoint) into a deployment package for the macro at --link or of
    --profile (default: the checkpoint's own MacroSpec).

    Every CIM layer becomes tiles that fit the macro, with its scales, E-PACT bounds and digital offsets; small
    tiles share a load of the macro; a network that does not fit one load gets a weight-stationary schedule.
    """
    from cimlab.deploy.compile import compile_checkpoint

    if link_url and profile:
        raise ConfigError("choose one of --link (a chip) or --profile (a twin profile), not both")
    spec = hello = None
    source = ""
    if link_url:
        with open_chip(link_url, timeout) as chip:
            hello = chip.hello
        spec, source = hello.spec, f"the chip at {link_url}"
    elif profile:
        from cimlab.chip_sim.profiles import load_profile

        spec, source = load_profile(profile).spec, f"twin profile {profile!r}"
    pkg = compile_checkpoint(checkpoint, spec=spec, spec_source=source, hello=hello, pack=pack, place_on=place_on)
    path = pkg.save(out_file)
    summary = {"package": str(path), "checkpoint": str(checkpoint), "target": pkg.manifest["target"],
               "spec": pkg.spec.to_dict(), **pkg.schedule.summary(),
               "rows_written_per_pass": pkg.rows_written_per_pass(), "layers": []}
    t = Table(title=f"{path.name}: {pkg.describe()}")
    for col in ("layer", "kind", "rows x cols", "tile: layer rows/cols -> page @ macro row, col", "lo", "hi"):
        t.add_column(col, overflow="fold")
    for name, lm in pkg.schedule.layers:
        lp = pkg.layers[name]
        tiles = "; ".join(f"{x.row0}:{x.row1}/{x.col0}:{x.col1} -> p{x.page} @ {x.macro_row},{x.macro_col}"
                          for x in lm.tiles)
        t.add_row(name, lp.kind, f"{lm.n_rows} x {lm.n_cols}", tiles, f"{lp.lo:.4g}", f"{lp.hi:.4g}")
        summary["layers"].append({"name": name, "kind": lp.kind, "n_rows": lm.n_rows, "n_cols": lm.n_cols,
                                  "tiles": len(lm.tiles)})
    console.print(t)
    s = pkg.schedule
    moved = [p for p in s.tiles() if p.tile.macro_col != 0]
    if moved:
        err_console.print(f"[yellow]note[/]: {len(moved)} tile(s) sit on other macro columns than training used "
                          "(--pack full); an error model with per-column tables sees other columns on the chip",
                          highlight=False)
    if s.column_order is not None:
        moved_cols = sum(int(c) != i for i, c in enumerate(s.chip_columns()))
        console.print(f"placed on the die of {str(place_on)!r}: {moved_cols} of {pkg.spec.cols} columns on other "
                      "chip columns (the busiest on the most accurate)", highlight=False)
    console.print(f"{s.n_pages} page(s), utilization {', '.join(f'{u:.0%}' for u in s.summary()['utilization'])}; "
                  f"{s.programming_passes_per_batch} programming pass(es) per inference batch "
                  f"(rows per pass: {pkg.rows_written_per_pass()})", highlight=False)
    emit_json(as_json, summary)


# ---- deploy ----------------------------------------------------------------------------------------------------
def _mismatch_table(rep: Any, limit: int = 20) -> Table:
    t = Table(title=f"page {rep.page}: {len(rep.mismatches)} cell(s) still differ after {rep.passes} pass(es)")
    for col in ("macro row", "macro col", "layer", "tile", "layer row", "layer col", "expected", "read"):
        t.add_column(col)
    for m in rep.mismatches[:limit]:
        t.add_row(str(m.macro_row), str(m.macro_col), m.layer or "(outside tiles)", _fmt(m.tile, "d"),
                  _fmt(m.layer_row, "d"), _fmt(m.layer_col, "d"), str(m.expected), str(m.read))
    return t


@click.command("deploy")
@click.argument("package", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@link_option
@click.option("--page", type=click.IntRange(min=0), default=None,
              help="Page to program (default: the first; bench loads the others as it needs them).")
@click.option("--max-rewrites", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Rewrites of a row that reads back wrong before it is reported.")
@json_option
@cim_errors
def deploy_cmd(package: Path, link_url: str, timeout: float, page: int | None, max_rewrites: int,
               as_json: bool) -> None:
    """Program PACKAGE into the chip at --link, read every row back, rewrite what differs (bounded), and report
    cells that still differ by tile, row and column. Idempotent: a second deploy writes nothing.

    Exits 1 when cells still differ. (With sim:// the twin lives in this command only.)
    """
    from cimlab.deploy.package import DeployPackage
    from cimlab.deploy.program import deploy_package

    pkg = DeployPackage.load(package)
    first = min(t.page for _, lm in pkg.schedule.layers for t in lm.tiles)
    with open_chip(link_url, timeout) as chip:
        rep = deploy_package(chip, pkg, page=first if page is None else page, max_rewrites=max_rewrites)
    state = "[green]verified[/]" if rep.ok else "[red]MISMATCH[/]"
    console.print(f"{package.name} page {rep.page} on {rep.chip_id}: {state}; {rep.rows} rows read back, "
                  f"{rep.rows_written} written in {rep.passes} pass(es), {rep.crc_flagged} frame(s) flagged by "
                  f"CRC echo, {rep.seconds * 1e3:.1f} ms", highlight=False)
    if not rep.ok:
        console.print(_mismatch_table(rep))
        console.print(f"mismatched cells by tile: {rep.by_tile()}", highlight=False)
    emit_json(as_json, rep.as_dict())
    if not rep.ok:
        sys.exit(1)


# ---- bench -----------------------------------------------------------------------------------------------------
def bench_table(r: dict[str, Any]) -> Table:
    """The bench figures for people."""
    p = r["prediction"]
    b = r["bounds"]
    ls = r["link_stats"]
    c = r["chip"]
    t = Table(title=f"cimlab bench: {r['model']} ({r['mode']}) on {r['chip_id']}, "
                    f"{r['images']} {r['task']} images",
              show_header=False)
    t.add_column("")
    t.add_column("", overflow="fold")
    t.add_row("accuracy on the chip", f"{r['accuracy_chip'] * 100:.2f} %")
    t.add_row("host, ideal MACs", f"{p['ideal'] * 100:.2f} % (chip agrees on {r['agreement_ideal'] * 100:.1f} %)")
    if p["mean"] is not None:
        t.add_row("host, error model (prediction)",
                  f"{p['mean'] * 100:.2f} ± {p['std'] * 100:.2f} % over {len(p['draws'])} draws "
                  f"({'pooled' if p['pooled'] else 'per column'}, {p['error_model']})")
        gap = "-" if r["gap_sigma"] is None else f"{r['gap_sigma']:+.2f}"
        t.add_row("gap chip - prediction", f"{gap} std; within spread: {r['within_spread']}")
    else:
        t.add_row("host, error model (prediction)", p["note"])
    t.add_row("images/s", f"{r['images_per_s']:.1f} ({r['seconds']:.2f} s, batches of {r['batch']})")
    t.add_row("bytes on the link", f"{ls['bytes_out']:,} out, {ls['bytes_in']:,} in; {ls['bytes_per_image']:,.0f} "
              f"per image; {ls['retries']} retries, {ls['bad_frames']} damaged frames")
    t.add_row("link rate", f"{ls['rate_Bps'] / 1e6:.3f} MB/s ({ls['rate_source']})")
    t.add_row("chip cycles", f"{c['cycles']:,} ({c['cycles_per_image']:,.0f} per image)")
    t.add_row("chip latency", f"{c['latency_us_per_image']:.2f} µs per image at {c['clock_hz'] / 1e6:g} MHz")
    t.add_row("chip energy (estimated by the chip model)",
              f"{c['energy_nj']:.1f} nJ ({c['energy_nj_per_image']:.3f} nJ per image)")
    eff = b["efficiency"]
    limit = (f"the {b['holds']} bound is the lower"
             + ("" if eff is None or eff >= 0.5 else
                "; neither is reached: processing on the host or the device (a twin's simulation speed) limits "
                "the rate"))
    t.add_row("bounds (images/s)", f"link {_fmt(b['link_images_per_s'], ',.1f')}, macro "
              f"{_fmt(b['macro_images_per_s'], ',.1f')}: {limit}")
    t.add_row("images/s ÷ min(bounds)", f"{_fmt(b['efficiency'], '.3f')} (target >= 0.8)")
    s = r["schedule"]
    t.add_row("schedule", f"{s['pages']} page(s), {s['programming_passes_per_batch']} programming pass(es) per "
              f"batch; {s['page_loads']} page load(s), {s['rows_written']} rows written")
    if r["weight_mismatches"]:
        t.add_row("weights", f"[red]{r['weight_mismatches']} cell(s) differ from the package[/]")
    return t


@click.command("bench")
@click.argument("package", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@link_option
@click.option("--task", default=None, help="Task to run (default: the package's; another task is refused).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder with the task's data (har, cifar10).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N test images.")
@click.option("--batch", "batch_size", type=click.IntRange(1, 1_000_000), default=512, show_default=True,
              help="Images per inference batch (each page is loaded once per batch).")
@click.option("--draws", type=click.IntRange(0, 1000), default=5, show_default=True,
              help="Draws of the error model for the prediction (0: ideal MACs only).")
@click.option("--error-model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Error model for the prediction (default: the one the checkpoint was trained with).")
@click.option("--pooled/--per-column", default=False, show_default=True,
              help="Prediction with one error table for all columns, or one per physical column (as the chip).")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed of the prediction's draws.")
@click.option("--window", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Frames in flight. The chip executes them once each, in order, whatever the link loses.")
@click.option("--max-rewrites", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Rewrites of weights that read back wrong.")
@click.option("--trim", "trim_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Per-chip step: trim each physical column by the gain and offset of this short characterization "
                   "of the chip (cimlab characterize --repeats 16); the chip then returns raw codes (MAC_RAW).")
@click.option("--decode", "decode_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Per-chip step, instead of --trim: decode each physical column's codes by a table (the expected "
                   "ideal level of each code) from this short characterization of the chip; raw codes (MAC_RAW).")
@click.option("--calibrate", "calibrate_n", type=click.IntRange(min=0), default=0, show_default=True,
              help="Per-chip step: fit each layer's per-output gain and offset, and measure the batch-norm "
                   "statistics, on the chip with N training images (no labels) before the run.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@json_option
@cim_errors
def bench_cmd(package: Path, link_url: str, timeout: float, task: str | None, data_dir: Path | None,
              limit: int | None, batch_size: int, draws: int, error_model: Path | None, pooled: bool, seed: int,
              window: int, max_rewrites: int, trim_file: Path | None, decode_file: Path | None, calibrate_n: int,
              progress: bool, as_json: bool) -> None:
    """Run PACKAGE's network on the chip at --link over the task's test set: accuracy on the chip against the
    host's prediction (ideal MACs, and the error model: mean ± std over draws), images/s, link bytes, chip cycles,
    latency and energy, and which bound holds."""
    from cimlab.deploy.bench import bench_package, public
    from cimlab.deploy.package import DeployPackage
    from cimlab.estimate import estimate_package
    from cimlab.training.tasks import load_task
    from cimlab.training.transfer import ColumnDecoder, ColumnTrim

    if trim_file is not None and decode_file is not None:
        raise ConfigError("give --trim or --decode, not both (both decode each column's raw codes)")
    pkg = DeployPackage.load(package)
    if task is not None and task != pkg.task:
        raise ConfigError(f"--task {task!r}: package {package.name} holds a network for task {pkg.task!r}")
    data = load_task(pkg.task, data_dir, limit=limit)
    trim: ColumnTrim | ColumnDecoder | None = None
    if trim_file is not None:
        trim = ColumnTrim.load(trim_file)
    elif decode_file is not None:
        trim = ColumnDecoder.load(decode_file)
    calibration = data.x_train[:calibrate_n] if calibrate_n else None
    with open_chip(link_url, timeout, window=window) as chip:
        err_console.print(f"[bold]bench[/] {pkg.describe()}", highlight=False)
        result = bench_package(pkg, chip, data.x_test, data.y_test, batch_size=batch_size, draws=draws,
                               error_model=error_model, pooled=pooled, seed=seed, progress=progress,
                               max_rewrites=max_rewrites, trim=trim, calibration=calibration)
    out = public(result)
    out["estimate"] = estimate_package(pkg).as_dict()
    console.print(bench_table(out))
    e = out["estimate"]
    console.print(f"estimated on a resident crossbar design ({e['tech']}): {e['total_area_um2']:,.0f} um^2, "
                  f"{e['total_energy_pj_per_inference']:,.1f} pJ per inference (cimlab estimate: by component)",
                  highlight=False)
    emit_json(as_json, out)


COMMANDS = (compile_cmd, deploy_cmd, bench_cmd)


def register(group: click.Group) -> None:
    """Add ``compile``, ``deploy`` and ``bench`` to a click group."""
    for cmd in COMMANDS:
        group.add_command(cmd)


__all__ = ["COMMANDS", "bench_cmd", "bench_table", "compile_cmd", "deploy_cmd", "register"]

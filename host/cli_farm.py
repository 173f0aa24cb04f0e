"""``cimlab farm characterize`` and ``cimlab farm bench``: many boards on many hosts, one Ray actor per board.

Registered into the ``cimlab`` group by ``cimlab.cli`` (``register(cli)``). Ray is imported by ``cimlab.farm`` inside
the commands only (extra ``cimlab[farm]``).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from cimlab.cli_common import cim_errors, console, err_console, json_option
from cimlab.firmware_bridge.errors import ConfigError

RAY_HELP = ("Ray cluster: 'auto' (the cluster this host joined with `ray start`), an address (HOST:6379 or "
            "ray://HOST:10001), or 'local' (start Ray here, offering every --board's resource).")
BOARD_HELP = ("A board as NAME=URL (repeatable); its actor runs on the host started with "
              "ray start --resources '{\"board:NAME\": 1}', and URL is its link as that host sees it.")


def _farm_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--timeout", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
                     help="Seconds without progress before a request to a board is resent.")(f)
    f = click.option("--board", "board_texts", multiple=True, required=True, metavar="NAME=URL", help=BOARD_HELP)(f)
    return click.option("--ray", "ray_address", required=True, metavar="ADDRESS|auto|local", help=RAY_HELP)(f)


@contextmanager
def _stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C asks every board to stop after its current batch; a second one aborts."""
    asked = {"stop": False}

    def handler(signum: int, frame: object) -> None:
        if asked["stop"]:
            raise KeyboardInterrupt
        asked["stop"] = True
        err_console.print("\n[yellow]Ctrl-C: every board stops after its current batch[/] (again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: asked["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


@click.group("farm")
def farm() -> None:
    """A board farm on Ray: characterize or benchmark many boards on many hosts at once."""


@farm.command("characterize")
@_farm_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Farm folder: OUT/NAME holds board NAME's store (on its host), OUT/models the error models.")
@click.option("--repeats", type=click.IntRange(1, 10**9), default=64, show_default=True,
              help="Targeted conversions per physical column and level, at least.")
@click.option("--levels", default=None, help="Levels to target (as cimlab characterize).")
@click.option("--columns", default=None, help="Physical columns to count (as cimlab characterize).")
@click.option("--rows", "row_mode", type=click.Choice(["random", "fixed"]), default="random", show_default=True,
              help="random: vary the active rows; fixed: same rows per level.")
@click.option("--batch-vectors", type=click.IntRange(1, 65535), default=None, help="MAC vectors per batch.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Plan seed.")
@click.option("--vdd", "vdd_text", default=None, metavar="V[,V...]", help="Supply conditions in volts (VDD_MV).")
@click.option("--resume", is_flag=True, help="Continue the boards' stores where they stopped.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the farm's progress.")
@json_option
@cim_errors
def farm_characterize(ray_address: str, board_texts: tuple[str, ...], timeout: float, out_dir: Path, repeats: int,
                      levels: str | None, columns: str | None, row_mode: str, batch_vectors: int | None, seed: int,
                      vdd_text: str | None, resume: bool, progress: bool, as_json: bool) -> None:
    """Characterize every --board at once, one Ray actor per board, each into its own resumable store.

    Writes OUT/models/NAME.npz per chip and OUT/models/merged.npz. Ctrl-C (or a host lost) leaves every store
    consistent: run the same command with --resume to finish.
    """
    from cimlab.characterize import parse_index_list
    from cimlab.farm import FarmProgress, characterize_farm, parse_boards

    boards = parse_boards(board_texts)
    vdd = _parse_volts(vdd_text)
    opts: dict[str, Any] = {"repeats": repeats, "row_mode": row_mode, "batch_vectors": batch_vectors, "seed": seed,
                            "levels": list(parse_index_list(levels, 0, 1 << 30, "--levels")) if levels else None,
                            "columns": list(parse_index_list(columns, 0, 1 << 30, "--columns")) if columns else None}
    with _stop_on_sigint() as should_stop:
        if progress:
            with FarmProgress(err_console, boards, "batches") as display:
                result = characterize_farm(boards, out_dir, ray_address=ray_address, options=opts, vdd=vdd,
                                           resume=resume, timeout=timeout, progress=display,
                                           should_stop=should_stop)
        else:
            result = characterize_farm(boards, out_dir, ray_address=ray_address, options=opts, vdd=vdd,
                                       resume=resume, timeout=timeout, should_stop=should_stop)
    rows = []
    for o in result.outcomes:
        r = o.result or {}
        rows.append({"board": o.board.name, "url": o.board.url, "chip_id": r.get("chip_id"), "host": r.get("host"),
                     "complete": bool(r.get("complete")), "batches_done": r.get("batches_done"),
                     "batches_total": r.get("batches_total"), "batches_run": r.get("batches_run"),
                     "conversions_run": r.get("conversions_run"), "wall_s": r.get("wall_s"),
                     "model": str(result.models[o.board.name]) if o.board.name in result.models else None,
                     "error": o.error})
        state = "[green]complete[/]" if r.get("complete") else ("[red]failed[/]" if o.error else "[yellow]stopped[/]")
        detail = o.error or f"{r.get('batches_done')}/{r.get('batches_total')} batches on {r.get('host')}"
        console.print(f"{o.board.name} ({r.get('chip_id') or o.board.url}): {state}, {detail}", highlight=False,
                      soft_wrap=True)
    if result.merged:
        console.print(f"merged model: {result.merged}", highlight=False)
    elif result.merge_note:
        console.print(f"[yellow]{result.merge_note}", highlight=False)
    if not result.complete:
        boards_args = " ".join(f"--board '{b.name}={b.url}'" for b in boards)
        err_console.print(f"[yellow]not every board finished[/]; the stores are consistent. Resume with:\n"
                          f"  cimlab farm characterize --ray {ray_address} {boards_args} --out '{out_dir}' --resume",
                          highlight=False, soft_wrap=True)
    if as_json:
        click.echo(json.dumps({"out": str(out_dir), "complete": result.complete, "boards": rows,
                               "merged": str(result.merged) if result.merged else None,
                               "wall_s": round(result.wall_s, 3)}))
    if not result.complete:
        sys.exit(1)


@farm.command("bench")
@click.argument("package", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_farm_options
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N test images.")
@click.option("--batch", "batch_size", type=click.IntRange(1, 1_000_000), default=512, show_default=True,
              help="Images per inference batch.")
@click.option("--draws", type=click.IntRange(0, 1000), default=5, show_default=True,
              help="Draws of the error model for the host's prediction (0: ideal MACs only).")
@click.option("--error-model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Error model for the prediction (default: the one the checkpoint was trained with).")
@click.option("--pooled/--per-column", default=False, show_default=True, help="Prediction's error table.")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed of the prediction's draws.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the farm's progress.")
@json_option
@cim_errors
def farm_bench(package: Path, ray_address: str, board_texts: tuple[str, ...], timeout: float, limit: int | None,
               batch_size: int, draws: int, error_model: Path | None, pooled: bool, seed: int, progress: bool,
               as_json: bool) -> None:
    """Run PACKAGE's network on every --board at once (as cimlab bench on each) and tabulate the boards."""
    from rich.table import Table

    from cimlab.farm import FarmProgress, bench_farm, parse_boards

    boards = parse_boards(board_texts)
    opts = {"batch_size": batch_size, "draws": draws, "pooled": pooled, "seed": seed, "limit": limit,
            "data_dir": None}
    if progress:
        with FarmProgress(err_console, boards, "boards") as display:
            outcomes = bench_farm(boards, package, ray_address=ray_address, options=opts, error_model=error_model,
                                  timeout=timeout, progress=display)
    else:
        outcomes = bench_farm(boards, package, ray_address=ray_address, options=opts, error_model=error_model,
                              timeout=timeout)
    t = Table(title=f"cimlab farm bench: {package.name} on {len(boards)} boards")
    for col in ("board", "chip", "accuracy on chip", "host prediction", "images/s", "energy nJ/image", "state"):
        t.add_column(col)
    rows = []
    for o in outcomes:
        r = o.result
        if r is None:
            t.add_row(o.board.name, "-", "-", "-", "-", "-", f"[red]{o.error}")
            rows.append({"board": o.board.name, "error": o.error})
            continue
        p = r["prediction"]
        pred = "-" if p["mean"] is None else f"{p['mean'] * 100:.2f} ± {p['std'] * 100:.2f} %"
        t.add_row(o.board.name, r["chip_id"], f"{r['accuracy_chip'] * 100:.2f} %", pred,
                  f"{r['images_per_s']:.1f}", f"{r['chip']['energy_nj_per_image']:.3f}", "[green]done")
        rows.append(r)
    console.print(t)
    if as_json:
        click.echo(json.dumps({"package": str(package), "boards": rows}))
    if any(o.result is None for o in outcomes):
        sys.exit(1)


def _parse_volts(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--vdd: {text!r} is not a comma-separated list of volts") from None


def register(group: click.Group) -> None:
    """Add the ``farm`` group to a click group."""
    group.add_command(farm)


__all__ = ["farm", "farm_bench", "farm_characterize", "register"]

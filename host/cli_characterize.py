"""``cimlab characterize``, ``cimlab fit`` and ``cimlab report``: measure the macro and build its error model.

Registered into the ``cimlab`` group by ``cimlab.cli`` (``register(cli)``). Numpy-heavy parts are imported inside
the commands only.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from cimlab.cli_common import cim_errors, console, emit_json, err_console, json_option, link_option, open_chip
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.instruments.supplies import SUPPLY_MODELS


def _parse_volts(text: str | None) -> list[float] | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise ConfigError(f"--vdd: {part!r} is not a voltage in volts (e.g. 0.7,0.8,0.9)") from None
    return out


@contextmanager
def _stop_on_sigint(message: str) -> Iterator[Callable[[], bool]]:
    """First Ctrl-C asks the sweep to stop after the current batch; a second one interrupts at once."""
    stop = {"asked": False}

    def handler(signum: int, frame: object) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        err_console.print(f"\n[yellow]Ctrl-C: {message}[/] (press again to abort the batch)", highlight=False)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: stop["asked"]
    finally:
        signal.signal(signal.SIGINT, previous)


def supply_limits(chip: Any, profile_name: str, vdd_max: float | None, compliance: float | None) -> Any:
    """The supply's limits for this chip, from its profile (which must describe the chip's MacroSpec)."""
    from cimlab.chip_sim.profiles import load_profile
    from cimlab.errmodel import spec_differences
    from cimlab.instruments.supplies import SupplyLimits

    profile = load_profile(profile_name)
    if profile.spec != chip.spec:
        diff = spec_differences(profile.spec, chip.spec, f"profile {profile_name!r}", "chip")
        raise ConfigError(f"the supply limits come from profile {profile_name!r}, which describes another macro "
                          f"than the chip's ({diff}); give --profile with the chip's own profile")
    return SupplyLimits.from_profile(profile, vdd_max_v=vdd_max, compliance_a=compliance)


def check_conditions(conds: list[Any], limits: Any) -> None:
    """Every condition's VDD inside the limits (before anything is created or powered)."""
    for c in conds:
        if c.vdd_mv is None:
            raise ConfigError("this store's conditions have no supply voltage; --smu needs --vdd")
        limits.check(c.vdd_mv / 1000.0, f"--vdd ({c.label})")


def plan_options(spec: Any, repeats: int, row_mode: str, batch_vectors: int | None, seed: int,
                 levels: str | None, columns: str | None) -> dict[str, Any]:
    """The plan options as given, levels and columns parsed against the chip's MacroSpec."""
    from cimlab.characterize import parse_index_list

    return {
        "repeats": repeats, "row_mode": row_mode, "batch_vectors": batch_vectors, "seed": seed,
        "levels": list(parse_index_list(levels, 0, spec.s_max, "--levels")) if levels else None,
        "columns": list(parse_index_list(columns, 0, spec.physical_cols - 1, "--columns")) if columns else None,
    }


def resumed_plan(out_dir: Path, chip: Any, opts: dict[str, Any], volts: list[float] | None,
                 given: Callable[[str], bool], stack: ExitStack) -> tuple[Any, Any, list[Any]]:
    """(store, plan, conditions) of a store to continue, checked against the chip and the options given."""
    from cimlab.characterize import MeasurementStore, Plan, check_resume, conditions_from_vdd

    store = stack.enter_context(MeasurementStore.open(out_dir))
    requested = {k: v for k, v in opts.items() if given(k)}
    conds_req = conditions_from_vdd(volts) if given("vdd_text") else None
    options, conds = check_resume(store, chip, requested, conds_req)
    return store, Plan(chip.spec, options), conds


def new_plan(chip: Any, opts: dict[str, Any], volts: list[float] | None) -> tuple[Any, list[Any]]:
    """(plan, conditions) of a new sweep."""
    from cimlab.characterize import Plan, PlanOptions, conditions_from_vdd

    return Plan(chip.spec, PlanOptions.from_dict(opts)), conditions_from_vdd(volts)


def open_bench_supply(resource: str, visa_library: str, model: str, channel: int, limits: Any,
                      stack: ExitStack) -> Any:
    """The supply, opened and identified (closed when ``stack`` unwinds)."""
    from cimlab.characterize import SupplySetup
    from cimlab.instruments.supplies import open_supply

    supply = open_supply(resource, limits, visa_library, model=model, channel=channel)
    stack.callback(supply.close)
    return SupplySetup(supply)


def sweep_summary(out_dir: Path, result: Any) -> dict[str, Any]:
    """What characterize reports (its --json document)."""
    return {
        "out": str(out_dir),
        "complete": result.complete,
        "interrupted": result.interrupted,
        "batches_done": result.batches_done,
        "batches_total": result.batches_total,
        "conversions_run": result.conversions_run,
        "wall_s": round(result.wall_s, 3),
        "conversions_per_s": result.conversions_run / result.wall_s if result.wall_s > 0 else None,
        "models": [str(p) for p in result.models],
    }


def print_sweep_end(result: Any, resume_cmd: str) -> None:
    """The closing lines for people (stderr)."""
    if result.interrupted:
        err_console.print(
            f"[yellow]stopped[/] after {result.batches_done} of {result.batches_total} batches; the store is "
            f"consistent. Resume with:\n  {resume_cmd}", highlight=False, soft_wrap=True,
        )
        return
    rate = result.conversions_run / result.wall_s if result.wall_s > 0 else None
    err_console.print(
        f"{result.batches_done}/{result.batches_total} batches, {result.conversions_run:,} conversions in "
        f"{result.wall_s:.2f} s" + (f" ({rate / 1e6:.2f} Mconv/s)" if rate else ""), highlight=False,
    )
    for p in result.models:
        err_console.print(f"model: {p}", highlight=False)


@click.command("characterize")
@link_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the store, the models and the report (must be new or empty unless --resume).")
@click.option("--repeats", type=click.IntRange(1, 10**9), default=64, show_default=True,
              help="Targeted conversions per physical column and level, at least.")
@click.option("--levels", default=None, help="Levels to target: N, A-B, A:B[:STEP], comma-separated "
              "(default: every reachable level).")
@click.option("--columns", default=None, help="Physical columns j = slice * cols + col to count, same syntax "
              "(default: all; every column still converts).")
@click.option("--rows", "row_mode", type=click.Choice(["random", "fixed"]), default="random", show_default=True,
              help="random: vary the active rows (average per-cell mismatch); fixed: same rows per level.")
@click.option("--batch-vectors", type=click.IntRange(1, 65535), default=None,
              help="MAC vectors per batch (default: about 2**20 conversions).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Plan seed.")
@click.option("--resume", is_flag=True, help="Continue the store in --out with its own plan.")
@click.option("--vdd", "vdd_text", default=None, metavar="V[,V...]",
              help="Supply conditions in volts, e.g. 0.7,0.8,0.9: writes the chip's VDD_MV and, with --smu, "
                   "sets the supply.")
@click.option("--smu", "smu_resource", default=None, metavar="RESOURCE",
              help="VISA resource of the supply powering the macro (its charge during MACs gives the measured "
                   "energy), e.g. GPIB0::24::INSTR or a served twin's TCPIP::127.0.0.1::PORT::SOCKET.")
@click.option("--visa-library", default="", metavar="LIB",
              help="pyvisa backend: '' (system VISA), '@py' (pyvisa-py), or 'FILE.yaml@sim' (pyvisa-sim).")
@click.option("--smu-model", type=click.Choice(SUPPLY_MODELS), default="auto", show_default=True,
              help="Supply driver (auto: by *IDN?).")
@click.option("--smu-channel", type=click.IntRange(1, 3), default=1, show_default=True,
              help="Output of a multi-output supply (E3631A, E36312A, E364xA).")
@click.option("--profile", "chip_profile", default="default", show_default=True, metavar="NAME|FILE",
              help="The chip's profile: its allowed VDD range and the supply's compliance and ramp (it must "
                   "describe the chip's MacroSpec).")
@click.option("--vdd-max", type=float, default=None, metavar="V",
              help="Highest voltage the supply may set, V (default: the chip's maximum from --profile).")
@click.option("--compliance", type=click.FloatRange(min=0, min_open=True), default=None, metavar="A",
              help="Supply current limit, A, set before the output turns on (default: the profile's).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@json_option
@cim_errors
def characterize(link_url: str, timeout: float, out_dir: Path, repeats: int, levels: str | None,
                 columns: str | None, row_mode: str, batch_vectors: int | None, seed: int, resume: bool,
                 vdd_text: str | None, smu_resource: str | None, visa_library: str, smu_model: str,
                 smu_channel: int, chip_profile: str, vdd_max: float | None, compliance: float | None,
                 progress: bool, as_json: bool) -> None:
    """Sweep the chip at --link: every column, every reachable level, into a resumable store in --out.

    Writes OUT/measurements.sqlite (appended batch by batch) and, when the plan is complete, OUT/dmacem.npz.
    With --smu, every --vdd is checked against the chip's range and --vdd-max before the store is created or the
    supply is touched. Ctrl-C stops after the current batch; run the same command with --resume to finish.
    """
    from cimlab.characterize import MeasurementStore, SweepRunner, store_meta

    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)

    volts = _parse_volts(vdd_text)
    if smu_resource and not volts and not resume:
        raise ConfigError("--smu needs --vdd: the supply voltage of each condition")
    with ExitStack() as stack:
        chip = stack.enter_context(open_chip(link_url, timeout))
        opts = plan_options(chip.spec, repeats, row_mode, batch_vectors, seed, levels, columns)
        limits = supply_limits(chip, chip_profile, vdd_max, compliance) if smu_resource else None
        if resume:
            store, plan, conds = resumed_plan(out_dir, chip, opts, volts, given, stack)
        else:
            plan, conds = new_plan(chip, opts, volts)
        supply = None
        if limits is not None:
            check_conditions(conds, limits)
            supply = open_bench_supply(smu_resource, visa_library, smu_model, smu_channel, limits, stack)
        if not resume:
            instrument = None if supply is None else {
                "resource": smu_resource, "visa_library": visa_library, "model": supply.supply.source.model,
                "compliance_a": limits.compliance_a, "limits": limits.source}
            meta = store_meta(chip, plan, conds, link_url, instrument)
            store = stack.enter_context(MeasurementStore.create(out_dir, meta, conds))
        err_console.print(f"[bold]characterize[/] {chip.hello.chip_id} ({chip.spec.describe()})", highlight=False)
        err_console.print(f"plan: {plan.describe()}; conditions: {', '.join(c.label for c in conds)}",
                          highlight=False)
        if plan.unplanned_levels:
            err_console.print(f"[yellow]levels no digit profile reaches (not targeted): {plan.unplanned_levels}")
        with _stop_on_sigint("stopping after the current batch; the store stays consistent") as should_stop:
            runner = SweepRunner(chip, store, plan, supply=supply, should_stop=should_stop,
                                 console=err_console if progress else None)
            result = runner.run()
    print_sweep_end(result, f"cimlab characterize --link '{link_url}' --out '{out_dir}' --resume")
    emit_json(as_json, sweep_summary(out_dir, result))
    if result.interrupted:
        sys.exit(130)


def _load_source(path: Path, condition: str | None) -> Any:
    """A model from a characterize folder (its store, one condition) or from a .npz file."""
    from cimlab.characterize import STORE_NAME, MeasurementStore, model_for_condition
    from cimlab.errmodel import MacErrorModel

    if path.is_dir():
        if not (path / STORE_NAME).is_file() and (path / "dmacem.npz").is_file() and condition is None:
            return MacErrorModel.load(path / "dmacem.npz")
        with MeasurementStore.open(path) as store:
            labels = [c.label for c in store.conditions()]
            if condition is None:
                index = 0
            elif condition in labels:
                index = labels.index(condition)
            else:
                raise ConfigError(f"{path} has no condition {condition!r}; it has {', '.join(labels)}")
            plan = store.meta.get("plan") or {}
            done = len(store.done_batches(index))
            if done < int(plan.get("n_batches", 0)):
                err_console.print(f"[yellow]{path}: only {done} of {plan.get('n_batches')} batches measured",
                                  highlight=False)
            return model_for_condition(store, index)
    return MacErrorModel.load(path)


@click.command("fit")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The error model to write (.npz).")
@click.option("--condition", default=None, help="Condition label to take from each store (default: the first).")
@click.option("--allow-mixed-chips", is_flag=True,
              help="Merge models of different chips (refused by default: their per-column errors differ).")
@json_option
@cim_errors
def fit(sources: tuple[Path, ...], out_file: Path, condition: str | None, allow_mixed_chips: bool,
        as_json: bool) -> None:
    """Build one error model from characterize folders and/or .npz models (counts add; one MacroSpec and one chip
    unless --allow-mixed-chips; every chip id is recorded)."""
    import numpy as np

    from cimlab.errmodel import MacErrorModel

    models = [_load_source(p, condition) for p in sources]
    merged = MacErrorModel.merge(models, allow_mixed_chips=allow_mixed_chips) if len(models) > 1 else models[0]
    path = merged.save(out_file)
    summary = merged.summary()
    analog = merged.fit_analog()
    r = analog.resolved
    summary.update({
        "out": str(path),
        "sources": [str(p) for p in sources],
        "analog_resolved_columns": int(r.sum()),
        "analog_gain_mean": float(np.mean(analog.gain[r])) if r.any() else None,
        "analog_gain_std": float(np.std(analog.gain[r])) if r.any() else None,
        "analog_offset_std_lsb": float(np.std(analog.offset[r])) if r.any() else None,
        "analog_noise_median_lsb": float(np.median(analog.noise[r])) if r.any() else None,
    })
    summary["chip_ids"] = sorted({m.model.chip_id for m in models})
    console.print(
        f"{path}: {summary['conversions']:,} conversions from chip(s) {', '.join(summary['chip_ids'])}, "
        f"{summary['columns_observed']} columns x {summary['levels_observed']} levels, "
        f"{summary['exact_code_rate'] * 100:.2f} % exact codes; gain, offset and noise below one LSB could be told "
        f"apart in {summary['analog_resolved_columns']} of {merged.spec.physical_cols} columns (see "
        "`cimlab report`)", highlight=False,
    )
    emit_json(as_json, summary)


@click.command("report")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_file", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Model to report on (default: FOLDER/dmacem.npz).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Where the PNGs and summary.md go (default: FOLDER/report).")
@json_option
@cim_errors
def report(folder: Path, model_file: Path | None, out_dir: Path | None, as_json: bool) -> None:
    """Plots (transfer curve, P(code|s) heat map, error histograms, per-column fits) and summary.md."""
    from cimlab.characterize import STORE_NAME, MeasurementStore
    from cimlab.errmodel import MacErrorModel
    from cimlab.report import write_report

    model_path = model_file or folder / "dmacem.npz"
    if not model_path.is_file():
        raise ConfigError(f"{model_path} not found: finish the sweep (--resume) or run `cimlab fit` first")
    model = MacErrorModel.load(model_path)
    target = out_dir or folder / "report"
    with ExitStack() as stack:
        store = None
        if (folder / STORE_NAME).is_file():
            store = stack.enter_context(MeasurementStore.open(folder))
        files = write_report(model, target, store=store, title=f"cimlab characterization: {folder.name}")
    for f in files:
        console.print(f"wrote {f}", highlight=False)
    emit_json(as_json, {"out": str(target), "files": [str(f) for f in files]})


COMMANDS = (characterize, fit, report)


def register(group: click.Group) -> None:
    """Add ``characterize``, ``fit`` and ``report`` to a click group."""
    for cmd in COMMANDS:
        group.add_command(cmd)


__all__ = ["COMMANDS", "characterize", "fit", "register", "report"]

"""The sweep: run a plan on a chip, batch by batch, into a measurement store; resume where it stopped.

Per condition (supply voltage), per batch not yet in the store:

1. program the batch's weights (skipped when they equal what the chip already holds) and **read them back**;
2. key the chip's noise to the batch (the NOISE_SEED register: a twin's codes then follow from the batch alone,
   so a resumed sweep repeats them; a chip's noise is physical) and stream its inputs with MAC_RAW (the driver
   windows the frames) while the supply current is sampled;
3. tally (column, ideal level, code) with the ideal levels computed from the weights read back, so cells that
   did not store what was written are accounted for;
4. commit the tallies and the batch's row in one transaction.

The runner never asks what is at the other end of the link. ``should_stop`` is polled between batches (Ctrl-C
sets it): the sweep then returns with ``interrupted=True`` and a consistent store.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cimlab.characterize.plan import Plan, PlanOptions
from cimlab.characterize.store import BatchRecord, Condition, MeasurementStore
from cimlab.errmodel import MacErrorModel, spec_differences
from cimlab.firmware_bridge.errmodel import count_conversions
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError, DeviceError
from cimlab.firmware_bridge.files import package_version
from cimlab.firmware_bridge.spec import MacroSpec

if TYPE_CHECKING:
    from rich.console import Console

    from cimlab.driver import Chip
    from cimlab.instruments.supplies import BenchSupply

log = logging.getLogger(__name__)
MODEL_NAME = "dmacem.npz"
SAMPLE_PERIOD_S = 0.05
"""Shortest interval between two supply-current readings during a batch, seconds."""


def conditions_from_vdd(vdd_volts: list[float] | None) -> list[Condition]:
    """``[0.7, 0.8]`` -> conditions ``vdd700mV``, ``vdd800mV``; None -> one condition ``as-is``."""
    if not vdd_volts:
        return [Condition("as-is", None)]
    out = []
    for v in vdd_volts:
        if not (v > 0 and np.isfinite(v)):
            raise ConfigError(f"--vdd values must be positive volts, got {v}")
        mv = round(v * 1000)
        out.append(Condition(f"vdd{mv}mV", mv))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--vdd lists a voltage twice: {labels}")
    return out


@dataclass
class SupplySetup:
    """A bench supply that powers the macro during the sweep.

    Attributes:
        supply: the supply (opened, with its limits; the caller closes it).
        sample_period_s: shortest interval between current readings during a batch, s.
    """

    supply: BenchSupply
    sample_period_s: float = SAMPLE_PERIOD_S


@dataclass
class SweepResult:
    """What a run did."""

    batches_done: int = 0
    batches_total: int = 0
    batches_run: int = 0
    conversions_run: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    models: list[Path] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every batch of every condition is in the store."""
        return self.batches_done == self.batches_total


def store_meta(chip: Chip, plan: Plan, conditions: list[Condition], link_url: str,
               instrument: dict[str, Any] | None) -> dict[str, Any]:
    """The run metadata written when a store is created."""
    return {
        "software_version": package_version(),
        "hello": chip.hello.as_dict(),
        "spec": chip.spec.to_dict(),
        "plan": plan.to_dict(),
        "plan_digest": plan.digest,
        "seed": plan.options.seed,
        "conditions": [c.to_dict() for c in conditions],
        "link": link_url,
        "instrument": instrument,
    }


def check_resume(store: MeasurementStore, chip: Chip, requested: dict[str, Any] | None,
                 conditions: list[Condition] | None) -> tuple[PlanOptions, list[Condition]]:
    """The stored plan options and conditions, after checking the chip and any explicitly requested options.

    ``requested`` holds the plan options the user gave explicitly (None or empty: take the stored ones);
    ``conditions`` likewise. ArtifactError naming every difference.
    """
    meta = store.meta
    problems = []
    stored_spec = meta.get("spec")
    if stored_spec != chip.spec.to_dict():
        try:
            problems.append("MacroSpec differs: " + spec_differences(MacroSpec.from_dict(stored_spec), chip.spec,
                                                                       "store", "chip"))
        except (ConfigError, TypeError):
            problems.append(f"MacroSpec differs: store {stored_spec!r} vs chip {chip.spec.to_dict()!r}")
    stored_chip = (meta.get("hello") or {}).get("chip_id")
    if stored_chip != chip.hello.chip_id:
        problems.append(f"chip id differs: store {stored_chip!r} vs chip {chip.hello.chip_id!r}")
    try:
        options = PlanOptions.from_dict(meta["plan"]["options"])
    except (KeyError, TypeError, ConfigError) as err:
        raise ArtifactError(f"{store.path}: the stored plan is unreadable: {err}") from err
    stored_opts = options.to_dict()
    for key, value in (requested or {}).items():
        if stored_opts.get(key) != value:
            problems.append(f"plan option {key}: store {stored_opts.get(key)!r} vs requested {value!r}")
    stored_conds = store.conditions()
    if conditions is not None and [c.to_dict() for c in conditions] != [c.to_dict() for c in stored_conds]:
        problems.append(
            f"conditions differ: store {[c.label for c in stored_conds]} "
            f"vs requested {[c.label for c in conditions]}"
        )
    if problems:
        raise ArtifactError(f"cannot resume {store.path}: " + "; ".join(problems))
    plan = Plan(chip.spec, options)
    if plan.digest != meta.get("plan_digest"):
        raise ArtifactError(
            f"cannot resume {store.path}: this cimlab derives a different plan from the stored options "
            f"(digest {plan.digest[:12]} vs stored {str(meta.get('plan_digest'))[:12]})"
        )
    return options, stored_conds


def noise_key(plan: Plan, condition: int, batch: int) -> int:
    """The NOISE_SEED of a batch: a 32-bit function of the plan, the condition and the batch index."""
    return zlib.crc32(f"{plan.digest}:{condition}:{batch}".encode())


def ideal_levels(spec: MacroSpec, inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``spec.ideal_levels`` [B, P, G, K, C]; computed on one column and broadcast when every column of the
    weights is the same (a column's levels depend on its own weights only), which is what the plan programs."""
    if weights.shape[1] > 1 and np.array_equal(weights, np.broadcast_to(weights[:, :1], weights.shape)):
        one = spec.replace(cols=1).ideal_levels(inputs, weights[:, :1])
        return np.broadcast_to(one, (*one.shape[:-1], spec.cols))
    return spec.ideal_levels(inputs, weights)


class SweepRunner:
    """Runs a plan on a chip into a store (see the module docstring).

    Args:
        chip: the open chip.
        store: the open store (created for this plan, or checked by ``check_resume``).
        plan: the plan.
        supply: the bench supply, or None (then only the chip's VDD_MV register is written).
        should_stop: polled between batches; True stops the sweep cleanly.
        console: where the progress bar goes (None: no progress bar).
    """

    def __init__(
        self,
        chip: Chip,
        store: MeasurementStore,
        plan: Plan,
        *,
        supply: SupplySetup | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        console: Console | None = None,
    ) -> None:
        if chip.spec != plan.spec:
            raise ConfigError("the plan was made for another MacroSpec than the chip's")
        self.chip = chip
        self.store = store
        self.plan = plan
        self.supply = supply
        self.should_stop = should_stop
        self.console = console
        self.conditions = store.conditions()
        self._held_weights: np.ndarray | None = None
        self._readback: np.ndarray | None = None

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self, *, finalize: bool = True) -> SweepResult:
        """Run every batch not yet in the store; when the plan is complete (and ``finalize``), consolidate the
        store's ``counts`` table and write the models."""
        plan = self.plan
        done = [self.store.done_batches(ci) for ci in range(len(self.conditions))]
        todo = [(ci, b) for ci in range(len(self.conditions)) for b in range(plan.n_batches) if b not in done[ci]]
        total = len(self.conditions) * plan.n_batches
        result = SweepResult(batches_total=total, batches_done=total - len(todo))
        self.store.log("resume" if result.batches_done else "start",
                       f"{len(todo)} of {total} batches to run; software {package_version()}")
        t_start = time.perf_counter()
        with ExitStack() as stack:
            progress = stack.enter_context(self._progress(total, result.batches_done))
            powered = None
            if self.supply is not None and todo:
                first = self.conditions[todo[0][0]]
                powered = stack.enter_context(self.supply.supply.powered(self._volts(first)))
            current_cond = -1
            for ci, b in todo:
                if self.should_stop():
                    result.interrupted = True
                    break
                if ci != current_cond:
                    self._enter_condition(ci, powered)
                    current_cond = ci
                conversions = self._run_batch(ci, b)
                result.batches_run += 1
                result.batches_done += 1
                result.conversions_run += conversions
                progress(result.batches_done, conversions)
        result.wall_s = time.perf_counter() - t_start
        if result.interrupted:
            self.store.log("interrupted", f"{result.batches_done} of {total} batches in the store")
        elif result.complete and finalize:
            spec = plan.spec
            for ci in range(len(self.conditions)):
                self.store.consolidate(ci, (spec.physical_cols, spec.n_levels, spec.n_codes))
            result.models = self.write_models()
            self.store.log("finished", ", ".join(p.name for p in result.models))
        return result

    def _volts(self, cond: Condition) -> float:
        if cond.vdd_mv is None:
            raise ConfigError("a supply needs a voltage per condition: give --vdd")
        return cond.vdd_mv / 1000.0

    def _enter_condition(self, ci: int, powered: BenchSupply | None) -> None:
        cond = self.conditions[ci]
        if cond.vdd_mv is not None:
            if powered is not None:
                powered.set_voltage(self._volts(cond))
            held = self.chip.write_reg("VDD_MV", cond.vdd_mv)
            if held != cond.vdd_mv:
                raise DeviceError(f"the chip holds VDD_MV={held} after writing {cond.vdd_mv}")
        vdd = self.chip.read_reg("VDD_MV")
        temp_c = self.chip.read_reg("TEMP_CC") / 100.0
        self.store.set_condition_state(ci, vdd, temp_c)
        self._readback = None  # re-read the weights under the new condition
        self.store.log("condition", f"{cond.label}: VDD_MV={vdd}, TEMP={temp_c:g} C")
        log.info("condition %s: VDD_MV=%d, TEMP=%g C", cond.label, vdd, temp_c)

    def _run_batch(self, ci: int, index: int) -> int:
        chip, plan, spec = self.chip, self.plan, self.plan.spec
        t0 = time.perf_counter()
        batch = plan.batch(index)
        if self._held_weights is None or not np.array_equal(batch.weights, self._held_weights):
            chip.write_weights(batch.weights)
            self._held_weights = batch.weights
            self._readback = None
        if self._readback is None:
            self._readback = chip.read_weights()
        sampler: Any = nullcontext()
        if self.supply is not None:
            from cimlab.instruments.sampler import CurrentSampler

            sampler = CurrentSampler(self.supply.supply, period_s=self.supply.sample_period_s)
        chip.write_reg("NOISE_SEED", noise_key(plan, ci, index))
        with sampler as s:
            t_mac = time.perf_counter()
            codes = chip.mac_raw(batch.inputs)
            mac_s = time.perf_counter() - t_mac
        cost = chip.last_cost
        levels = ideal_levels(spec, batch.inputs, self._readback)
        counts = count_conversions(spec, levels, codes)
        counts[~plan.column_mask] = 0
        record = BatchRecord(
            vectors=int(batch.inputs.shape[0]),
            conversions=int(codes.size),
            wall_s=time.perf_counter() - t0,
            mac_s=mac_s,
            chip_cycles=int(cost.cycles),
            chip_energy_fj=int(cost.energy_fj),
        )
        if self.supply is not None and s.summary is not None and s.summary.mean_a is not None:
            # measured: the charge the supply delivered over the MACs, at the voltage it held
            volts = self.supply.supply.volts
            record = dataclasses.replace(
                record, supply_v=volts, supply_a_mean=s.summary.mean_a, supply_samples=s.summary.samples,
                supply_energy_j=volts * s.summary.charge_c,
            )
        self.store.commit_batch(ci, index, counts, record)
        log.debug("batch %d of condition %d: %d conversions, chip %d fJ, supply %s J", index, ci, codes.size,
                  record.chip_energy_fj, record.supply_energy_j)
        return int(codes.size)

    @contextmanager
    def _progress(self, total: int, done: int) -> Iterator[Callable[[int, int], None]]:
        if self.console is None:
            yield lambda _done, _conv: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[bold]characterize"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
        )
        t0 = time.perf_counter()
        conv = 0
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task("sweep", total=total, completed=done, rate="")

            def update(now_done: int, conversions: int) -> None:
                nonlocal conv
                conv += conversions
                rate = conv / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=now_done, rate=f"{rate / 1e6:.2f} Mconv/s")

            yield update

    # ---- results ------------------------------------------------------------------------------------------------
    def write_models(self) -> list[Path]:
        """``dmacem.npz`` (first condition) and, with several conditions, ``dmacem_<label>.npz`` for each."""
        return write_models(self.store, self.store.path.parent)


def model_for_condition(store: MeasurementStore, cond_id: int) -> MacErrorModel:
    """The error model of one condition of a store."""
    meta = store.meta
    try:
        spec = MacroSpec.from_dict(meta["spec"])
    except (KeyError, ConfigError, TypeError) as err:
        raise ArtifactError(f"{store.path}: stored MacroSpec unreadable: {err}") from err
    conds = store.conditions()
    if not 0 <= cond_id < len(conds):
        raise ConfigError(f"condition {cond_id} is outside 0..{len(conds) - 1} of {store.path}")
    counts = store.counts(cond_id, (spec.physical_cols, spec.n_levels, spec.n_codes))
    state = store.condition_state(cond_id)
    hello = meta.get("hello") or {}
    records = store.batch_records(cond_id)
    provenance = {
        "tool": "cimlab characterize",
        "software_version": meta.get("software_version"),
        "store": str(store.path.resolve()),
        "created_at": meta.get("created_at"),
        "plan_digest": meta.get("plan_digest"),
        "plan_options": (meta.get("plan") or {}).get("options"),
        "seed": meta.get("seed"),
        "link": meta.get("link"),
        "firmware_id": hello.get("firmware_id"),
        "bitstream_id": hello.get("bitstream_id"),
        "batches": len(records),
        "instrument": meta.get("instrument"),
    }
    energy = energy_summary(records, spec)
    if energy:
        provenance["energy"] = energy
    conditions = {"label": conds[cond_id].label, "vdd_mv": state["vdd_mv"], "temp_c": state["temp_c"]}
    return MacErrorModel.from_counts(spec, counts, chip_id=hello.get("chip_id", ""), conditions=conditions,
                                     provenance=provenance)


ESTIMATED = "estimated by the chip model"
MEASURED = "measured through the supply"


def energy_summary(records: list[dict[str, Any]], spec: MacroSpec) -> dict[str, Any]:
    """Energy per conversion and per MAC: the chip's own estimate (its energy counters), and the supply's
    measurement where a supply measured the batches (the charge it delivered times its voltage)."""
    if not records:
        return {}
    vectors = sum(r["vectors"] for r in records)
    conversions = sum(r["conversions"] for r in records)
    macs = vectors * spec.rows * spec.cols
    out: dict[str, Any] = {
        "conversions": float(conversions),
        "macs": float(macs),
        "chip_fj_per_conversion": sum(r["chip_energy_fj"] for r in records) / conversions,
        "chip_fj_per_mac": sum(r["chip_energy_fj"] for r in records) / macs,
        "source": ESTIMATED,
    }
    measured = [r for r in records if r.get("supply_energy_j") is not None]
    if measured:
        e = sum(r["supply_energy_j"] for r in measured)
        charge = sum(r["supply_energy_j"] / r["supply_v"] for r in measured)
        span = sum(r["supply_energy_j"] / (r["supply_v"] * r["supply_a_mean"]) for r in measured
                   if r["supply_a_mean"])
        chip_m = sum(r["chip_energy_fj"] for r in measured)
        out.update({
            "source": MEASURED,
            "supply_batches": len(measured),
            "supply_mean_a": charge / span if span > 0 else None,
            "supply_fj_per_conversion": e * 1e15 / sum(r["conversions"] for r in measured),
            "supply_fj_per_mac": e * 1e15 / (sum(r["vectors"] for r in measured) * spec.rows * spec.cols),
            "supply_vs_chip": e * 1e15 / chip_m if chip_m else None,
        })
    return out


def write_models(store: MeasurementStore, folder: Path) -> list[Path]:
    """Write the models of a complete store into ``folder`` (see ``SweepRunner.write_models``)."""
    conds = store.conditions()
    paths = [model_for_condition(store, 0).save(folder / MODEL_NAME)]
    if len(conds) > 1:
        for ci, cond in enumerate(conds):
            paths.append(model_for_condition(store, ci).save(folder / f"dmacem_{cond.label}.npz"))
    return paths


__all__ = [
    "MODEL_NAME",
    "SupplySetup",
    "SweepResult",
    "SweepRunner",
    "check_resume",
    "conditions_from_vdd",
    "energy_summary",
    "model_for_condition",
    "store_meta",
    "write_models",
]

#!/usr/bin/env python3
"""The D-NAT study on the twin: what the chip loses, what D-NAT and the per-chip deploy step win back, for one chip
and for chips never seen in training, and what a training step costs.

Steps (offline, on the CPU):

1. Error models, by characterizing twins (``cimlab characterize``): a static per-column model (offsets 0.5 LSB,
   gains 5 %), a non-linear ADC (strong INL bow and DNL), a noise-dominated one (read noise 0.8 LSB), low supply
   (``default`` at 0.6 V), and the ``nvm-2bit`` crossbar; six seeds of the static design for the population. Each
   chip also gets a *short* characterization (16 conversions per column and level): the deploy-time step's data.
2. Digits, ``digits_mlp`` and ``digits_cnn``: ``float``, then ``quant`` (the ideal quantized model, the upper
   bound) per MacroSpec.
3. Per error model and network: ``naive`` (quant under the chip), ``naive + deploy step`` (each physical column's
   codes decoded by a table from the short characterization, the expected ideal level of each code, as
   ``cimlab bench --decode``; then each output column's gain and offset fitted on the chip against the exact MACs
   and the batch-norm statistics measured on the chip, as ``--calibrate``), ``D-NAT`` (fine-tuned from quant through the chip with the deploy step in the loop,
   evaluated with it), mean over ``--draws`` draws. ``recovery = (D-NAT - naive) / (quant - naive)``, ``null``
   where naive loses less than the evaluation's noise. What training can reach is bounded by the chip's errors:
   the *noise bound* is D-NAT through the chip's read noise alone (ideal mean, the measured per-level sigma), the
   *systematic bound* D-NAT through its systematic errors alone (each column's measured mean code per level, read
   exactly), both trained as long as D-NAT; ``recovery_vs_bound`` is against the lower of the two (neither where
   naive loses nothing).
4. One network for many chips: D-NAT through chips 1-4 (one chip per batch, each as deployed, its columns in a
   fresh random placement every epoch), evaluated on chips 5 and 6 with their own deploy step (compiled
   ``--place-on`` the chip's short characterization, then the decoder, per-output fit and batch norm), next to
   D-NAT trained on each of them (at training's columns and at the placed ones; the gap is to the better).
5. Input bounds where the lower one could matter: signed (standardised) digits, E-PACT vs PACT vs fixed clipping.
6. Step time: a D-NAT training step (per-column error model) / the quant model's step (a plain convolution /
   matmul), same model and batch, best of interleaved repeats; measured first, once the error models are
   characterized, before the process has trained anything (measured at the end of a 17-minute run instead, both
   steps once came out 40-80 % slower than in a fresh process, and their ratio 3.4 instead of 2.6).

Prints the table and, as the last line, one JSON object. Checkpoints and error models stay in ``--out``.

The CIM layers run their C kernels (``CIMLAB_KERNELS=torch`` times the torch path instead).

Usage: python scripts/reproduce_dnat.py [--out DIR] [--draws K] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _study import progress_log, study_folder

DEFAULT_TWIN = "sim://?profile=default"


@dataclass(frozen=True)
class ErrorCase:
    """One error model of the study: the twin that is characterized, and how it is read."""

    name: str
    description: str
    url: str
    vdd: str | None = None


CASES = (
    ErrorCase("static", "per-column offsets 0.5 LSB, gains 5 %", DEFAULT_TWIN + "&offset_sigma_lsb=0.5&gain_sigma=0.05"),
    ErrorCase("nonlinear", "ADC INL bow 1.5 LSB, DNL 0.35 LSB",
              DEFAULT_TWIN + "&adc_inl_bow_lsb=1.5&adc_dnl_sigma_lsb=0.35"),
    ErrorCase("noise", "read noise 0.8 LSB", DEFAULT_TWIN + "&noise_sigma_lsb=0.8"),
    ErrorCase("low-supply", "default at 0.6 V (gain -15 %, noise +50 %)", DEFAULT_TWIN, vdd="0.6"),
    ErrorCase("nvm", "nvm-2bit profile", "sim://?profile=nvm-2bit"),
)
POPULATION = ErrorCase("static", "", CASES[0].url)
SHORT_REPEATS = 16


@dataclass
class Plan:
    """Training lengths (epochs) and sizes of the study. D-NAT (and the bounds, trained as long) runs until it
    stops gaining, per model (side experiment, non-linear chip: the MLP 92.1 / 93.4 / 94.4 / 94.0 % after 8 / 24 /
    64 / 128 epochs, the CNN 85.7 / 90.4 / 90.6 % after 8 / 24 / 64)."""

    float_epochs: int = 20
    quant_epochs: int = 8
    dnat_epochs: dict[str, int] = field(default_factory=lambda: {"digits_mlp": 64, "digits_cnn": 24})
    repeats: int = 512
    calibration: int = 128
    limit: int | None = None
    models: tuple[str, ...] = ("digits_mlp", "digits_cnn")
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=lambda: {"digits_cnn": {"width": 8}})
    cases: tuple[ErrorCase, ...] = CASES
    train_chips: tuple[int, ...] = (1, 2, 3, 4)
    held_out: tuple[int, ...] = (5, 6)
    step_repeats: int = 5


def quick_plan() -> Plan:
    """A smoke-test plan for the test suite: every step once, on the MLP, tiny (figures not meaningful)."""
    return Plan(float_epochs=1, quant_epochs=1, dnat_epochs={"digits_mlp": 1}, repeats=8, calibration=32,
                limit=96, models=("digits_mlp",), cases=(CASES[2],), train_chips=(1,), held_out=(2,),
                step_repeats=1)


# ---- error models ----------------------------------------------------------------------------------------------
def characterize(url: str, out: Path, repeats: int, vdd: str | None = None, seed: int = 0) -> Path:
    """Run ``cimlab characterize`` on the twin at ``url``; returns the error model file (the last condition's).
    A folder that already holds a finished run (``--out`` of an earlier study) is read back."""
    done = out / "study-model.txt"
    if done.is_file():
        return Path(done.read_text().strip())
    cmd = [sys.executable, "-m", "cimlab.cli", "characterize", "--link", url, "--out", str(out),
           "--repeats", str(repeats), "--seed", str(seed), "--no-progress", "--json"]
    if vdd is not None:
        cmd += ["--vdd", vdd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if res.returncode != 0:
        raise SystemExit(f"characterization of {url} failed ({res.returncode}):\n{res.stderr or res.stdout}")
    model = Path(json.loads(res.stdout.strip().splitlines()[-1])["models"][-1])
    done.write_text(str(model))
    return model


@dataclass
class Chip:
    """A characterized twin: its error model and the short characterization its deploy step uses."""

    case: ErrorCase
    seed: int
    model_file: Path
    short_file: Path


def characterize_chip(case: ErrorCase, seed: int, out: Path, plan: Plan) -> Chip:
    """Both characterizations of one chip (the twin ``case`` with mismatch seed ``seed``)."""
    url = f"{case.url}&seed={seed}"
    folder = out / f"em-{case.name}-s{seed}"
    full = characterize(url, folder / "full", plan.repeats, case.vdd)
    short = characterize(url, folder / "short", min(SHORT_REPEATS, plan.repeats), case.vdd, seed=7)
    return Chip(case, seed, full, short)


def chip_transfer(chip: Chip) -> Any:
    """The chip as deployed: its per-column error model, each physical column's codes decoded by the table of
    its short characterization (``cimlab bench --decode``)."""
    from cimlab.training.transfer import ColumnDecoder, Transfer

    return Transfer.load(chip.model_file, pooled=False).decoded(ColumnDecoder.load(chip.short_file))


def raw_transfer(chip: Chip) -> Any:
    """The chip without any deploy step."""
    from cimlab.training.transfer import Transfer

    return Transfer.load(chip.model_file, pooled=False)


def systematic_only(transfer: Any) -> Any:
    """The chip's systematic errors alone: every conversion reads its column's measured mean code for its level,
    exactly (no noise, and not rounded to a code: more than the chip gives, so an upper estimate). None where the
    macro has more levels than codes."""
    import numpy as np

    from cimlab.training.transfer import ColumnDecoder, Transfer, TransferInfo

    spec = transfer.spec
    L, C, J = spec.n_levels, spec.n_codes, spec.physical_cols
    if L > C:
        return None
    probs = np.zeros((J, L, C))
    probs[:, np.arange(L), np.arange(L)] = 1.0  # level s reads "code" s, which the table below turns into its mean
    exact = Transfer(spec, "gaussian", False, probs, probs.astype(np.int64),
                     info=TransferInfo("gaussian", False, "systematic part of " + transfer.info.source))
    mean = np.broadcast_to(transfer.mean, (J, L))
    table = np.concatenate([mean, np.repeat(mean[:, -1:], C - L, axis=1)], axis=1)
    return exact.decoded(ColumnDecoder(table, "table", "the chip's mean code per column and level"))


def noise_only(transfer: Any) -> Any:
    """The chip's read noise alone: ideal mean code, the measured sigma per column and level (Gaussian)."""
    import numpy as np

    from cimlab.errmodel import MacErrorModel
    from cimlab.firmware_bridge.errmodel import ErrorModel
    from cimlab.training.transfer import Transfer

    model = ErrorModel.load(transfer.info.source)
    spec = model.spec
    sigma = np.nan_to_num(MacErrorModel(model).sigma())
    ideal = np.broadcast_to(spec.ideal_codes(np.arange(spec.n_levels)).astype(float), sigma.shape).copy()
    return Transfer.gaussian(spec, ideal, sigma, pooled=False)


# ---- networks --------------------------------------------------------------------------------------------------
class Study:
    """Shared state: data, plan, output folder, and the float and quant networks per model and MacroSpec."""

    def __init__(self, out: Path, plan: Plan, draws: int, seed: int, log: Any) -> None:
        from cimlab.training.tasks import load_task

        self.out = out
        self.plan = plan
        self.draws = draws
        self.seed = seed
        self.log = log
        self.data = load_task("digits", limit=plan.limit)
        self._quant: dict[tuple[str, str, str], Path] = {}
        self._float: dict[tuple[str, str], Path] = {}

    def cfg(self, epochs: int, lr: float = 1e-3) -> Any:
        from cimlab.training.loop import TrainConfig

        return TrainConfig(epochs=epochs, batch_size=64, lr=lr, seed=self.seed)

    def calibration(self) -> list[Any]:
        x = self.data.x_train[: self.plan.calibration]
        return [x[i : i + 128] for i in range(0, x.shape[0], 128)]

    def float_net(self, name: str, data: Any = None, tag: str = "") -> Path:
        from cimlab.training.api import prepare_model
        from cimlab.training.checkpoint import save_checkpoint
        from cimlab.training.loop import fit

        key = (name, tag)
        if key not in self._float:
            data = data or self.data
            model, info = prepare_model(data, "float", model_name=name,
                                        model_kwargs=self.plan.model_kwargs.get(name), seed=self.seed)
            fit(model, data, self.cfg(self.plan.float_epochs, 3e-3), evaluate_each_epoch=False)
            self._float[key] = save_checkpoint(self.out / f"{name}{tag}-float.ckpt", model,
                                               {"task": "digits", "model": info, "mode": "float"})
        return self._float[key]

    def quant_net(self, name: str, spec: Any, learn: str = "epact", data: Any = None, tag: str = "") -> Path:
        """The ideal quantized network (path of its checkpoint), trained once per model, MacroSpec and bounds."""
        from cimlab.training.api import prepare_model
        from cimlab.training.checkpoint import load_checkpoint, save_checkpoint
        from cimlab.training.loop import fit

        key = (name + tag, spec.describe(), learn)
        if key not in self._quant:
            data = data or self.data
            fck = load_checkpoint(self.float_net(name, data, tag))
            model, info = prepare_model(data, "quant", spec=spec, init=fck, learn=learn, seed=self.seed)
            fit(model, data, self.cfg(self.plan.quant_epochs), evaluate_each_epoch=False)
            path = self.out / f"{name}{tag}-quant-{learn}-{len(self._quant)}.ckpt"
            self._quant[key] = save_checkpoint(path, model, {"task": "digits", "model": info, "mode": "quant",
                                                             "spec": spec.to_dict(), "quantizer": learn})
        return self._quant[key]

    def accuracy(self, model: Any, transfer: Any, data: Any = None) -> float:
        """Mean test accuracy over the study's draws under ``transfer`` (a deep copy of ``model`` is used)."""
        from cimlab.training.layers import set_transfer
        from cimlab.training.loop import accuracy_draws

        data = data or self.data
        m = copy.deepcopy(model)
        set_transfer(m, transfer)
        return statistics.fmean(accuracy_draws(m, data.x_test, data.y_test, self.draws, seed=self.seed + 1000))

    def deployed(self, model: Any, transfer: Any) -> Any:
        """A copy of ``model`` on ``transfer`` with the per-output deploy step fitted there."""
        from cimlab.training.layers import calibrate_columns, clear_columns, set_transfer

        m = copy.deepcopy(model)
        clear_columns(m)
        set_transfer(m, transfer)
        calibrate_columns(m, self.calibration())
        return m

    def dnat(self, quant: Path, chips: list[Any], *, learn: str = "epact", data: Any = None,
             deploy_step: bool = True, shuffle: bool = False) -> tuple[Any, float]:
        """D-NAT from the quant checkpoint through ``chips`` (one per batch; ``shuffle``: each chip's columns in a
        fresh placement every epoch) for the plan's epochs of its model; (model, seconds)."""
        from cimlab.training.api import prepare_model
        from cimlab.training.checkpoint import load_checkpoint
        from cimlab.training.loop import fit

        data = data or self.data
        init = load_checkpoint(quant)
        model, _ = prepare_model(data, "dnat", spec=chips[0].spec, transfer=chips[0], init=init, learn=learn,
                                 seed=self.seed)
        t0 = time.perf_counter()
        fit(model, data, self.cfg(self.plan.dnat_epochs[init.manifest["model"]["name"]]), evaluate_each_epoch=False,
            population=chips, calibration=self.calibration() if deploy_step else (), shuffle_columns=shuffle)
        return model, time.perf_counter() - t0


def quant_model(path: Path) -> Any:
    from cimlab.training.api import model_from_checkpoint
    from cimlab.training.checkpoint import load_checkpoint

    return model_from_checkpoint(load_checkpoint(path))


def recovery(naive: float, dnat: float, top: float, floor: float) -> float | None:
    """``(dnat - naive) / (top - naive)``; None when the gap is within the evaluation's noise ``floor``."""
    return None if top - naive <= floor else (dnat - naive) / (top - naive)


# ---- 3. the error models ---------------------------------------------------------------------------------------
def run_case(study: Study, chip: Chip, name: str) -> dict[str, Any]:
    """naive, naive + deploy step, D-NAT and the bounds for one network on one chip."""
    from cimlab.training.transfer import Transfer

    raw, deployed_chip = raw_transfer(chip), chip_transfer(chip)
    spec = raw.spec
    qpath = study.quant_net(name, spec)
    qm = quant_model(qpath)
    quant = study.accuracy(qm, Transfer.ideal(spec))
    naive = study.accuracy(qm, raw)
    naive_deployed = study.accuracy(study.deployed(qm, deployed_chip), deployed_chip)
    model, seconds = study.dnat(qpath, [deployed_chip])
    dnat = study.accuracy(model, deployed_chip)
    floor = 2.0 / study.data.y_test.shape[0]
    entry: dict[str, Any] = {
        "error_model": chip.case.name, "description": chip.case.description, "model": name,
        "spec": spec.describe(), "quant": quant, "naive": naive, "naive_deployed": naive_deployed, "dnat": dnat,
        "loss_points": 100 * (quant - naive), "recovery": recovery(naive, dnat, quant, floor),
        "dnat_train_s": seconds, "bound": None, "recovery_vs_bound": None,
    }
    entry.update(bound_noise=None, bound_systematic=None)
    if entry["recovery"] is not None:  # bounds of a loss there is: none where naive loses nothing
        entry.update(bounds(study, qpath, raw))
        entry["recovery_vs_bound"] = recovery(naive, dnat, entry["bound"], floor)
    study.log(f"{chip.case.name}/{name}: quant {quant:.3f} naive {naive:.3f} naive+deploy {naive_deployed:.3f} "
              f"dnat {dnat:.3f} bound {entry['bound']} recovery {entry['recovery']}")
    return entry


def bounds(study: Study, qpath: Path, raw: Any) -> dict[str, float | None]:
    """What training can reach through each part of the chip's errors alone, each trained from quant as long as
    D-NAT and evaluated through the same part: its read noise (``noise_only``) and its systematic errors
    (``systematic_only``, with the deploy step); ``bound``: the lower of the two. Each is an upper estimate of what
    is reachable on the chip (each part alone is no harder than both together, and the systematic part reads exact
    means), so recovery against it is a lower estimate."""
    nz, sy = noise_only(raw), systematic_only(raw)
    noise_model, _ = study.dnat(qpath, [nz], deploy_step=False)
    out: dict[str, float | None] = {"bound_noise": study.accuracy(noise_model, nz), "bound_systematic": None}
    if sy is not None:
        sy_model, _ = study.dnat(qpath, [sy])
        out["bound_systematic"] = study.accuracy(sy_model, sy)
    out["bound"] = min(v for v in out.values() if v is not None)
    return out


# ---- 4. many chips ---------------------------------------------------------------------------------------------
def placed_on(study: Study, model: Any, qpath: Path, chip: Chip, transfer: Any, tag: str) -> Any:
    """``transfer`` as ``model``'s layers see it once compiled with ``cimlab compile --place-on`` the chip's short
    characterization (the busiest columns on the die's most accurate ones)."""
    from cimlab.deploy.compile import compile_checkpoint
    from cimlab.deploy.runner import placed_transfer
    from cimlab.training.checkpoint import load_checkpoint, save_checkpoint

    manifest = {**load_checkpoint(qpath).manifest, "mode": "dnat"}
    ckpt = save_checkpoint(study.out / f"{tag}.ckpt", model, {k: manifest[k] for k in
                                                               ("task", "model", "mode", "spec", "quantizer")})
    return placed_transfer(compile_checkpoint(ckpt, place_on=chip.short_file), transfer)


def run_population(study: Study, chips: dict[int, Chip], name: str) -> dict[str, Any]:
    """D-NAT through the training chips, evaluated on held-out chips with the deploy step (placement on the chip's
    best columns, decoder, per-output fit, batch norm), next to D-NAT trained on each held-out chip (at training's
    columns, and at the placed ones)."""
    transfers = {s: chip_transfer(c) for s, c in chips.items()}
    spec = transfers[study.plan.train_chips[0]].spec
    qpath = study.quant_net(name, spec)
    qm = quant_model(qpath)
    pop_model, seconds = study.dnat(qpath, [transfers[s] for s in study.plan.train_chips], shuffle=True)
    held: dict[str, Any] = {}
    for s in study.plan.held_out:
        t = transfers[s]
        placed = placed_on(study, pop_model, qpath, chips[s], t, f"{name}-population-chip{s}")
        own, _ = study.dnat(qpath, [t])
        own_placed, _ = study.dnat(qpath, [placed])
        held[f"chip{s}"] = {
            "naive": study.accuracy(qm, raw_transfer(chips[s])),
            "naive_deployed": study.accuracy(study.deployed(qm, t), t),
            "population_no_step": study.accuracy(pop_model, raw_transfer(chips[s])),
            "population_unplaced": study.accuracy(study.deployed(pop_model, t), t),
            "population_deployed": study.accuracy(study.deployed(pop_model, placed), placed),
            "chip_trained_unplaced": study.accuracy(study.deployed(own, t), t),
            "chip_trained_placed": study.accuracy(study.deployed(own_placed, placed), placed),
        }
        h = held[f"chip{s}"]
        h["chip_trained"] = max(h["chip_trained_unplaced"], h["chip_trained_placed"])
        h["gap_points"] = 100 * (h["chip_trained"] - h["population_deployed"])
        study.log(f"population/{name} chip {s}: {h}")
    worst = max(h["gap_points"] for h in held.values())
    return {"model": name, "train_chips": list(study.plan.train_chips), "held_out": held, "worst_gap_points": worst,
            "train_s": seconds}


# ---- 5. input bounds -------------------------------------------------------------------------------------------
def signed_digits(data: Any) -> Any:
    """Digits standardised with the training set's per-pixel mean and spread: inputs that go negative."""
    x = data.x_train.reshape(data.x_train.shape[0], -1)
    mean, std = x.mean(0), x.std(0) + 1e-3
    out = copy.copy(data)
    out.x_train = ((x - mean) / std).reshape(data.x_train.shape)
    out.x_test = ((data.x_test.reshape(data.x_test.shape[0], -1) - mean) / std).reshape(data.x_test.shape)
    return out


def run_bounds_ablation(study: Study, chip: Chip) -> dict[str, Any]:
    """E-PACT, PACT and fixed clipping on signed digits (MLP), quant and D-NAT on the chip (deploy step in)."""
    from cimlab.training.layers import cim_layers
    from cimlab.training.transfer import Transfer

    data = signed_digits(study.data)
    t = chip_transfer(chip)
    out = {}
    for learn in ("epact", "pact", "fixed"):
        qpath = study.quant_net("digits_mlp", t.spec, learn=learn, data=data, tag="-signed")
        qm = quant_model(qpath)
        model, _ = study.dnat(qpath, [t], learn=learn, data=data)
        lo = [layer.act.lo.item() for _, layer in cim_layers(model)]
        out[learn] = {"quant": study.accuracy(qm, Transfer.ideal(t.spec), data),
                      "naive": study.accuracy(qm, raw_transfer(chip), data), "dnat": study.accuracy(model, t, data),
                      "lower_bounds": lo}
        study.log(f"bounds {learn}: {out[learn]}")
    return out


# ---- 6. step time ----------------------------------------------------------------------------------------------
def step_times(study: Study, chip: Chip, name: str) -> dict[str, Any]:
    """Median-of-steps, best-of-``repeats`` training step of the quant model (exact shortcut: a plain convolution
    or matmul) and of D-NAT through the chip, same model and batch, interleaved."""
    from cimlab.training.layers import cim_layers, set_transfer
    from cimlab.training.loop import time_steps
    from cimlab.training.transfer import Transfer

    t = raw_transfer(chip)
    model = quant_model(study.quant_net(name, t.spec))
    xb, yb = study.data.x_train[:64], study.data.y_train[:64]
    paths = {"quant": Transfer.ideal(t.spec), "dnat": t}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(study.plan.step_repeats):
        for key, tr in paths.items():
            set_transfer(model, tr)
            times[key].append(time_steps(model, xb, yb, steps=5))
    best = {k: min(v) for k, v in times.items()}
    backend = next(layer for _, layer in cim_layers(model)).macro.stats.backend  # of the last (D-NAT) step
    study.log(f"step time {name}: {best} (D-NAT layers on {backend})")
    return {"model": name, "batch": 64, "quant_step_s": best["quant"], "dnat_step_s": best["dnat"],
            "step_ratio": best["dnat"] / best["quant"], "dnat_backend": backend}


# ---- report ----------------------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def print_table(results: dict[str, Any]) -> None:
    """The study's tables (rich), on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t = Table(title=f"D-NAT on the twin, digits; accuracy % (mean of {results['draws']} draws)")
    for col in ("error model", "model", "quant", "naive", "naive + deploy step", "D-NAT", "recovery",
                "noise bound", "systematic bound", "recovery vs the lower bound"):
        t.add_column(col)
    for e in results["cases"]:
        t.add_row(f"{e['error_model']} ({e['description']})", e["model"], _pct(e["quant"]), _pct(e["naive"]),
                  _pct(e["naive_deployed"]), _pct(e["dnat"]), _ratio(e["recovery"]), _pct(e["bound_noise"]),
                  _pct(e["bound_systematic"]), _ratio(e["recovery_vs_bound"]))
    console.print(t)
    p = Table(title="one network for many chips (static design; trained on chips 1-4); step = decoder, per-output "
                    "fit, batch norm on the chip; placed = compiled --place-on the chip's short characterization")
    for col in ("model", "chip", "naive", "naive + step", "population, no step", "population + step",
                "population + step, placed", "trained on this chip", "trained on this chip, placed",
                "gap (points)"):
        p.add_column(col)
    for pop in results["population"]:
        for chip, h in pop["held_out"].items():
            p.add_row(pop["model"], chip, _pct(h["naive"]), _pct(h["naive_deployed"]), _pct(h["population_no_step"]),
                      _pct(h["population_unplaced"]), _pct(h["population_deployed"]),
                      _pct(h["chip_trained_unplaced"]), _pct(h["chip_trained_placed"]), f"{h['gap_points']:.1f}")
    console.print(p)
    b = Table(title="input bounds on signed digits (digits_mlp, static chip, deploy step in)")
    for col in ("bounds", "quant", "naive", "D-NAT", "learned lower bounds"):
        b.add_column(col)
    for learn, e in results["bounds"].items():
        b.add_row(learn, _pct(e["quant"]), _pct(e["naive"]), _pct(e["dnat"]),
                  ", ".join(f"{v:.2f}" for v in e["lower_bounds"]))
    console.print(b)
    for s in results["step_time"]:
        console.print(f"training step, {s['model']}, batch {s['batch']}: quant (plain conv/matmul) "
                      f"{1e3 * s['quant_step_s']:.1f} ms, D-NAT {1e3 * s['dnat_step_s']:.1f} ms, "
                      f"ratio {s['step_ratio']:.1f} (D-NAT layers: {s['dnat_backend']})", highlight=False)
    console.print(f"total {results['seconds']:.0f} s; checkpoints and error models in {results['out']}",
                  highlight=False)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON line's figures."""
    steps = {s["model"]: s for s in results["step_time"]}
    return {
        "recovery": {f"{e['error_model']}/{e['model']}": e["recovery"] for e in results["cases"]},
        "bound": {f"{e['error_model']}/{e['model']}": e["bound"] for e in results["cases"]},
        "bound_noise": {f"{e['error_model']}/{e['model']}": e["bound_noise"] for e in results["cases"]},
        "bound_systematic": {f"{e['error_model']}/{e['model']}": e["bound_systematic"] for e in results["cases"]},
        "recovery_vs_bound": {f"{e['error_model']}/{e['model']}": e["recovery_vs_bound"] for e in results["cases"]},
        "held_out_gap_points": {p["model"]: p["worst_gap_points"] for p in results["population"]},
        "step_ratio": steps.get("digits_cnn", next(iter(steps.values())))["step_ratio"],
        "step_ratio_mlp": steps["digits_mlp"]["step_ratio"] if "digits_mlp" in steps else None,
        "step_ratio_denominator": "the quant model's training step (plain convolution / matmul), same batch",
        "seconds": results["seconds"],
    }


# ---- main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for error models and checkpoints (default: a temp folder)")
    ap.add_argument("--draws", type=int, default=3, help="draws of each error model per evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (more only on an idle machine: OpenMP's barriers spin, and a core "
                         "shared with another process stalls every parallel region)")
    ap.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; figures not meaningful)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = study_folder(args.out, "cimlab-dnat-")
    log = progress_log(t_start)

    plan = quick_plan() if args.quick else Plan()
    draws = 1 if args.quick else args.draws
    study = Study(out, plan, draws, args.seed, log)
    chips = {c.name: characterize_chip(c, 1, out, plan) for c in plan.cases}
    population = {s: characterize_chip(POPULATION, s, out, plan) for s in (*plan.train_chips, *plan.held_out)}
    log("error models characterized")
    results: dict[str, Any] = {"draws": draws, "seed": args.seed, "out": str(out), "quick": args.quick}
    results["step_time"] = [step_times(study, population[plan.train_chips[0]], name) for name in plan.models]
    results["cases"] = [run_case(study, chips[c.name], name) for c in plan.cases for name in plan.models]
    results["population"] = [run_population(study, population, name) for name in plan.models]
    results["bounds"] = run_bounds_ablation(study, population[plan.train_chips[0]])
    results["seconds"] = time.perf_counter() - t_start
    results["summary"] = summary(results)
    print_table(results)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

"""Training and evaluation loops (float, quant and dnat share them; the model decides what runs).

Deterministic given the seed: batches are drawn from a ``torch.Generator`` seeded with it, and the CIM layers'
random streams are reseeded from it (``layers.reseed``) before training and before each evaluation draw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.training.device import model_device
from cimlab.training.layers import (
    calibrate_columns,
    cim_layers,
    project_polarity,
    reseed,
    set_columns,
    set_transfer,
)
from cimlab.training.macro import ColumnCorrection
from cimlab.training.tasks import TaskData
from cimlab.training.transfer import Transfer

if TYPE_CHECKING:
    from cimlab.training.distributed import Replicas
    from cimlab.training.resume import EpochCheckpoint

OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step.
        lr: peak learning rate (cosine decay to 0 over all steps).
        weight_decay: L2 on weights (not on batch-norm parameters or the E-PACT bounds).
        optimizer: ``adam`` or ``sgd`` (momentum 0.9, Nesterov).
        seed: seeds batch order, augmentation and the CIM layers' random streams.
        max_steps: stop after this many steps in all (None: every epoch to the end).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    seed: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall time, s.
        step_time_s: mean time of one training step (forward, backward, update), s.
        history: one dict per epoch (loss, train accuracy, test accuracy).
    """

    steps: int = 0
    seconds: float = 0.0
    step_time_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 and weight_decay else plain).append(p)
        del name
    groups = [{"params": plain, "weight_decay": 0.0}]
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


def _check_data(model: nn.Module, data: TaskData) -> None:
    if data.x_train.shape[0] != data.y_train.shape[0] or data.x_test.shape[0] != data.y_test.shape[0]:
        raise ShapeError("inputs and labels have different numbers of samples")
    if data.x_train.shape[0] == 0:
        raise ShapeError("no training samples")


@contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Any]:
    """A rich progress bar on stderr (a no-op when disabled); yields ``advance(n, **fields)``."""
    if not enabled:
        yield lambda n=1, **kw: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: Any) -> None:
            info = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            prog.update(task, advance=n, info=info)

        yield advance


def fit(model: nn.Module, data: TaskData, cfg: TrainConfig, *, progress: bool = False,
        evaluate_each_epoch: bool = True, description: str = "train",
        population: Sequence[Transfer] = (), calibration: Sequence[torch.Tensor] = (),
        shuffle_columns: bool = False, checkpoint: EpochCheckpoint | None = None, replicas: Replicas | None = None) -> TrainResult:
    """Train ``model`` on ``data`` with cross entropy (see ``TrainConfig``); returns what happened.

    ``population``: error models of several chips of one design; each step draws one of them (uniformly, from
    the seeded generator) and runs the whole batch through it, so the network learns what the chips share rather
    than one chip's columns. The model keeps the last one drawn; evaluate with the transfer you mean.

    ``calibration``: input batches (no labels) for the deploy-time step. When given, training sees every chip as
    it will be deployed: at the start of each epoch each chip's per-column corrections are fitted for the current
    weights (``layers.calibrate_columns``; the model's own transfer when there is no population) and applied to
    the steps through that chip. Afterwards the model holds the corrections of the last chip it used. (Batch norm
    trains on batch statistics, so its running statistics are left to the deploy step, which measures them on
    the chip.)

    ``shuffle_columns``: at the start of each epoch every chip of the population gets a fresh random placement of
    its physical columns (``Transfer.permuted``, from the seeded generator). A few measured dies then stand for
    the design's spread of columns rather than for themselves: without it a network learns where its training
    chips' bad columns sit, which a chip it never saw does not share.

    With ``checkpoint``, the whole training state is restored first (``--resume``) and saved at the start of every
    epoch, so an interrupted run continues bit-identically from the epoch it was in.

    ``replicas``: this process's rank and device in a distributed (or GPU) run (``cimlab.training.distributed``):
    the model moves to its device, each rank trains on its share of every global batch through
    DistributedDataParallel, its CIM streams restart every epoch from (seed, rank, epoch), epoch statistics and
    test accuracy are over the whole global batch and test set, and only rank 0 saves the training state. A global
    batch smaller than the number of ranks is skipped. None: one process on the CPU, as above.
    """
    _check_data(model, data)
    population = list(population)
    if any(t.spec != population[0].spec for t in population):
        raise ConfigError("the population's error models are for different MacroSpecs")
    net = model if replicas is None else replicas.prepare(model)
    if replicas is not None:
        calibration = [c.to(replicas.device) for c in calibration]
    reseed(model, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = data.x_train.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    if shuffle_columns and not population:
        raise ConfigError("shuffle_columns needs a population of chips")
    result = TrainResult()
    start_epoch = 0
    if checkpoint is not None:
        start_epoch, result.steps, result.history = checkpoint.restore(model, opt, sched, gen)
    t_start = time.perf_counter()
    step_time = 0.0
    with progress_bar(progress, total, description) as advance:
        advance(result.steps)
        for epoch in range(start_epoch, cfg.epochs):
            if result.steps >= total:
                break
            if checkpoint is not None and (replicas is None or replicas.is_writer):
                checkpoint.save(model, opt, sched, gen, epoch=epoch, steps=result.steps, history=result.history)
            if replicas is not None:
                replicas.reseed(model, cfg.seed, epoch)
            chips = _placements(population, gen) if shuffle_columns else population
            corrections = _chip_corrections(model, chips or [None], calibration) if calibration else None
            if replicas is not None and corrections is not None:
                corrections = replicas.broadcast_corrections(corrections)
            model.train()
            order = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for b0 in range(0, n, cfg.batch_size):
                if result.steps >= total:
                    break
                idx = order[b0 : b0 + cfg.batch_size]
                if idx.numel() < 2 and n >= 2 or replicas is not None and idx.numel() < replicas.min_batch():
                    continue  # batch norm needs two samples (and every rank one)
                xb, yb = data.x_train[idx], data.y_train[idx]
                if data.augment is not None:
                    xb = data.augment(xb, gen)
                if chips:
                    chip = int(torch.randint(len(chips), (1,), generator=gen))
                    set_transfer(model, chips[chip])
                    if corrections is not None:
                        set_columns(model, corrections[chip])
                weight = 1.0
                if replicas is not None:
                    xb, yb, weight = replicas.local_batch(xb, yb)
                t0 = time.perf_counter()
                out = net(xb)
                loss = F.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()
                opt.step()
                project_polarity(model)  # unipolar layers keep their sign (projected gradient descent)
                sched.step()
                step_time += time.perf_counter() - t0
                result.steps += 1
                loss_value = float(loss.detach())
                loss_sum += loss_value * yb.shape[0]
                correct += int((out.argmax(1) == yb).sum())
                seen += yb.shape[0]
                advance(1, epoch=epoch + 1, loss=loss_value)
            if replicas is not None:
                loss_sum, correct, seen = replicas.sum([loss_sum, correct, seen])
            entry = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
            if evaluate_each_epoch:
                entry["test_accuracy"] = (accuracy(model, data.x_test, data.y_test, seed=cfg.seed) if replicas is None
                                          else replicas.accuracy(model, data.x_test, data.y_test, seed=cfg.seed))
            result.history.append(entry)
    result.seconds = time.perf_counter() - t_start
    result.step_time_s = step_time / max(result.steps, 1)
    model.eval()
    return result


def _placements(population: list[Transfer], gen: torch.Generator) -> list[Transfer]:
    """Each chip of the population with its physical columns in a random order drawn from ``gen``."""
    return [t.permuted(torch.randperm(t.spec.physical_cols, generator=gen).numpy()) for t in population]


def _chip_corrections(model: nn.Module, chips: list[Transfer | None],
                      calibration: Sequence[torch.Tensor]) -> list[dict[str, ColumnCorrection]]:
    """Each chip's per-column corrections for the current weights (``None``: the model's transfer as it is)."""
    out = []
    for chip in chips:
        if chip is not None:
            set_transfer(model, chip)
        out.append(calibrate_columns(model, calibration, batch_norm=False))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256, seed: int = 0) -> float:
    """Top-1 accuracy (0..1) of ``model`` in eval mode on its device, the CIM random streams seeded from ``seed``
    (the streams in use before are put back afterwards, so an evaluation between epochs does not replay training's
    draws)."""
    if x.shape[0] != y.shape[0]:
        raise ShapeError(f"{x.shape[0]} inputs for {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ShapeError("no samples to evaluate")
    was = model.training
    saved = [(layer.macro, layer.macro.rng) for _, layer in cim_layers(model)]
    device = model_device(model)
    model.eval()
    reseed(model, seed)
    correct = 0
    try:
        for b0 in range(0, x.shape[0], batch_size):
            out = model(x[b0 : b0 + batch_size].to(device))
            correct += int((out.argmax(1).cpu() == y[b0 : b0 + batch_size]).sum())
    finally:
        model.train(was)
        for macro, rng in saved:
            macro.rng = rng
    return correct / x.shape[0]


def accuracy_draws(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int, *, seed: int = 0,
                   batch_size: int = 256) -> list[float]:
    """Accuracies over ``draws`` independent draws of the sampled codes (draw ``i`` seeded ``seed + i``)."""
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    return [accuracy(model, x, y, batch_size=batch_size, seed=seed + i) for i in range(draws)]


def time_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, *, warmup: int = 1) -> float:
    """Median wall time of one training step (forward, backward, SGD update) on the batch (x, y), s.

    The model's parameters are restored afterwards (the updates are undone), so timing does not train it.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()
    times = []
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        model.load_state_dict(saved)
        model.eval()
    return sorted(times)[len(times) // 2]


__all__ = ["OPTIMIZERS", "TrainConfig", "TrainResult", "accuracy", "accuracy_draws", "fit", "progress_bar",
           "time_steps"]

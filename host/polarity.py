"""Weight polarity per layer for unipolar crossbars, and the search that picks it (imports torch).

A layer whose weights are all >= 0 (``unipolar-pos``) or all <= 0 (``unipolar-neg``) fits one array of a unipolar
crossbar; a ``bipolar`` layer needs a pair of columns (or arrays) per output (``cimlab.deploy.schedule``). Training
under a polarity is projected gradient descent: after every optimizer step the layer's weights are clipped to their
sign (``project``), so a unipolar layer never holds a weight of the wrong sign once trained.

The search (``search_polarity``) is an **evolutionary** search over the per-layer assignments, not a differentiable
relaxation or the paper's NAS: the space is small (3 choices per layer), each candidate is judged by what matters
after deployment (accuracy when trained under that constraint, and the crossbar cost it implies), and candidates are
independent short fine-tunes that need nothing from the training internals, so it runs on digits in a few minutes
on two cores. A (1 + lambda) scheme: start from every layer ``bipolar`` and from the sign each layer's weights
mostly have; each generation mutates the best assignment (each layer changed with probability ``1 / layers``) and
keeps the fittest. Fitness = validation accuracy (a held-out fifth of the training set, never the test set) after a
short projected fine-tune from the starting weights, minus ``cost_weight`` times the relative crossbar columns
(bipolar 2 per output, unipolar 1, weighted by each layer's weights; all-bipolar = 1).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.mapping import POLARITIES


def weighted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The layers a crossbar holds (``Linear``, ``Conv1d``, ``Conv2d``, or CIM layers), by qualified name."""
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.ndim >= 2:
            yield name, m


def check_assignment(model: nn.Module, assignment: dict[str, str]) -> None:
    """ConfigError for an unknown layer or polarity."""
    names = {n for n, _ in weighted_layers(model)}
    for name, pol in assignment.items():
        if name not in names:
            raise ConfigError(f"polarity for layer {name!r}, which the model does not have ({', '.join(sorted(names))})")
        if pol not in POLARITIES:
            raise ConfigError(f"polarity {pol!r} of layer {name!r} is not one of {', '.join(POLARITIES)}")


@torch.no_grad()
def project(model: nn.Module, assignment: dict[str, str]) -> None:
    """Clip each unipolar layer's weights to its sign, in place."""
    for name, m in weighted_layers(model):
        pol = assignment.get(name, "bipolar")
        if pol == "unipolar-pos":
            m.weight.clamp_(min=0.0)
        elif pol == "unipolar-neg":
            m.weight.clamp_(max=0.0)


def column_cost(model: nn.Module, assignment: dict[str, str]) -> float:
    """Crossbar columns the assignment needs relative to all-bipolar, weighted by each layer's weights (0.5..1)."""
    total = used = 0.0
    for name, m in weighted_layers(model):
        n = float(m.weight.numel())
        total += 2 * n
        used += (2 if assignment.get(name, "bipolar") == "bipolar" else 1) * n
    return used / total if total else 1.0


def majority_sign(model: nn.Module) -> dict[str, str]:
    """Each layer's polarity as the sign most of its weight mass has."""
    out = {}
    for name, m in weighted_layers(model):
        w = m.weight.detach()
        out[name] = "unipolar-pos" if float(w.clamp(min=0).sum()) >= float((-w).clamp(min=0).sum()) else "unipolar-neg"
    return out


def train_projected(model: nn.Module, x: torch.Tensor, y: torch.Tensor, assignment: dict[str, str], *,
                    steps: int, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> None:
    """``steps`` Adam steps of cross entropy on (x, y), projecting to the assignment before and after each."""
    check_assignment(model, assignment)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    project(model, assignment)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        project(model, assignment)
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@dataclass
class SearchResult:
    """What the search found.

    Attributes:
        assignment: layer name -> polarity of the fittest candidate.
        accuracy: its validation accuracy after the fine-tune (0..1).
        cost: its relative crossbar columns (``column_cost``).
        fitness: ``accuracy - cost_weight * cost``.
        evaluations: candidates trained and judged.
        seconds: wall time.
        history: one dict per evaluation (assignment, accuracy, cost, fitness).
        state: the fittest candidate's fine-tuned float weights (its ``state_dict``), where training under the
            assignment continues from.
    """

    assignment: dict[str, str]
    accuracy: float
    cost: float
    fitness: float
    evaluations: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly figures (no weights)."""
        return {"method": "evolutionary (1 + lambda)", "assignment": dict(self.assignment),
                "validation_accuracy": self.accuracy, "relative_columns": self.cost, "fitness": self.fitness,
                "evaluations": self.evaluations, "seconds": self.seconds}


def search_polarity(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, generations: int = 6,
                    offspring: int = 3, steps: int = 60, cost_weight: float = 0.05, seed: int = 0) -> SearchResult:
    """The evolutionary polarity search (see the module docstring); ``model`` (e.g. a float checkpoint's) is left
    as it was. Runs ``2 + generations * offspring`` short fine-tunes of ``steps`` steps."""
    if generations < 0 or offspring < 1 or steps < 1:
        raise ConfigError("the search needs generations >= 0, offspring >= 1 and steps >= 1")
    names = [n for n, _ in weighted_layers(model)]
    if not names:
        raise ConfigError("the model has no layer a crossbar would hold")
    n = x_train.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, n // 5)
    val, fit_idx = order[:cut], order[cut:]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    seen: dict[tuple[str, ...], dict[str, Any]] = {}
    states: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def judge(assignment: dict[str, str]) -> dict[str, Any]:
        key = tuple(assignment[k] for k in names)
        if key in seen:
            return seen[key]
        cand = copy.deepcopy(model)
        train_projected(cand, x_train[fit_idx], y_train[fit_idx], assignment, steps=steps, seed=seed)
        acc = _accuracy(cand, x_train[val], y_train[val])
        cost = column_cost(cand, assignment)
        entry = {"assignment": dict(assignment), "accuracy": acc, "cost": cost, "fitness": acc - cost_weight * cost}
        seen[key] = entry
        history.append(entry)
        states[key] = {k: v.detach().clone() for k, v in cand.state_dict().items()}
        return entry

    best = max((judge(dict.fromkeys(names, "bipolar")), judge(majority_sign(model))), key=lambda e: e["fitness"])
    for _ in range(generations):
        for _ in range(offspring):
            child = dict(best["assignment"])
            flips = rng.random(len(names)) < 1.0 / len(names)
            if not flips.any():
                flips[rng.integers(len(names))] = True
            for i in np.nonzero(flips)[0]:
                child[names[i]] = str(rng.choice([p for p in POLARITIES if p != child[names[i]]]))
            entry = judge(child)
            if entry["fitness"] > best["fitness"]:
                best = entry
    best_key = tuple(best["assignment"][k] for k in names)
    return SearchResult(best["assignment"], best["accuracy"], best["cost"], best["fitness"], len(history),
                        time.perf_counter() - t0, history, states[best_key])


def paired_layers(assignment: dict[str, str]) -> set[str]:
    """The layers compile must store on column pairs of a unipolar macro: the bipolar ones."""
    return {name for name, pol in assignment.items() if pol == "bipolar"}


__all__ = ["POLARITIES", "SearchResult", "check_assignment", "column_cost", "majority_sign", "paired_layers",
           "project", "search_polarity", "train_projected", "weighted_layers"]

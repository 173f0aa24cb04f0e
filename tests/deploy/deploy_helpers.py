"""Shared pieces of the deploy tests: small checkpoints, packages and error models, built fast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cimlab.chip_sim import load_profile
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.deploy.compile import compile_checkpoint
from cimlab.deploy.package import DeployPackage
from cimlab.training.api import prepare_model
from cimlab.training.checkpoint import save_checkpoint
from cimlab.training.loop import TrainConfig, fit
from cimlab.training.tasks import TaskData, load_task

DEFAULT_SPEC = load_profile("default").spec


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread inside the block: on a shared 2-core machine, two OpenMP threads competing with other
    processes slow small tensor operations down a hundredfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def digits(limit: int | None = None) -> TaskData:
    """scikit-learn's digits (bundled, offline)."""
    return load_task("digits", limit=limit)


def make_checkpoint(path: Path, *, model: str = "digits_mlp", spec: MacroSpec = DEFAULT_SPEC, steps: int = 0,
                    mode: str = "quant", seed: int = 0) -> Path:
    """A quant checkpoint of ``model`` for ``spec``: calibrated, trained for ``steps`` steps (0: untrained)."""
    with one_torch_thread():
        return _make_checkpoint(path, model, spec, steps, mode, seed)


def _make_checkpoint(path: Path, model: str, spec: MacroSpec, steps: int, mode: str, seed: int) -> Path:
    data = digits()
    net, info = prepare_model(data, mode, model_name=model, spec=spec, seed=seed)
    if steps:
        fit(net, data, TrainConfig(epochs=100, max_steps=steps, seed=seed), evaluate_each_epoch=False)
    net.eval()
    return save_checkpoint(path, net, {"task": "digits", "model": info, "mode": mode, "spec": spec.to_dict(),
                                       "quantizer": "epact"})


def make_package(ckpt: Path, out: Path, *, spec: MacroSpec = DEFAULT_SPEC, pack: str = "rows") -> DeployPackage:
    """Compile and save; return the package as loaded back."""
    compile_checkpoint(ckpt, spec=spec, spec_source="test", pack=pack).save(out)
    return DeployPackage.load(out)


def harsh_error_model(path: Path, spec: MacroSpec = DEFAULT_SPEC) -> Path:
    """A synthetic error model with large errors: half of the codes off by one or two, and every seventh physical
    column reading one code high on top (per-column structure)."""
    J, L, C = spec.physical_cols, spec.n_levels, spec.n_codes
    ideal = spec.ideal_codes(np.arange(L))
    counts = np.zeros((J, L, C), dtype=np.int64)
    for j in range(J):
        bias = 1 if j % 7 == 0 else 0
        for s in range(L):
            for dc, n in ((-2, 50), (-1, 200), (0, 500), (1, 200), (2, 50)):
                code = int(np.clip(ideal[s] + bias + dc, 0, spec.adc_max))
                counts[j, s, code] += n
    ErrorModel(spec, counts, chip_id="synthetic", provenance={"made_by": "tests/deploy"}).save(path)
    return path

"""Training that survives interruption: the whole training state, written atomically at the start of every epoch.

``EpochCheckpoint(path, identity)`` is what ``loop.fit`` calls: ``restore`` puts a saved state back (or does nothing
for a fresh run), ``save`` writes the state at the start of an epoch. The file is one safetensors file (no pickle)::

    tensors   model.<name>       the model's state dict
              optim.<i>.<key>    the optimizer's per-parameter tensors (Adam's moments, SGD's momentum)
              rng.batches        the batch order generator's state (torch.Generator.get_state())
              rng.torch          torch's global generator state
    metadata  cimlab.resume      JSON: format, epoch (epochs done), steps, history, the optimizer's param groups and
                                 scalar state, the scheduler's state, every CIM layer's random stream state, identity
              cimlab.resume_sha256   SHA-256 of that JSON

``identity`` (task, mode, model, training options, data limits, the error model's hash ...) must match on resume, so
a resume continues the same run; restored, the run continues bit-identically where the saved epoch started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.firmware_bridge.files import atomic_path, check_manifest_hash, text_sha256
from cimlab.training.layers import cim_layers
from cimlab.training.transfer import set_stream_state, stream_state

FORMAT = "cimlab.resume"
VERSION = 1
META_KEY = "cimlab.resume"
HASH_KEY = "cimlab.resume_sha256"


def resume_path(out: str | os.PathLike) -> Path:
    """Where the training state of a run that writes checkpoint ``out`` lives: ``OUT.resume``."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def _optimizer_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entries)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class EpochCheckpoint:
    """The training state of one run, saved at every epoch start and restored with ``--resume``.

    Args:
        path: the state file (``resume_path(out)``).
        identity: what makes this run this run (JSON-able); a saved state of another run is refused.
        resume: restore the saved state (it must exist); False starts afresh (an old state is replaced).
    """

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any], *, resume: bool) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity))
        self.resume = resume
        self.saved_epoch: int | None = None
        if resume and not self.path.is_file():
            raise ConfigError(f"--resume: no saved training state at {str(self.path)!r} (nothing to resume; run "
                              "without --resume)")

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator, *, epoch: int,
             steps: int, history: list[dict[str, float]]) -> None:
        """Write the state at the start of epoch ``epoch`` (epochs done), atomically."""
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
        opt_tensors, opt_meta = _optimizer_parts(opt)
        tensors.update(opt_tensors)
        tensors["rng.batches"] = gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "format": FORMAT, "version": VERSION, "identity": self.identity, "epoch": epoch, "steps": steps,
            "history": history, "optimizer": opt_meta, "scheduler": _jsonable(sched.state_dict()),
            "cim_rngs": [stream_state(layer.macro.rng) for _, layer in cim_layers(model)],
        }
        text = json.dumps(meta, sort_keys=True)
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: text, HASH_KEY: text_sha256(text)})
        self.saved_epoch = epoch

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                gen: torch.Generator) -> tuple[int, int, list[dict[str, float]]]:
        """Put the saved state back; (epochs done, steps, history). A fresh run: (0, 0, [])."""
        if not self.resume:
            return 0, 0, []
        tensors, meta = self._read()
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
            _restore_optimizer(opt, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
            sched.load_state_dict(meta["scheduler"])
            gen.set_state(tensors["rng.batches"])
            torch.set_rng_state(tensors["rng.torch"])
            layers = list(cim_layers(model))
            if len(layers) != len(meta["cim_rngs"]):
                raise ValueError(f"{len(meta['cim_rngs'])} CIM layer streams saved, the model has {len(layers)}")
            for (_, layer), state in zip(layers, meta["cim_rngs"], strict=True):
                set_stream_state(layer.macro.rng, state)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
            raise ArtifactError(f"training state {str(self.path)!r} does not fit this model: {err}") from err
        self.saved_epoch = int(meta["epoch"])
        return int(meta["epoch"]), int(meta["steps"]), list(meta["history"])

    def _read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors import safe_open

        where = f"training state {str(self.path)!r}"
        try:
            with safe_open(str(self.path), framework="pt") as f:
                raw = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as err:  # safetensors raises its own error types for bad files
            raise ArtifactError(f"{where}: not a readable safetensors file: {err}") from err
        if META_KEY not in raw:
            raise ArtifactError(f"{where}: no {META_KEY} metadata (not a cimlab training state)")
        check_manifest_hash(where, raw[META_KEY], raw.get(HASH_KEY), HASH_KEY)
        meta = json.loads(raw[META_KEY])
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ArtifactError(f"{where}: not a {FORMAT} v{VERSION} file")
        if meta.get("identity") != self.identity:
            diff = _differences(meta.get("identity") or {}, self.identity)
            raise ConfigError(f"--resume: {where} is of another run ({diff}); give the same options, or start "
                              "afresh without --resume")
        return tensors, meta

    def finish(self) -> None:
        """The run is complete (its checkpoint written): the state is no longer needed."""
        self.path.unlink(missing_ok=True)


def _jsonable(value: Any) -> Any:
    """A scheduler state as JSON (its lambdas are not data: they are rebuilt by the code, stored as null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return None


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(now))
    parts = [f"{k}: saved {saved.get(k)!r} vs now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    return "; ".join(parts[:4]) or "no field differs"


__all__ = ["EpochCheckpoint", "resume_path"]

"""Checkpoints: one safetensors file (no pickle) whose metadata holds a JSON manifest.

Tensors: the model's ``state_dict`` (weights, batch-norm statistics, the E-PACT bounds ``*.act.lo`` and
``*.act.hi``).
Manifest (metadata key ``cimlab.manifest``, a JSON object)::

    {"format": "cimlab.checkpoint", "version": 1,
     "task": "digits", "model": {"name": "digits_cnn", "kwargs": {...}},
     "mode": "float" | "quant" | "dnat",
     "spec": {MacroSpec fields} | null,             null for a float model
     "quantizer": "epact" | "pact" | "fixed" | null,
     "quant": "per-layer" | "uniform" | null,       ranges per layer or shared by every layer (null: float)
     "polarity": {layer: "bipolar" | "unipolar-pos" | "unipolar-neg"} | null,
     "error_model": {"sha256": ..., "source": ..., "pooled": bool, "kind": ..., "chip_id": ...} | null,
     "tensors_sha256": "...",                        over names, dtypes, shapes and bytes, sorted by name
     "train": {...}, "metrics": {...}, "created_by": "cimlab X.Y"}

The metadata key ``cimlab.manifest_sha256`` holds the SHA-256 of the manifest text: the manifest is covered by its
hash, and the manifest holds the tensors' hash.

``load_checkpoint`` checks the file's size, the manifest's hash, format and field types, the tensor hash (a corrupt
file is refused) and, when given one, the MacroSpec the caller runs on (a checkpoint for another macro is refused,
naming the differing fields). Every problem is an ``ArtifactError`` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.firmware_bridge.files import (
    atomic_path,
    check_manifest_hash,
    package_version,
    require_types,
    text_sha256,
)
from cimlab.firmware_bridge.spec import MacroSpec

FORMAT = "cimlab.checkpoint"
VERSION = 2
MANIFEST_KEY = "cimlab.manifest"
MANIFEST_HASH_KEY = "cimlab.manifest_sha256"
MODES = ("float", "quant", "dnat")
MAX_CHECKPOINT_BYTES = 1 << 32
"""Largest checkpoint file read, bytes."""
MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "task": str, "model": dict, "mode": str, "tensors_sha256": str,
}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        tensors: the state dict.
        manifest: the manifest (see the module docstring).
        path: where it was read from.
    """

    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    path: Path

    @property
    def spec(self) -> MacroSpec | None:
        """The macro it was trained for (None for a float model)."""
        spec = self.manifest.get("spec")
        return None if spec is None else MacroSpec.from_dict(spec)

    @property
    def mode(self) -> str:
        """``float``, ``quant`` or ``dnat``."""
        return str(self.manifest["mode"])

    @property
    def task(self) -> str:
        """The task name."""
        return str(self.manifest["task"])


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, manifest: dict[str, Any]) -> Path:
    """Write the model's state dict and ``manifest`` (fields of the module docstring; format, version, tensor hash,
    creator, and the CIM layers' ranges and polarities are filled in) atomically; returns the path."""
    for key in ("task", "model", "mode"):
        if key not in manifest:
            raise ConfigError(f"checkpoint manifest needs {key!r}")
    if manifest["mode"] not in MODES:
        raise ConfigError(f"checkpoint mode {manifest['mode']!r} is not one of {', '.join(MODES)}")
    from safetensors.torch import save_file

    from cimlab.training.layers import cim_layers, model_polarity, model_quant

    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    on_macro = any(True for _ in cim_layers(model))  # ranges and polarities are the model's own, never the caller's
    full = {"format": FORMAT, "version": VERSION, "spec": None, "quantizer": None, "error_model": None,
            **manifest, "quant": model_quant(model) if on_macro else None,
            "polarity": model_polarity(model) if on_macro else None,
            "tensors_sha256": tensors_sha256(tensors), "created_by": f"cimlab {package_version()}"}
    text = json.dumps(full, sort_keys=True)
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={MANIFEST_KEY: text, MANIFEST_HASH_KEY: text_sha256(text)})
    return target


def _manifest(where: str, meta: dict[str, str]) -> dict[str, Any]:
    """The manifest from the metadata: hash, format, version and field types checked."""
    if MANIFEST_KEY not in meta:
        raise ArtifactError(f"{where}: no cimlab manifest in its metadata (not a cimlab checkpoint)")
    text = meta[MANIFEST_KEY]
    check_manifest_hash(where, text, meta.get(MANIFEST_HASH_KEY), MANIFEST_HASH_KEY)
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{where}: the manifest is not JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{where}: manifest format is not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{where}: manifest version {manifest.get('version')!r} is not supported ({VERSION})")
    require_types(where, manifest, MANIFEST_TYPES)
    require_types(where, manifest["model"], {"name": str, "kwargs": dict}, "model.")
    if manifest["mode"] not in MODES:
        raise ArtifactError(f"{where}: mode {manifest['mode']!r} is not one of {', '.join(MODES)}")
    for key, typ in (("spec", dict), ("quantizer", str), ("error_model", dict), ("quant", str), ("polarity", dict)):
        if manifest.get(key) is not None and not isinstance(manifest[key], typ):
            raise ArtifactError(f"{where}: manifest field '{key}' must be {typ.__name__} or null")
    return manifest


def load_checkpoint(path: str | os.PathLike, *, spec: MacroSpec | None = None,
                    spec_source: str = "the macro") -> Checkpoint:
    """Read and verify a checkpoint (see the module docstring).

    Args:
        spec: the MacroSpec the caller will run on; a checkpoint for another one is refused.
        spec_source: how to name ``spec``'s origin in the error message.

    Raises:
        ArtifactError: unreadable, corrupt, not a cimlab checkpoint, or for another MacroSpec.
    """
    p = Path(path)
    where = f"checkpoint {str(p)!r}"
    if not p.is_file():
        raise ArtifactError(f"{where}: no such file")
    if p.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise ArtifactError(f"{where}: {p.stat().st_size:,} bytes, more than the {MAX_CHECKPOINT_BYTES:,} allowed")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as err:  # safetensors raises its own error types (and OSError, ValueError) for bad files
        raise ArtifactError(f"{where}: not a readable safetensors file: {err}") from err
    manifest = _manifest(where, meta)
    digest = tensors_sha256(tensors)
    if digest != manifest["tensors_sha256"]:
        raise ArtifactError(f"{where}: tensor data do not match the manifest's hash (corrupt or edited file)")
    ck = Checkpoint(tensors, manifest, p)
    try:
        ck_spec = ck.spec
    except (ConfigError, TypeError, ValueError, OverflowError) as err:
        raise ArtifactError(f"{where}: manifest spec is not a valid MacroSpec: {err}") from err
    if spec is not None:
        if ck_spec is None:
            raise ArtifactError(f"{where} is a float model with no MacroSpec; train it with --mode quant first")
        if ck_spec != spec:
            from cimlab.errmodel import spec_differences

            diff = spec_differences(ck_spec, spec, "checkpoint", spec_source)
            raise ArtifactError(f"{where} was trained for another MacroSpec than {spec_source}: {diff}")
    return ck


__all__ = ["Checkpoint", "FORMAT", "MODES", "VERSION", "load_checkpoint", "save_checkpoint", "tensors_sha256"]

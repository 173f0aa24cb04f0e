"""Checkpoints: safetensors with a JSON manifest; round trip, corruption and foreign MacroSpecs are refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from training_helpers import SMALL_ODD, SMALL_TWOS, noisy_model

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.training.api import evaluate_run, model_from_checkpoint
from cimlab.firmware_bridge.files import text_sha256
from cimlab.training.checkpoint import load_checkpoint, save_checkpoint, tensors_sha256
from cimlab.training.layers import calibrate, convert
from cimlab.training.models import digits_mlp
from cimlab.training.tasks import load_task

MODEL = {"name": "digits_mlp", "kwargs": {"n_classes": 10, "hidden": 8}}


def quant_checkpoint(path: Path, spec=SMALL_TWOS) -> Path:  # noqa: ANN001
    torch.manual_seed(0)
    model = convert(digits_mlp(hidden=8), spec)
    calibrate(model, [load_task("digits", limit=32).x_train])
    return save_checkpoint(path, model, {"task": "digits", "model": MODEL, "mode": "quant", "spec": spec.to_dict(),
                                         "quantizer": "epact"})


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    path = quant_checkpoint(tmp_path / "q.ckpt")
    ck = load_checkpoint(path, spec=SMALL_TWOS)
    assert ck.mode == "quant" and ck.task == "digits" and ck.spec == SMALL_TWOS
    assert any(k.endswith("act.lo") for k in ck.tensors) and any(k.endswith("act.hi") for k in ck.tensors)
    a, b = model_from_checkpoint(ck), model_from_checkpoint(load_checkpoint(path))
    x = load_task("digits", limit=16).x_test
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_a_checkpoint_for_another_macro_is_refused_naming_the_fields(tmp_path: Path) -> None:
    path = quant_checkpoint(tmp_path / "q.ckpt")
    with pytest.raises(ArtifactError, match=r"another MacroSpec.*rows: checkpoint 32 vs the chip 23"):
        load_checkpoint(path, spec=SMALL_ODD, spec_source="the chip")
    other = tmp_path / "odd.npz"
    noisy_model(SMALL_ODD, seed=0).save(other)
    with pytest.raises(ArtifactError, match="another MacroSpec"):
        evaluate_run(path, error_model=other, draws=1, limit=8)


def test_corrupt_checkpoints_are_refused(tmp_path: Path) -> None:
    path = quant_checkpoint(tmp_path / "q.ckpt")
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    flipped = bytearray(raw)
    flipped[8 + header + 5] ^= 0xFF  # one byte of tensor data
    (tmp_path / "flip.ckpt").write_bytes(flipped)
    with pytest.raises(ArtifactError, match="do not match the manifest's hash"):
        load_checkpoint(tmp_path / "flip.ckpt")
    (tmp_path / "short.ckpt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "short.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 40)
    with pytest.raises(ArtifactError, match="checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(ArtifactError, match="no such file"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_a_safetensors_file_without_manifest_or_with_a_bad_one_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ArtifactError, match="no cimlab manifest"):
        load_checkpoint(tmp_path / "plain.safetensors")
    def write(manifest: dict, digest: str | None = None) -> Path:
        text = json.dumps(manifest)
        meta = {"cimlab.manifest": text, "cimlab.manifest_sha256": digest or text_sha256(text)}
        save_file({"w": torch.zeros(2)}, tmp_path / "bad.safetensors", metadata=meta)
        return tmp_path / "bad.safetensors"

    with pytest.raises(ArtifactError, match="version 99"):
        load_checkpoint(write({"format": "cimlab.checkpoint", "version": 99}))
    good = {"format": "cimlab.checkpoint", "version": 2, "task": "digits", "mode": "float",
            "model": {"name": "digits_mlp", "kwargs": {}}, "tensors_sha256": tensors_sha256({"w": torch.zeros(2)})}
    assert load_checkpoint(write(good)).task == "digits"
    with pytest.raises(ArtifactError, match="cimlab.manifest_sha256 does not match"):
        load_checkpoint(write(good, digest="0" * 64))  # an edited manifest
    with pytest.raises(ArtifactError, match=r"'model.kwargs' must be dict, got \[1\]"):
        load_checkpoint(write({**good, "model": {"name": "digits_mlp", "kwargs": [1]}}))
    with pytest.raises(ArtifactError, match="'task' must be str"):
        load_checkpoint(write({**good, "task": 7}))


def test_manifest_must_name_task_model_and_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'mode'"):
        save_checkpoint(tmp_path / "x.ckpt", digits_mlp(), {"task": "digits", "model": MODEL})
    with pytest.raises(ConfigError, match="mode"):
        save_checkpoint(tmp_path / "x.ckpt", digits_mlp(), {"task": "digits", "model": MODEL, "mode": "int8"})

"""The deployment package: what compile writes, that plain numpy reads it, and what is refused."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import DEFAULT_SPEC, make_checkpoint

from cimlab.firmware_bridge.errors import ArtifactError, VersionMismatch
from cimlab.firmware_bridge.frame import PROTOCOL_VERSION
from cimlab.firmware_bridge.registers import REGMAP_VERSION
from cimlab.deploy.compile import compile_checkpoint
from cimlab.firmware_bridge.files import text_sha256
from cimlab.deploy import package as package_module
from cimlab.deploy.package import DeployPackage, build_pages
from cimlab.driver import Chip
from cimlab.training.api import model_from_checkpoint
from cimlab.training.checkpoint import load_checkpoint, save_checkpoint
from cimlab.training.layers import cim_layers


def test_package_holds_what_the_layers_compute_with(mlp_ckpt: Path, mlp_pkg: DeployPackage) -> None:
    model = model_from_checkpoint(load_checkpoint(mlp_ckpt))
    layers = dict(cim_layers(model))
    assert list(mlp_pkg.layers) == list(layers)
    for name, layer in layers.items():
        lp = mlp_pkg.layers[name]
        q, scale = layer.quantized_weights()
        np.testing.assert_array_equal(lp.weights, q.detach().round().T.numpy().astype(np.int64))
        np.testing.assert_array_equal(lp.scale, scale.detach().numpy())
        np.testing.assert_array_equal(lp.qsum, q.detach().round().sum(1).numpy().astype(np.int64))
        assert lp.lo == float(layer.act.lo.detach()) and lp.hi == float(layer.act.hi.detach())
        assert lp.delta == pytest.approx((lp.hi - lp.lo) / DEFAULT_SPEC.input_max, rel=1e-6)
        assert lp.weights.min() >= DEFAULT_SPEC.weight_min and lp.weights.max() <= DEFAULT_SPEC.weight_max
    # every tile's block sits in its page's image; the rest of the image is 0
    pages = build_pages(DEFAULT_SPEC, mlp_pkg.schedule, {n: lp.weights for n, lp in mlp_pkg.layers.items()})
    used = np.zeros((DEFAULT_SPEC.rows, DEFAULT_SPEC.cols), dtype=bool)
    for p in mlp_pkg.schedule.tiles():
        t = p.tile
        rows, cols = slice(t.macro_row, t.macro_row + t.n_rows), slice(t.macro_col, t.macro_col + t.n_cols)
        block = mlp_pkg.page_image(t.page)[rows, cols]
        np.testing.assert_array_equal(block, t.weights(mlp_pkg.layers[p.layer].weights))
        used[rows, cols] = True
    assert (mlp_pkg.page_image(0)[~used] == 0).all()
    np.testing.assert_array_equal(pages[0], mlp_pkg.page_image(0))


def test_manifest_and_plain_numpy_reading(mlp_ckpt: Path, mlp_pkg: DeployPackage) -> None:
    assert mlp_pkg.path is not None
    with np.load(mlp_pkg.path, allow_pickle=False) as z:  # no pickle needed to read any of it
        manifest = json.loads(str(z["manifest"]))
        assert z["page.0"].dtype == DEFAULT_SPEC.weight_dtype
        names = set(z.files)
    assert manifest["format"] == "cimlab.deploy" and manifest["version"] == 4
    assert manifest["spec"] == DEFAULT_SPEC.to_dict()
    assert manifest["protocol_version"] == PROTOCOL_VERSION and manifest["regmap_version"] == REGMAP_VERSION
    assert manifest["task"] == "digits" and manifest["mode"] == "quant"
    ck = load_checkpoint(mlp_ckpt)
    assert manifest["checkpoint"]["tensors_sha256"] == ck.manifest["tensors_sha256"]
    assert len(manifest["checkpoint"]["sha256"]) == 64
    assert manifest["schedule"]["pages"] == 1 and manifest["schedule"]["programming_passes_per_batch"] == 0
    assert {"layer.1.weights", "layer.4.scale", "state.2.running_mean"} <= names
    assert "lo * qsum" in manifest["digital"]


def test_save_is_atomic_and_replaces(mlp_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.npz"
    out.write_bytes(b"an older file")
    compile_checkpoint(mlp_ckpt, spec=DEFAULT_SPEC).save(out)
    assert DeployPackage.load(out).n_pages == 1
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]  # no temporary file left


def _rewrite(src: Path, dst: Path, edit) -> None:  # noqa: ANN001
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    if arrays["manifest"].dtype.kind == "U":  # keep the manifest's hash right, so the edit meets its own check
        arrays["manifest_sha256"] = np.array(text_sha256(str(arrays["manifest"])))
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def test_corrupt_or_foreign_files_are_refused(mlp_pkg: DeployPackage, tmp_path: Path) -> None:
    assert mlp_pkg.path is not None
    bad = tmp_path / "bad.npz"

    def flip_weight(a: dict) -> None:
        a["layer.1.weights"] = a["layer.1.weights"].copy()
        a["layer.1.weights"][0, 0] ^= 1

    _rewrite(mlp_pkg.path, bad, flip_weight)
    with pytest.raises(ArtifactError, match="hash"):
        DeployPackage.load(bad)

    def other_format(a: dict) -> None:
        m = json.loads(str(a["manifest"]))
        m["format"] = "something.else"
        a["manifest"] = np.array(json.dumps(m))

    _rewrite(mlp_pkg.path, bad, other_format)
    with pytest.raises(ArtifactError, match="format"):
        DeployPackage.load(bad)

    def edited_manifest(a: dict) -> None:
        m = json.loads(str(a["manifest"]))
        m["task"] = "cifar10"
        a["manifest"] = np.array(json.dumps(m))

    _rewrite(mlp_pkg.path, bad, edited_manifest)
    with np.load(bad) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["manifest_sha256"] = np.array("0" * 64)  # an edited manifest no longer matches its hash
    np.savez(bad, **arrays)
    with pytest.raises(ArtifactError, match="manifest_sha256"):
        DeployPackage.load(bad)

    def wrong_types(a: dict) -> None:
        m = json.loads(str(a["manifest"]))
        m["model"]["kwargs"] = [1, 2]
        a["manifest"] = np.array(json.dumps(m))

    _rewrite(mlp_pkg.path, bad, wrong_types)
    with pytest.raises(ArtifactError, match=r"model.kwargs' must be dict"):
        DeployPackage.load(bad)


def test_a_package_bomb_is_refused_before_it_is_decompressed(mlp_pkg: DeployPackage, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(package_module, "MAX_STATE_BYTES", 1 << 20)  # 1 MiB here instead of 256 MiB
    with np.load(mlp_pkg.path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["state.huge"] = np.zeros((1 << 21) // 8)  # 2 MiB of zeros, a few kB compressed
    bad = tmp_path / "bomb.npz"
    np.savez_compressed(bad, **arrays)
    with pytest.raises(ArtifactError, match="state arrays declare more than 1,048,576 bytes"):
        DeployPackage.load(bad)

    def pickled_object(a: dict) -> None:
        a["manifest"] = np.array([{"format": "cimlab.deploy"}], dtype=object)

    _rewrite(mlp_pkg.path, bad, pickled_object)
    with pytest.raises(ArtifactError):
        DeployPackage.load(bad)

    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ArtifactError, match="readable"):
        DeployPackage.load(bad)
    with pytest.raises(ArtifactError, match="no such file"):
        DeployPackage.load(tmp_path / "missing.npz")
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("other.npy", b"")
    with pytest.raises(ArtifactError):
        DeployPackage.load(bad)


def test_an_edited_page_image_is_refused(mlp_pkg: DeployPackage, tmp_path: Path) -> None:
    # consistent hash but a page that is not what the schedule makes of the weights
    pkg = DeployPackage.load(mlp_pkg.path)
    pkg.pages[0] = pkg.pages[0].copy()
    pkg.pages[0][255, 63] = 1  # a cell outside every tile
    out = pkg.save(tmp_path / "edited.npz")
    with pytest.raises(ArtifactError, match="page 0"):
        DeployPackage.load(out)


def test_compile_refuses_float_models_and_other_macros(tmp_path: Path, mlp_ckpt: Path) -> None:
    from cimlab.training.models import build_model

    flt = save_checkpoint(tmp_path / "float.safetensors", build_model("digits_mlp"),
                          {"task": "digits", "model": {"name": "digits_mlp", "kwargs": {}}, "mode": "float"})
    with pytest.raises(ArtifactError, match="float model"):
        compile_checkpoint(flt)
    with pytest.raises(ArtifactError, match="rows"):
        compile_checkpoint(mlp_ckpt, spec=DEFAULT_SPEC.replace(rows=128), spec_source="a smaller macro")


def test_check_hello_refuses_other_versions_and_macros(mlp_pkg: DeployPackage) -> None:
    with Chip.open("sim://?profile=default") as chip:
        hello = chip.hello
    mlp_pkg.check_hello(hello)
    with pytest.raises(VersionMismatch, match="protocol v2.*v1"):
        mlp_pkg.check_hello(dataclasses.replace(hello, protocol_version=1))
    with pytest.raises(VersionMismatch, match="register map"):
        mlp_pkg.check_hello(dataclasses.replace(hello, regmap_version=9))
    with pytest.raises(ArtifactError, match="adc_bits"):
        mlp_pkg.check_hello(dataclasses.replace(hello, spec=DEFAULT_SPEC.replace(adc_bits=6, adc_full_scale=63)))


def test_a_checkpoint_with_a_narrow_layer_still_compiles(tmp_path: Path) -> None:
    spec = DEFAULT_SPEC.replace(rows=32, cols=8, rows_per_conversion=8)
    ck = make_checkpoint(tmp_path / "small.safetensors", spec=spec)
    pkg = compile_checkpoint(ck, spec=spec)
    # 64 x 64 and 64 x 10 layers on a 32 x 8 macro: 2 x 8 and 2 x 2 full-height tiles, one per page as long as
    # tiles keep their columns; moving columns lets the two 32 x 2 tiles of the last layer share a page
    assert [len(lm.tiles) for _, lm in pkg.schedule.layers] == [16, 4]
    assert pkg.n_pages == 20
    assert pkg.rows_written_per_pass() == [32] * 20
    full = compile_checkpoint(ck, spec=spec, pack="full")
    assert full.n_pages == 19 and len(full.schedule.page_tiles(18)) == 2

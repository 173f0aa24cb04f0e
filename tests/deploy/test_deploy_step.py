"""The per-chip deploy step on the chip path: trimmed raw codes and per-output calibration, on a twin whose columns
have large offsets and gains, against the same step in the host's prediction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import digits

from cimlab.deploy.bench import bench_package
from cimlab.deploy.package import DeployPackage
from cimlab.driver import Chip
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.training.transfer import ColumnTrim

TWIN = "sim://?profile=default&offset_sigma_lsb=0.5&gain_sigma=0.05&seed=3"


def characterize(out: Path, repeats: int) -> Path:
    cmd = [sys.executable, "-m", "cimlab.cli", "characterize", "--link", TWIN, "--out", str(out), "--repeats",
           str(repeats), "--no-progress", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return Path(json.loads(res.stdout.strip().splitlines()[-1])["models"][0])


@pytest.fixture(scope="module")
def twin_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("step")
    return characterize(base / "full", 64), characterize(base / "short", 16)


def test_trimmed_raw_path_equals_the_chips_mac_without_a_trim(mlp_pkg: DeployPackage) -> None:
    """An identity trim through MAC_RAW and the host's recombination gives the chip's own MAC outputs."""
    spec = mlp_pkg.spec
    identity = ColumnTrim(np.zeros(spec.physical_cols), np.ones(spec.physical_cols), "identity")
    data = digits(40)
    with Chip.open("sim://?profile=default&seed=2", window=1) as chip:
        plain = bench_package(mlp_pkg, chip, data.x_test, data.y_test, draws=0)
    with Chip.open("sim://?profile=default&seed=2", window=1) as chip:
        raw = bench_package(mlp_pkg, chip, data.x_test, data.y_test, draws=0, trim=identity)
    assert np.array_equal(plain["_chip_logits"].numpy(), raw["_chip_logits"].numpy())
    assert raw["link_stats"]["bytes_in"] > 4 * plain["link_stats"]["bytes_in"]  # raw codes cost link bytes


def test_the_deploy_step_wins_back_accuracy_on_the_chip_as_predicted(mlp_pkg: DeployPackage,
                                                                       twin_models: tuple[Path, Path]) -> None:
    full, short = twin_models
    data = digits()
    kwargs = {"draws": 4, "error_model": full}
    with Chip.open(TWIN) as chip:
        before = bench_package(mlp_pkg, chip, data.x_test, data.y_test, **kwargs)
    with Chip.open(TWIN) as chip:
        after = bench_package(mlp_pkg, chip, data.x_test, data.y_test, trim=ColumnTrim.load(short),
                              calibration=data.x_train[:256], **kwargs)
    assert after["accuracy_chip"] > before["accuracy_chip"] + 0.1, (before["accuracy_chip"], after["accuracy_chip"])
    assert after["deploy_step"]["calibration_images"] == 256 and after["deploy_step"]["trim"] == str(short)
    p = after["prediction"]
    assert abs(after["accuracy_chip"] - p["mean"]) <= 3 * p["std"] + 0.03, (after["accuracy_chip"], p)


def test_a_trim_for_another_macro_is_refused(mlp_pkg: DeployPackage) -> None:
    data = digits(8)
    bad = ColumnTrim(np.zeros(3), np.ones(3))
    with Chip.open("sim://?profile=default") as chip, pytest.raises(ConfigError, match="physical columns"):
        bench_package(mlp_pkg, chip, data.x_test, data.y_test, draws=0, trim=bad)


def test_table_decoder_on_the_chip_path_decodes_raw_codes_as_the_host_predicts(
        mlp_pkg: DeployPackage, twin_models: tuple[Path, Path]) -> None:
    """A table decoder from the short characterization (the expected ideal level of each code): the chip path
    decodes MAC_RAW with it, the prediction under the error model with the same table; both agree, and a table
    that maps every code to itself gives the chip's own MACs."""
    from cimlab.training.transfer import ColumnDecoder

    full, short = twin_models
    spec = mlp_pkg.spec
    data = digits(120)
    identity = ColumnDecoder(np.tile(np.arange(spec.n_codes, dtype=np.float64), (spec.physical_cols, 1)))
    with Chip.open("sim://?profile=default&seed=2", window=1) as chip:
        plain = bench_package(mlp_pkg, chip, data.x_test[:40], data.y_test[:40], draws=0)
    with Chip.open("sim://?profile=default&seed=2", window=1) as chip:
        same = bench_package(mlp_pkg, chip, data.x_test[:40], data.y_test[:40], draws=0, trim=identity)
    assert np.array_equal(plain["_chip_logits"].numpy(), same["_chip_logits"].numpy())
    table = ColumnDecoder.load(short)
    with Chip.open(TWIN) as chip:
        after = bench_package(mlp_pkg, chip, data.x_test, data.y_test, trim=table, draws=4, error_model=full,
                              calibration=data.x_train[:256])
    assert after["deploy_step"]["decoder"] == "table" and after["deploy_step"]["trim"] == str(short)
    p = after["prediction"]
    assert abs(after["accuracy_chip"] - p["mean"]) <= 3 * p["std"] + 0.03, (after["accuracy_chip"], p)
    with Chip.open("sim://?profile=default") as chip, pytest.raises(ConfigError, match="physical columns"):
        bench_package(mlp_pkg, chip, data.x_test[:8], data.y_test[:8], draws=0, trim=ColumnDecoder(np.zeros((3, 4))))

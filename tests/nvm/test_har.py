"""HAR end to end through the command line, on a small folder laid out as the UCI HAR Dataset archive unpacks:
train (float, then quant for an NVM crossbar), compile, bench on the twin, estimate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cimlab.cli import cli
from cimlab.firmware_bridge.errors import ArtifactError
from cimlab.training.tasks import HAR_SIGNALS, HAR_WINDOW, load_task


def write_har_folder(root: Path, n_train: int = 24, n_test: int = 12, seed: int = 0) -> Path:
    """``root/UCI HAR Dataset`` with the archive's layout: per split, 9 inertial signal files of 128 numbers per
    line (one window a line, in the archive's scientific notation) and the labels 1..6; each class a sine of its own
    frequency plus noise, so a network can learn it."""
    rng = np.random.default_rng(seed)
    base = root / "UCI HAR Dataset"
    t = np.arange(HAR_WINDOW) / 50.0
    for split, n in (("train", n_train), ("test", n_test)):
        signals = base / split / "Inertial Signals"
        signals.mkdir(parents=True)
        labels = rng.integers(1, 7, n)
        (base / split / f"y_{split}.txt").write_text("".join(f"{y}\n" for y in labels))
        for i, name in enumerate(HAR_SIGNALS):
            x = np.sin(2 * np.pi * (labels[:, None] + 0.3 * i) * t[None, :]) + 0.1 * rng.standard_normal((n, HAR_WINDOW))
            lines = ["  " + " ".join(f"{v: .7e}" for v in row) for row in x]
            (signals / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def _run(*args: object) -> dict:
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.rindex("\n{") + 1 :] if "\n{" in r.output else r.output[r.output.index("{"):])


def test_har_folder_loads_as_the_archive(tmp_path: Path) -> None:
    write_har_folder(tmp_path)
    data = load_task("har", tmp_path)
    assert data.x_train.shape == (24, 9, 128) and data.x_test.shape == (12, 9, 128)
    assert set(data.y_train.tolist()) <= set(range(6))
    (tmp_path / "UCI HAR Dataset" / "test" / "y_test.txt").write_text("7\n" * 12)
    with pytest.raises(ArtifactError, match="labels must be 1..6"):
        load_task("har", tmp_path)


def test_har_end_to_end_on_an_nvm_crossbar(tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = write_har_folder(tmp_path / "data")
        f, q, pkg = tmp_path / "f.safetensors", tmp_path / "q.safetensors", tmp_path / "q.npz"
        _run("train", "--task", "har", "--data", data, "--mode", "float", "--out", f, "--epochs", "1",
             "--no-progress", "--json")
        trained = _run("train", "--task", "har", "--data", data, "--mode", "quant", "--profile", "nvm-2bit",
                       "--init", f, "--out", q, "--max-steps", "2", "--no-progress", "--json")
        assert trained["task"] == "har" and "accuracy_ideal" in trained
        _run("compile", q, "--profile", "nvm-2bit", "--out", pkg, "--json")
        bench = _run("bench", pkg, "--link", "sim://?profile=nvm-2bit", "--data", data, "--limit", "6",
                     "--draws", "0", "--no-progress", "--json")
        assert bench["task"] == "har" and bench["images"] == 6 and bench["weight_mismatches"] == 0
        assert bench["estimate"]["conversions_per_inference"] > 0
    finally:
        torch.set_num_threads(threads)

"""Datasets, offline: digits from scikit-learn, HAR and CIFAR-10 from local folders in their official layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.training.tasks import CIFAR_RECORD, HAR_SIGNALS, crop_flip, load_task


def write_har(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> Path:
    """A tiny copy of the UCI HAR archive layout: 'UCI HAR Dataset/{train,test}/Inertial Signals/*.txt'."""
    rng = np.random.default_rng(seed)
    base = root / "UCI HAR Dataset"
    for split, n in (("train", n_train), ("test", n_test)):
        sig = base / split / "Inertial Signals"
        sig.mkdir(parents=True)
        for i, name in enumerate(HAR_SIGNALS):
            values = rng.standard_normal((n, 128)) * (i + 1) + i
            np.savetxt(sig / f"{name}_{split}.txt", values, fmt="%.7e")
        labels = np.arange(n) % 6 + 1
        np.savetxt(base / split / f"y_{split}.txt", labels, fmt="%d")
    return root


def write_cifar(root: Path, n_per_file: int = 5, seed: int = 0) -> Path:
    """A tiny binary CIFAR-10 release: data_batch_1..2.bin and test_batch.bin of 3073-byte records."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in ("data_batch_1.bin", "data_batch_2.bin", "test_batch.bin"):
        rec = rng.integers(0, 256, (n_per_file, CIFAR_RECORD), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, n_per_file)
        rec.tofile(folder / name)
    return root


def test_digits_load_offline_with_a_fixed_split() -> None:
    a, b = load_task("digits"), load_task("digits")
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.dtype == torch.float32
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
    assert torch.equal(a.y_test, b.y_test) and a.n_classes == 10


def test_har_loads_the_official_layout(tmp_path: Path) -> None:
    data = load_task("har", write_har(tmp_path))
    assert data.x_train.shape == (12, 9, 128) and data.x_test.shape == (6, 9, 128)
    assert data.y_train.tolist() == [i % 6 for i in range(12)]
    assert torch.allclose(data.x_train.mean(dim=(0, 2)), torch.zeros(9), atol=1e-5)  # standardised per channel
    same = load_task("har", tmp_path / "UCI HAR Dataset")  # the folder itself works too
    assert torch.equal(same.x_test, data.x_test)


def test_har_with_a_missing_or_malformed_file_names_it(tmp_path: Path) -> None:
    write_har(tmp_path)
    bad = tmp_path / "UCI HAR Dataset" / "test" / "Inertial Signals" / "body_gyro_y_test.txt"
    bad.write_text("1 2 3\n4 5\n")
    with pytest.raises(ArtifactError, match="body_gyro_y_test"):
        load_task("har", tmp_path)
    bad.unlink()
    with pytest.raises(ArtifactError, match="missing file.*body_gyro_y_test"):
        load_task("har", tmp_path)
    with pytest.raises(ArtifactError, match="no UCI HAR dataset"):
        load_task("har", tmp_path / "UCI HAR Dataset" / "train")


def test_har_labels_outside_1_to_6_are_refused(tmp_path: Path) -> None:
    write_har(tmp_path)
    np.savetxt(tmp_path / "UCI HAR Dataset" / "train" / "y_train.txt", np.full(12, 7), fmt="%d")
    with pytest.raises(ArtifactError, match="labels must be 1..6"):
        load_task("har", tmp_path)


def test_cifar10_binary_release_loads(tmp_path: Path) -> None:
    data = load_task("cifar10", write_cifar(tmp_path))
    assert data.x_train.shape == (10, 3, 32, 32) and data.x_test.shape == (5, 3, 32, 32)
    raw = np.fromfile(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", dtype=np.uint8)
    raw = raw.reshape(-1, CIFAR_RECORD)
    assert data.y_test.tolist() == raw[:, 0].tolist()
    assert data.augment is not None


def test_cifar10_refuses_the_pickled_release_and_truncated_files(tmp_path: Path) -> None:
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "test_batch").write_bytes(b"\x80\x04not read")
    with pytest.raises(ArtifactError, match="pickled"):
        load_task("cifar10", tmp_path)
    root = write_cifar(tmp_path / "bin")
    f = root / "cifar-10-batches-bin" / "data_batch_2.bin"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match="whole number of 3073-byte records"):
        load_task("cifar10", root)


def test_task_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("mnist")
    with pytest.raises(ConfigError, match="needs --data"):
        load_task("har")
    with pytest.raises(ConfigError, match="limit"):
        load_task("digits", limit=0)


def test_crop_flip_keeps_shapes_and_content() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    same = crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    assert all(torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(-1)) for i in range(2))

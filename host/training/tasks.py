"""Tasks and their datasets, all offline.

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images), pixels scaled to 0..1, a fixed stratified 80/20
  split (the same for every seed, so checkpoints evaluate on the test set they never saw).
- ``har``: UCI Human Activity Recognition Using Smartphones, from a local copy of the official archive's folder
  (``UCI HAR Dataset/{train,test}/Inertial Signals/<signal>_<split>.txt`` and ``{train,test}/y_<split>.txt``): the
  9 raw inertial signals of each 2.56 s window (128 samples), standardised per channel with training statistics.
- ``cifar10``: the *binary* release (``cifar-10-batches-bin/data_batch_{1..5}.bin``, ``test_batch.bin``: records of
  one label byte and 3072 pixel bytes); never the pickled Python release. Standardised per channel; training
  batches get random crops (4-pixel padding) and horizontal flips.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError

TASKS = ("digits", "har", "cifar10")
HAR_SIGNALS = ("body_acc_x", "body_acc_y", "body_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z",
               "total_acc_x", "total_acc_y", "total_acc_z")
HAR_CLASSES = 6
HAR_WINDOW = 128
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_CLASSES = 10
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8), "har": (len(HAR_SIGNALS), HAR_WINDOW), "cifar10": (3, 32, 32),
}
"""Shape of one input of each task (what its models take)."""


@dataclass
class TaskData:
    """A task's tensors.

    Attributes:
        name: task name.
        x_train, y_train, x_test, y_test: float32 inputs and int64 labels.
        n_classes: number of classes.
        augment: optional training-batch augmentation ``(x, generator) -> x``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.x_train.shape[1:])


def load_task(name: str, data_dir: str | os.PathLike | None = None, *, limit: int | None = None) -> TaskData:
    """Load a task's data (``TASKS``). ``data_dir`` is needed for ``har`` and ``cifar10``; ``limit`` keeps the
    first ``limit`` training and test samples (quick runs).

    Raises:
        ConfigError: unknown task, missing folder, bad limit.
        ArtifactError: files missing or malformed (named in the message).
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    if name == "digits":
        data = load_digits()
    else:
        if data_dir is None:
            raise ConfigError(f"task {name!r} needs --data DIR (a local copy of the dataset; nothing is "
                              "downloaded)")
        data = load_har(data_dir) if name == "har" else load_cifar10(data_dir)
    if limit is not None:
        data.x_train, data.y_train = data.x_train[:limit], data.y_train[:limit]
        data.x_test, data.y_test = data.x_test[:limit], data.y_test[:limit]
    return data


def load_digits() -> TaskData:
    """scikit-learn's 8x8 digits as [N, 1, 8, 8] in 0..1, fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return TaskData("digits", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                    torch.from_numpy(yte), 10)


# ---- HAR -------------------------------------------------------------------------------------------------------
def _har_root(data_dir: Path) -> Path:
    for cand in (data_dir, data_dir / "UCI HAR Dataset"):
        if (cand / "train" / "Inertial Signals").is_dir():
            return cand
    raise ArtifactError(
        f"no UCI HAR dataset under {str(data_dir)!r}: expected 'UCI HAR Dataset/train/Inertial Signals/' "
        "(the official archive, unpacked)"
    )


def _read_table(path: Path, cols: int | None) -> np.ndarray:
    try:
        text = path.read_bytes()
    except FileNotFoundError as err:
        raise ArtifactError(f"missing file {str(path)!r}") from err
    try:
        values = np.array(text.split(), dtype=np.float64)
    except ValueError as err:
        raise ArtifactError(f"{str(path)!r} holds something other than numbers: {err}") from err
    rows = text.count(b"\n") + (0 if text.endswith(b"\n") or not text.strip() else 1)
    width = cols or 1
    if rows == 0 or values.size != rows * width:
        raise ArtifactError(f"{str(path)!r} has {values.size} numbers on {rows} lines; expected {width} per line")
    return values.reshape(rows, width)


def _har_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    chans = [_read_table(root / split / "Inertial Signals" / f"{s}_{split}.txt", HAR_WINDOW) for s in HAR_SIGNALS]
    n = {c.shape[0] for c in chans}
    if len(n) != 1:
        raise ArtifactError(f"HAR {split}: the inertial signal files have different numbers of windows: "
                            f"{sorted(n)}")
    y = _read_table(root / split / f"y_{split}.txt", 1)[:, 0]
    if y.shape[0] != chans[0].shape[0]:
        raise ArtifactError(f"HAR {split}: {y.shape[0]} labels for {chans[0].shape[0]} windows")
    if not np.all(np.isin(y, np.arange(1, HAR_CLASSES + 1))):
        raise ArtifactError(f"HAR {split}: labels must be 1..{HAR_CLASSES}")
    return np.stack(chans, axis=1).astype(np.float32), (y - 1).astype(np.int64)


def load_har(data_dir: str | os.PathLike) -> TaskData:
    """UCI HAR from a local folder (see the module docstring): inputs [N, 9, 128], labels 0..5."""
    root = _har_root(Path(data_dir))
    xtr, ytr = _har_split(root, "train")
    xte, yte = _har_split(root, "test")
    mean = xtr.mean(axis=(0, 2), keepdims=True)
    std = xtr.std(axis=(0, 2), keepdims=True) + 1e-8
    return TaskData("har", torch.from_numpy((xtr - mean) / std), torch.from_numpy(ytr),
                    torch.from_numpy((xte - mean) / std), torch.from_numpy(yte), HAR_CLASSES)


# ---- CIFAR-10 --------------------------------------------------------------------------------------------------
def _cifar_root(data_dir: Path) -> Path:
    for cand in (data_dir, data_dir / "cifar-10-batches-bin"):
        if (cand / "test_batch.bin").is_file():
            return cand
    for cand in (data_dir, data_dir / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file():
            raise ArtifactError(
                f"{str(cand)!r} holds the pickled Python release of CIFAR-10, which is not read (no pickle); "
                "use the binary release (cifar-10-batches-bin)"
            )
    raise ArtifactError(f"no CIFAR-10 binary release under {str(data_dir)!r}: expected test_batch.bin "
                        "(cifar-10-batches-bin/)")


def _cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise ArtifactError(f"{str(path)!r} has {raw.size} bytes, not a whole number of "
                            f"{CIFAR_RECORD}-byte records")
    rec = raw.reshape(-1, CIFAR_RECORD)
    y = rec[:, 0].astype(np.int64)
    if y.max() >= CIFAR_CLASSES:
        raise ArtifactError(f"{str(path)!r} has label {int(y.max())}, outside 0..{CIFAR_CLASSES - 1}")
    return rec[:, 1:].reshape(-1, 3, 32, 32), y


def load_cifar10(data_dir: str | os.PathLike) -> TaskData:
    """CIFAR-10 from its binary release in a local folder: inputs [N, 3, 32, 32] standardised, labels 0..9."""
    root = _cifar_root(Path(data_dir))
    train_files = sorted(root.glob("data_batch_*.bin"))
    if not train_files:
        raise ArtifactError(f"no data_batch_*.bin in {str(root)!r}")
    parts = [_cifar_file(p) for p in train_files]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _cifar_file(root / "test_batch.bin")
    xtr_f = xtr.astype(np.float32) / 255.0
    mean = xtr_f.mean(axis=(0, 2, 3), keepdims=True)
    std = xtr_f.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    norm = lambda a: torch.from_numpy((a.astype(np.float32) / 255.0 - mean) / std)  # noqa: E731
    return TaskData("cifar10", norm(xtr), torch.from_numpy(ytr), norm(xte), torch.from_numpy(yte), CIFAR_CLASSES,
                    augment=crop_flip)


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops from a zero-padded image and random horizontal flips, per image of a batch [B, C, H, W]."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W)[None, :])[:, None, None, :]
    out = padded[torch.arange(B)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(B, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


__all__ = ["INPUT_SHAPES", "TASKS", "TaskData", "crop_flip", "load_cifar10", "load_digits", "load_har", "load_task"]

"""Files a lab can share: artifacts get the permissions the umask gives (not mkstemp's 0600), and a temporary file
left by a killed writer is removed by the next write."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.files import atomic_path
from cimlab.firmware_bridge.spec import MacroSpec


@pytest.fixture
def umask() -> Iterator[None]:
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_artifacts_honour_the_umask(tmp_path: Path, umask: None, mask: int, mode: int) -> None:
    os.umask(mask)
    path = ErrorModel.empty(MacroSpec().replace(rows=32)).save(tmp_path / "m.npz")
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_checkpoints_too_though_safetensors_writes_a_private_file(tmp_path: Path, umask: None) -> None:
    pytest.importorskip("torch")
    from cimlab.training.checkpoint import save_checkpoint
    from cimlab.training.models import build_model

    os.umask(0o002)
    path = save_checkpoint(tmp_path / "f.safetensors", build_model("digits_mlp"),
                           {"task": "digits", "model": {"name": "digits_mlp", "kwargs": {}}, "mode": "float"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)  # that process has exited and been reaped
    stale = tmp_path / f".m.npz.{pid}.k3j2h1.tmp"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".m.npz.{os.getpid()}.abcdef.tmp"  # a write of this very process in progress: kept
    live.write_bytes(b"")
    with atomic_path(tmp_path / "m.npz") as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "m.npz").read_bytes() == b"whole"
    assert not stale.exists() and live.exists()

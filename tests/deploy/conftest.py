"""Fixtures of the deploy tests: checkpoints and packages built once per session (they take a second or two)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import harsh_error_model, make_checkpoint, make_package, one_torch_thread

from cimlab.deploy.package import DeployPackage


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Every deploy test runs torch on one thread (see ``deploy_helpers.one_torch_thread``)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def deploy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="session")
def mlp_ckpt(deploy_dir: Path) -> Path:
    """A digits MLP trained a little for the default macro (one page)."""
    return make_checkpoint(deploy_dir / "mlp.safetensors", steps=60)


@pytest.fixture(scope="session")
def mlp_pkg(mlp_ckpt: Path, deploy_dir: Path) -> DeployPackage:
    return make_package(mlp_ckpt, deploy_dir / "mlp.npz")


@pytest.fixture(scope="session")
def cnn_pkg(deploy_dir: Path) -> DeployPackage:
    """An untrained, calibrated digits CNN (three pages on the default macro)."""
    ckpt = make_checkpoint(deploy_dir / "cnn.safetensors", model="digits_cnn")
    return make_package(ckpt, deploy_dir / "cnn.npz")


@pytest.fixture(scope="session")
def harsh_model(deploy_dir: Path) -> Path:
    return harsh_error_model(deploy_dir / "harsh.npz")

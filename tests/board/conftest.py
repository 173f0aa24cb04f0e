"""Board-side tests: the device end on a (fake) PYNQ overlay."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from board_fakes import SPEC, FakeFabric, make_fake_pynq, write_manifest
from cimlab.firmware_bridge.overlay import sha256_file

@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A bitstreams folder with a (fake) built overlay, and a fake pynq whose overlay is a fake fabric."""
    (tmp_path / "cimlab_ctrl.bit").write_bytes(b"\x00bitstream\xff" * 100)
    (tmp_path / "cimlab_ctrl.hwh").write_text("<hwh/>")
    fabric = FakeFabric(SPEC)
    write_manifest(
        tmp_path,
        sha256=sha256_file(tmp_path / "cimlab_ctrl.bit"),
        hwh_sha256=sha256_file(tmp_path / "cimlab_ctrl.hwh"),
        build_id=fabric.params["BUILD_ID"],
    )
    fake = make_fake_pynq(fabric)
    monkeypatch.setitem(sys.modules, "pynq", fake)
    return tmp_path, fake, fabric

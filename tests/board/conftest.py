"""Board-side tests: the device end on a (fake) PYNQ overlay."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from board_fakes import FakeFabric, make_fake_pynq
from cimlab.firmware_bridge.overlay import sha256_file
from cimlab.firmware_bridge.registers import REGMAP_VERSION
from cimlab.firmware_bridge.spec import MacroSpec

SPEC = MacroSpec(rows=24, cols=5, rows_per_conversion=8)


def write_manifest(folder: Path, **changes: object) -> dict:
    """A bitstreams folder's manifest with one overlay, ``cimlab_ctrl``."""
    entry = {
        "name": "cimlab_ctrl",
        "file": "cimlab_ctrl.bit",
        "sha256": None,
        "hwh": "cimlab_ctrl.hwh",
        "hwh_sha256": None,
        "regmap_version": REGMAP_VERSION,
        "profile": "default",
        "build_id": None,
        "interfaces": {"ctrl": "cimlab_ctrl_0"},
    }
    entry.update(changes)
    (folder / "manifest.json").write_text(json.dumps({"manifest_version": 2, "overlays": [entry]}))
    return entry


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

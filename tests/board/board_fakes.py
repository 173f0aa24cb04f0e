"""A fake ``pynq`` for board-side tests: an overlay whose controller IP is a register-level fake of the fabric.

The fake fabric answers its registers (generated constants, stored words, SEQ_STATUS) and runs WRITE_WEIGHTS and
READ_WEIGHTS by moving buffer records, so HELLO, registers and a weight round trip can go through the real
``FabricController``, ``PynqBus`` and ``Bridge``. It does not convert: MAC runs leave the output buffer as it is
(the RTL twin in tests/rtl is what checks the fabric's MACs).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
from cimlab.firmware_bridge.fabric import FabricLayout
from cimlab.firmware_bridge.registers import (
    BY_NAME,
    FABRIC_BY_NAME,
    FABRIC_REGISTERS,
    ID_MAGIC,
    IN_BUF_BASE,
    OUT_BUF_BASE,
    REGISTERS,
    REGMAP_VERSION,
    SEQ_DONE,
    SEQ_READ_WEIGHTS,
    SEQ_WRITE_WEIGHTS,
    STORAGE_CODES,
)
from cimlab.firmware_bridge.spec import MacroSpec

WINDOW_WORDS = 0x100000 // 4


class FakeFabric:
    """Registers and buffers of a fabric built for ``spec`` (see the module docstring)."""

    def __init__(self, spec: MacroSpec, bus_bits: int = 64, *, build_id: int = 0x1234ABCD) -> None:
        self.layout = FabricLayout(spec, bus_bits)
        lay = self.layout
        params = {
            "ROWS": spec.rows,
            "COLS": spec.cols,
            "WEIGHT_BITS": spec.weight_bits,
            "WEIGHT_STORAGE": STORAGE_CODES[spec.weight_storage],
            "CELL_BITS": spec.cell_bits,
            "INPUT_BITS": spec.input_bits,
            "SLICE_BITS": spec.input_slice_bits,
            "ROWS_PER_CONV": spec.rows_per_conversion,
            "ADC_BITS": spec.adc_bits,
            "ADC_FULL_SCALE": spec.adc_full_scale,
            "CLOCK_HZ": spec.clock_hz,
            "BUS_BITS": bus_bits,
            "IN_WORDS": lay.in_words,
            "OUT_WORDS": lay.out_words,
            "VDD_MIN_MV": 600,
            "VDD_MAX_MV": 1000,
            "TEMP_MIN_CC": (-4000) & 0xFFFFFFFF,
            "TEMP_MAX_CC": 12500,
            "VDD_NOMINAL_MV": 800,
            "TEMP_NOMINAL_CC": 2500,
            "BUILD_ID": build_id,
        }
        self.params = params
        self.array = np.zeros(WINDOW_WORDS, dtype=np.uint32)
        self.rows = np.zeros((spec.rows, lay.row_words * lay.lanes), dtype=np.uint32)
        self.regs: dict[int, int] = {}
        self.starts: list[int] = []
        self.reset()

    def reset(self) -> None:
        for r in REGISTERS + FABRIC_REGISTERS:
            if r.fabric in ("store", "flags"):
                self.regs[r.addr] = self.params.get(r.reset_param, r.reset) & ~r.pulse_mask
        self.status = 0

    def read(self, offset: int) -> int:
        if offset >= IN_BUF_BASE:
            return int(self.array[offset // 4])
        addr = offset // 4
        reg = next((r for r in REGISTERS + FABRIC_REGISTERS if r.addr == addr), None)
        if reg is None or reg.fabric == "strobe":
            return 0
        if reg.fabric == "const":
            return self.params.get(reg.reset_param, reg.reset) if reg.reset_param else reg.reset
        if reg.name == "SEQ_STATUS":
            return self.status
        return self.regs.get(addr, 0)

    def write(self, offset: int, value: int) -> None:
        if offset >= IN_BUF_BASE:
            self.array[offset // 4] = value
            return
        addr = offset // 4
        if addr == BY_NAME["ERR_FLAGS"].addr:
            self.regs[addr] &= ~value
        elif addr == FABRIC_BY_NAME["ERR_SET"].addr:
            self.regs[BY_NAME["ERR_FLAGS"].addr] |= value
        elif addr == FABRIC_BY_NAME["SOFT_RESET"].addr:
            if value & 1:
                self.reset()
        elif addr == FABRIC_BY_NAME["SEQ_START"].addr:
            self._run(value & 7)
        elif addr in self.regs:
            self.regs[addr] = value & ~(BY_NAME["CTRL"].pulse_mask if addr == BY_NAME["CTRL"].addr else 0)

    def _run(self, op: int) -> None:
        self.starts.append(op)
        first = self.regs[FABRIC_BY_NAME["SEQ_FIRST"].addr]
        count = self.regs[FABRIC_BY_NAME["SEQ_COUNT"].addr]
        width = self.rows.shape[1]
        if op == SEQ_WRITE_WEIGHTS:
            base = IN_BUF_BASE // 4
            self.rows[first : first + count] = self.array[base : base + count * width].reshape(count, width)
        elif op == SEQ_READ_WEIGHTS:
            base = OUT_BUF_BASE // 4
            self.array[base : base + count * width] = self.rows[first : first + count].ravel()
        self.status = SEQ_DONE


class FakeMMIO:
    """``pynq.MMIO`` over a FakeFabric: ``read``/``write`` of words and the ``array`` view of the window."""

    def __init__(self, fabric: FakeFabric) -> None:
        self.fabric = fabric
        self.array = fabric.array

    def read(self, offset: int, length: int = 4) -> int:
        return self.fabric.read(offset)

    def write(self, offset: int, value: int) -> None:
        self.fabric.write(offset, value)


def make_fake_pynq(fabric: FakeFabric, ip_name: str = "cimlab_ctrl_0") -> types.ModuleType:
    """A module standing in for ``pynq``: ``Overlay(bitfile)`` has IP ``ip_name`` whose ``mmio`` is the fabric."""
    module = types.ModuleType("pynq")
    module.loaded = []  # type: ignore[attr-defined]

    class Overlay:
        def __init__(self, bitfile: str) -> None:
            module.loaded.append(bitfile)  # type: ignore[attr-defined]
            self.ip_dict = {ip_name: {}}
            setattr(self, ip_name, types.SimpleNamespace(mmio=FakeMMIO(fabric)))

    module.Overlay = Overlay  # type: ignore[attr-defined]
    return module


def fake_id_magic() -> int:
    """The ID a cimlab fabric reports."""
    return ID_MAGIC


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

"""The fabric's register file is generated from firmware_bridge/registers.py and must not drift from it."""

from __future__ import annotations

from cimlab.firmware_bridge import rtlgen
from cimlab.firmware_bridge.registers import FABRIC_REGISTERS, REGISTERS


def test_the_committed_register_file_is_what_registers_py_generates() -> None:
    committed = (rtlgen.RTL_DIR / rtlgen.REGS_FILE).read_text(encoding="utf-8")
    assert committed == rtlgen.regfile_sv(), "run: python -m cimlab.firmware_bridge.rtlgen"
    assert rtlgen.main(["--check"]) == 0


def test_every_register_is_decoded_at_its_address() -> None:
    text = rtlgen.regfile_sv()
    for r in REGISTERS + FABRIC_REGISTERS:
        assert f"10'h{r.addr:x}: rd_data <=" in text, r.name


def test_a_changed_map_is_caught(tmp_path) -> None:
    stale = tmp_path / "cimlab_regs.sv"
    stale.write_text(rtlgen.regfile_sv().replace("10'h3:", "10'h13:"), encoding="utf-8")
    assert rtlgen.main(["--check", "--out", str(stale)]) == 1

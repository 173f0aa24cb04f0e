"""Generate the fabric's register file (``bitstreams/rtl/cimlab_regs.sv``) from the register map.

The generated file is committed; ``tests/rtl`` fails when it differs from what this module generates, and the RTL
tests read every register back through simulated AXI4-Lite. Regenerate after changing the register map::

    python -m cimlab.firmware_bridge.rtlgen            # writes bitstreams/rtl/cimlab_regs.sv
    python -m cimlab.firmware_bridge.rtlgen --check    # exit 1 when the committed file is stale

``rst`` resets the registers (power-on or the RESET command's soft reset); ``por`` is the power-on reset alone,
for registers that ``keep_on_reset``. Ports, per register (``n`` = its name in lower case): ``store`` drives ``n_q`` (and ``n_pulse`` for its
``pulse_mask`` bits, ``n_wr`` when it ``announce``s writes); ``flags`` takes ``n_set`` and drives ``n_q``; ``input`` takes ``n_in``; ``strobe``
drives ``n_stb`` and ``n_data``; ``const`` reads a parameter or its reset value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cimlab.firmware_bridge.registers import (
    FABRIC_KINDS,
    FABRIC_REGISTERS,
    REG_WINDOW_BYTES,
    REGISTERS,
    REGMAP_VERSION,
    Register,
)

RTL_DIR = Path(__file__).resolve().parents[1] / "bitstreams" / "rtl"
REGS_FILE = "cimlab_regs.sv"
ADDR_BITS = (REG_WINDOW_BYTES // 4 - 1).bit_length()


def all_registers() -> tuple[Register, ...]:
    """Host and fabric registers, checked: unique names and addresses, known kinds, addresses in the window."""
    regs = REGISTERS + FABRIC_REGISTERS
    names = [r.name for r in regs]
    addrs = [r.addr for r in regs]
    if len(set(names)) != len(names) or len(set(addrs)) != len(addrs):
        raise ValueError("register names and addresses must be unique")
    for r in regs:
        if r.fabric not in FABRIC_KINDS:
            raise ValueError(f"register {r.name}: fabric kind {r.fabric!r} is not one of {FABRIC_KINDS}")
        if not 0 <= r.addr < 2**ADDR_BITS:
            raise ValueError(f"register {r.name}: address 0x{r.addr:x} is outside the register window")
    return regs


def _params(regs: tuple[Register, ...]) -> list[str]:
    return sorted({r.reset_param for r in regs if r.reset_param})


def _reset(r: Register) -> str:
    return r.reset_param if r.reset_param else f"32'h{r.reset:08x}"


def _ports(regs: tuple[Register, ...]) -> list[str]:
    ports = []
    for r in regs:
        n = r.name.lower()
        if r.fabric == "store":
            ports.append(f"output wire [31:0] {n}_q")
            if r.pulse_mask:
                ports.append(f"output wire [31:0] {n}_pulse")
            if r.announce:
                ports.append(f"output wire {n}_wr")
        elif r.fabric == "flags":
            ports += [f"input  wire [31:0] {n}_set", f"output wire [31:0] {n}_q"]
        elif r.fabric == "input":
            ports.append(f"input  wire [31:0] {n}_in")
        elif r.fabric == "strobe":
            ports += [f"output wire {n}_stb", f"output wire [31:0] {n}_data"]
    return ports


def _body(regs: tuple[Register, ...]) -> list[str]:
    out = ["  wire [31:0] mask = {{8{wr_strb[3]}}, {8{wr_strb[2]}}, {8{wr_strb[1]}}, {8{wr_strb[0]}}};"]
    for r in regs:
        n, a = r.name.lower(), f"{ADDR_BITS}'h{r.addr:x}"
        hit = f"(wr_en && wr_addr == {a})"
        if r.fabric == "store":
            keep = f"32'h{~r.pulse_mask & 0xFFFFFFFF:08x}"
            out += [
                f"  // {r.name} (0x{r.addr:02x}): {r.doc}",
                f"  reg [31:0] {n}_r;",
                "  always @(posedge clk)",
                f"    if ({'por' if r.keep_on_reset else 'rst'}) {n}_r <= {_reset(r)} & {keep};",
                f"    else if {hit} {n}_r <= (({n}_r & ~mask) | (wr_data & mask)) & {keep};",
                f"  assign {n}_q = {n}_r;",
            ]
            if r.pulse_mask:
                out.append(f"  assign {n}_pulse = {hit} ? (wr_data & mask & 32'h{r.pulse_mask:08x}) : 32'h0;")
            if r.announce:
                out.append(f"  assign {n}_wr = {hit};")
        elif r.fabric == "flags":
            out += [
                f"  // {r.name} (0x{r.addr:02x}): {r.doc}",
                f"  reg [31:0] {n}_r;",
                "  always @(posedge clk)",
                f"    if (rst) {n}_r <= {_reset(r)};",
                f"    else {n}_r <= ({n}_r & ~({hit} ? (wr_data & mask) : 32'h0)) | {n}_set;",
                f"  assign {n}_q = {n}_r;",
            ]
        elif r.fabric == "strobe":
            out += [
                f"  // {r.name} (0x{r.addr:02x}): {r.doc}",
                f"  assign {n}_stb = {hit};",
                f"  assign {n}_data = wr_data & mask;",
            ]
    out += ["", "  always @(posedge clk)", "    if (rd_en)", "      case (rd_addr)"]
    for r in regs:
        n, a = r.name.lower(), f"{ADDR_BITS}'h{r.addr:x}"
        value = {"store": f"{n}_r", "flags": f"{n}_r", "input": f"{n}_in", "const": _reset(r), "strobe": "32'h0"}
        out.append(f"        {a}: rd_data <= {value[r.fabric]};")
    out += ["        default: rd_data <= 32'h0;", "      endcase"]
    return out


def regfile_sv() -> str:
    """The register file module, as text."""
    regs = all_registers()
    params = ",\n".join(f"  parameter [31:0] {p} = 32'h0" for p in _params(regs))
    ports = ",\n".join(
        [
            "  input  wire clk",
            "  input  wire rst",
            "  input  wire por",
            "  input  wire wr_en",
            f"  input  wire [{ADDR_BITS - 1}:0] wr_addr",
            "  input  wire [31:0] wr_data",
            "  input  wire [3:0] wr_strb",
            "  input  wire rd_en",
            f"  input  wire [{ADDR_BITS - 1}:0] rd_addr",
            "  output reg  [31:0] rd_data",
        ]
        + [f"  {p}" for p in _ports(regs)]
    )
    lines = [
        "// GENERATED by `python -m cimlab.firmware_bridge.rtlgen` from firmware_bridge/registers.py",
        f"// (register map version {REGMAP_VERSION}). Do not edit: change registers.py and regenerate.",
        "//",
        "// The register file of the cimlab controller: word addresses (byte offset / 4), one-cycle read latency.",
        "`default_nettype none",
        "module cimlab_regs #(",
        params,
        ") (",
        ports,
        ");",
        *_body(regs),
        "endmodule",
        "`default_nettype wire",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) the generated register file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the committed file differs")
    ap.add_argument("--out", type=Path, default=RTL_DIR / REGS_FILE)
    args = ap.parse_args(argv)
    text = regfile_sv()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m cimlab.firmware_bridge.rtlgen", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The controller's register map: the one source; the fabric's register file, the manifest and docs derive from it.

Registers are 32 bits wide; ``addr`` is a word address (byte offset ``4 * addr`` on the fabric's AXI4-Lite port).
Access: ``ro`` read-only, ``rw`` read-write, ``w1c`` write 1 to clear, ``wo`` write-only (reads 0).

``REGISTERS`` is the map a host reads and writes (READ_REG / WRITE_REG). ``FABRIC_REGISTERS`` are the fabric's
own: what the board's processor uses to run the sequencer (start, busy/done, row range, batch size) and to learn
the geometry the bitstream was built for. The host never sees them; the board-side controller does.

How the fabric implements each register (``fabric``), as ``cimlab.firmware_bridge.rtlgen`` generates it:

- ``const``: a constant (``reset``, or the build parameter ``reset_param``);
- ``store``: a stored word; bits in ``pulse_mask`` act once when written 1 (a pulse out) and read back 0; with
  ``announce`` the fabric also sees each write (a one-cycle strobe, even when the value does not change); with
  ``keep_on_reset`` only a power-on reset (not the RESET command's soft reset) sets it back;
- ``flags``: sticky bits set by the fabric, cleared by writing 1 (``w1c``);
- ``input``: a value the fabric drives (counters, status);
- ``strobe``: a write pulses the fabric with the written word; reads 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from cimlab.firmware_bridge.errors import ConfigError, DeviceError
from cimlab.firmware_bridge.frame import PROTOCOL_VERSION
from cimlab.firmware_bridge.messages import Status

REGMAP_VERSION = 2
"""2: NOISE_SEED added."""
ID_MAGIC = 0xC1A0_5A3D
FABRIC_KINDS = ("const", "store", "flags", "input", "strobe")


@dataclass(frozen=True)
class Register:
    """One named 32-bit register (see the module docstring for ``fabric``, ``reset_param`` and ``pulse_mask``)."""

    name: str
    addr: int
    access: str
    reset: int
    doc: str
    fabric: str = "store"
    reset_param: str = ""
    pulse_mask: int = 0
    announce: bool = False
    keep_on_reset: bool = False


REGISTERS: tuple[Register, ...] = (
    Register("ID", 0x00, "ro", ID_MAGIC, "Constant identifying a cimlab controller (0xC1A05A3D).", "const"),
    Register("PROTO", 0x01, "ro", PROTOCOL_VERSION, "Protocol version the controller speaks.", "const"),
    Register("REGMAP", 0x02, "ro", REGMAP_VERSION, "Version of this register map.", "const"),
    Register("SCRATCH", 0x03, "rw", 0, "Free register for link and bring-up tests."),
    Register("CTRL", 0x04, "rw", 0, "Bit 0: clear counters (self-clearing).", pulse_mask=0x1),
    Register("ERR_FLAGS", 0x05, "w1c", 0, "Sticky error flags: bit 0 bad frame, bit 1 bad request.", "flags"),
    Register("VDD_MV", 0x06, "rw", 800, "Macro supply voltage setpoint, millivolts.",
             reset_param="VDD_NOMINAL_MV"),
    Register("TEMP_CC", 0x07, "rw", 2500, "Die temperature, centi-degrees Celsius.",
             reset_param="TEMP_NOMINAL_CC"),
    Register("CYCLES_LO", 0x08, "ro", 0, "Cycle counter since reset, low 32 bits.", "input"),
    Register("CYCLES_HI", 0x09, "ro", 0, "Cycle counter since reset, high 32 bits.", "input"),
    Register("OPS", 0x0A, "ro", 0, "MAC vectors processed since reset (low 32 bits).", "input"),
    Register(
        "NOISE_SEED", 0x0B, "rw", 0,
        "Key of a twin's per-conversion random stream: writing it restarts the stream at the key, so the codes that"
        " follow depend only on the key and the requests since (a sweep writes one per batch; a resumed sweep then"
        " repeats its codes). Held across RESET. A chip's noise is physical: it stores the value and nothing else.",
        announce=True,
        keep_on_reset=True,
    ),
)

BY_NAME: dict[str, Register] = {r.name: r for r in REGISTERS}
BY_ADDR: dict[int, Register] = {r.addr: r for r in REGISTERS}

ERR_BAD_FRAME = 1 << 0
ERR_BAD_REQUEST = 1 << 1

# ---- the fabric's own registers (board-side only) -----------------------------------------------------------
SEQ_WRITE_WEIGHTS = 1
SEQ_READ_WEIGHTS = 2
SEQ_MAC = 3
SEQ_MAC_RAW = 4
SEQ_OPS = {
    SEQ_WRITE_WEIGHTS: "WRITE_WEIGHTS", SEQ_READ_WEIGHTS: "READ_WEIGHTS", SEQ_MAC: "MAC", SEQ_MAC_RAW: "MAC_RAW"
}
"""Sequencer operation codes written to SEQ_START."""

SEQ_BUSY = 1 << 0
SEQ_DONE = 1 << 1
SEQ_REFUSED = 1 << 2
STORAGE_CODES = {"twos": 0, "offset": 1, "unsigned": 2}
"""G_WEIGHT_STORAGE values."""


def _geometry(name: str, addr: int, param: str, doc: str) -> Register:
    return Register(name, addr, "ro", 0, doc, "const", reset_param=param)


FABRIC_REGISTERS: tuple[Register, ...] = (
    Register("SEQ_START", 0x40, "wo", 0, "Start a run: bits 2:0 the operation (SEQ_OPS).", "strobe"),
    Register("SEQ_STATUS", 0x41, "ro", 0,
             "Bit 0 busy; bit 1 done (the last run finished); bit 2 refused (the last start was invalid).",
             "input"),
    Register("SEQ_FIRST", 0x42, "rw", 0,
             "First weight row (WRITE/READ_WEIGHTS) or first row group (MAC, MAC_RAW)."),
    Register("SEQ_SPAN", 0x43, "rw", 0, "Row groups a MAC or MAC_RAW run converts."),
    Register("SEQ_COUNT", 0x44, "rw", 0, "Weight rows or input vectors in the next run."),
    Register("SOFT_RESET", 0x45, "wo", 0,
             "Bit 0: registers, flags and counters to their reset values; a run in progress stops.", "strobe"),
    Register("ERR_SET", 0x46, "wo", 0, "Sets the written bits in ERR_FLAGS (errors the processor saw).", "strobe"),
    Register("CONV_LO", 0x47, "ro", 0, "Column conversions since reset, low 32 bits.", "input"),
    Register("CONV_HI", 0x48, "ro", 0, "Column conversions since reset, high 32 bits.", "input"),
    Register("RUN_CYCLES", 0x49, "ro", 0, "Cycles the last run took (DECODE to its last state).", "input"),
    _geometry("BUILD_ID", 0x4A, "BUILD_ID", "Identifies the build: a hash of its parameters."),
    _geometry("G_ROWS", 0x50, "ROWS", "MacroSpec.rows."),
    _geometry("G_COLS", 0x51, "COLS", "MacroSpec.cols."),
    _geometry("G_WEIGHT_BITS", 0x52, "WEIGHT_BITS", "MacroSpec.weight_bits."),
    _geometry("G_WEIGHT_STORAGE", 0x53, "WEIGHT_STORAGE", "MacroSpec.weight_storage (STORAGE_CODES)."),
    _geometry("G_CELL_BITS", 0x54, "CELL_BITS", "MacroSpec.cell_bits."),
    _geometry("G_INPUT_BITS", 0x55, "INPUT_BITS", "MacroSpec.input_bits."),
    _geometry("G_INPUT_SLICE_BITS", 0x56, "SLICE_BITS", "MacroSpec.input_slice_bits."),
    _geometry("G_ROWS_PER_CONV", 0x57, "ROWS_PER_CONV", "MacroSpec.rows_per_conversion."),
    _geometry("G_ADC_BITS", 0x58, "ADC_BITS", "MacroSpec.adc_bits."),
    _geometry("G_ADC_FULL_SCALE", 0x59, "ADC_FULL_SCALE", "MacroSpec.adc_full_scale."),
    _geometry("G_CLOCK_HZ", 0x5A, "CLOCK_HZ", "MacroSpec.clock_hz."),
    _geometry("G_BUS_BITS", 0x5B, "BUS_BITS", "Width of the buffers' sequencer port, bits."),
    _geometry("G_IN_WORDS", 0x5C, "IN_WORDS", "Input buffer depth, bus words."),
    _geometry("G_OUT_WORDS", 0x5D, "OUT_WORDS", "Output buffer depth, bus words."),
    _geometry("G_VDD_MIN_MV", 0x5E, "VDD_MIN_MV", "Lowest VDD_MV the processor accepts, mV."),
    _geometry("G_VDD_MAX_MV", 0x5F, "VDD_MAX_MV", "Highest VDD_MV the processor accepts, mV."),
    _geometry("G_TEMP_MIN_CC", 0x60, "TEMP_MIN_CC", "Lowest TEMP_CC accepted, centi-degC (signed)."),
    _geometry("G_TEMP_MAX_CC", 0x61, "TEMP_MAX_CC", "Highest TEMP_CC accepted, centi-degC (signed)."),
)
FABRIC_BY_NAME: dict[str, Register] = {r.name: r for r in FABRIC_REGISTERS}

REG_WINDOW_BYTES = 0x1000
"""Registers occupy byte offsets 0 .. REG_WINDOW_BYTES-1 of the fabric's AXI4-Lite port."""
IN_BUF_BASE = 0x40000
"""Byte offset of the input buffer (vectors for MAC, weight rows for WRITE_WEIGHTS); write-only."""
OUT_BUF_BASE = 0x80000
"""Byte offset of the output buffer (MAC outputs, MAC_RAW codes, weight rows read back); read-only."""
BUF_WINDOW_BYTES = 0x40000
"""Bytes each buffer window spans (a buffer's depth times its width must fit)."""
AXI_ADDR_BITS = 20


def byte_offset(name: str) -> int:
    """The AXI4-Lite byte offset of a host or fabric register, by name."""
    reg = BY_NAME.get(name) or FABRIC_BY_NAME.get(name)
    if reg is None:
        raise ConfigError(f"unknown register {name!r}")
    return 4 * reg.addr


def resolve(reg: str | int) -> Register:
    """A register by name (case-insensitive) or address; ConfigError naming the known ones otherwise."""
    if isinstance(reg, str):
        r = BY_NAME.get(reg.upper())
        if r is None:
            try:
                r = BY_ADDR.get(int(reg, 0))
            except ValueError:
                r = None
    else:
        r = BY_ADDR.get(int(reg))
    if r is None:
        raise ConfigError(f"unknown register {reg!r}; known: {', '.join(BY_NAME)}")
    return r


def signed32(value: int) -> int:
    """A 32-bit register word read as two's complement (TEMP_CC holds signed centi-degrees)."""
    return value - (1 << 32) if value & 0x8000_0000 else value


def host_register(addr: int) -> Register:
    """The host-visible register at word address ``addr``; DeviceError (BAD_REGISTER) when there is none."""
    reg = BY_ADDR.get(addr)
    if reg is None:
        raise DeviceError(f"no register at address 0x{addr:02x}", status=Status.BAD_REGISTER)
    return reg


def check_write(addr: int, value: int, *, vdd_range_mv: tuple[int, int], temp_range_cc: tuple[int, int]) -> Register:
    """The register a host writes ``value`` to, after the checks every device end makes: it exists, is writable,
    ``value`` is a 32-bit word, and VDD_MV (mV) and TEMP_CC (signed centi-degC) lie in the chip's operating ranges.

    Raises:
        DeviceError: BAD_REGISTER, READ_ONLY or BAD_ARGUMENT, naming the register and the limit.
    """
    reg = host_register(addr)
    if reg.access == "ro":
        raise DeviceError(f"register {reg.name} (0x{addr:02x}) is read-only", status=Status.READ_ONLY)
    if not 0 <= value <= 0xFFFFFFFF:
        raise DeviceError(f"{reg.name}: value {value} is not a 32-bit word", status=Status.BAD_ARGUMENT)
    if reg.name == "VDD_MV" and not vdd_range_mv[0] <= value <= vdd_range_mv[1]:
        raise DeviceError(f"VDD_MV={value} is outside the operating range {vdd_range_mv[0]}..{vdd_range_mv[1]} mV",
                          status=Status.BAD_ARGUMENT)
    if reg.name == "TEMP_CC" and not temp_range_cc[0] <= signed32(value) <= temp_range_cc[1]:
        raise DeviceError(f"TEMP_CC={signed32(value)} is outside {temp_range_cc[0]}..{temp_range_cc[1]} centi-degC",
                          status=Status.BAD_ARGUMENT)
    return reg

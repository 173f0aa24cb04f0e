"""The controller's register map: the one source; the bitstream manifest and docs are derived from it.

Registers are 32 bits wide. Access: ``ro`` read-only, ``rw`` read-write, ``w1c`` write 1 to clear.
"""

from __future__ import annotations

from dataclasses import dataclass

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import PROTOCOL_VERSION

REGMAP_VERSION = 2
"""2: NOISE_SEED added."""
ID_MAGIC = 0xC1A0_5A3D


@dataclass(frozen=True)
class Register:
    """One named 32-bit register."""

    name: str
    addr: int
    access: str
    reset: int
    doc: str


REGISTERS: tuple[Register, ...] = (
    Register("ID", 0x00, "ro", ID_MAGIC, "Constant identifying a cimlab controller (0xC1A05A3D)."),
    Register("PROTO", 0x01, "ro", PROTOCOL_VERSION, "Protocol version the controller speaks."),
    Register("REGMAP", 0x02, "ro", REGMAP_VERSION, "Version of this register map."),
    Register("SCRATCH", 0x03, "rw", 0, "Free register for link and bring-up tests."),
    Register("CTRL", 0x04, "rw", 0, "Bit 0: clear counters (self-clearing)."),
    Register("ERR_FLAGS", 0x05, "w1c", 0, "Sticky error flags: bit 0 bad frame, bit 1 bad request."),
    Register("VDD_MV", 0x06, "rw", 800, "Macro supply voltage setpoint, millivolts."),
    Register("TEMP_CC", 0x07, "rw", 2500, "Die temperature, centi-degrees Celsius."),
    Register("CYCLES_LO", 0x08, "ro", 0, "Cycle counter since reset, low 32 bits."),
    Register("CYCLES_HI", 0x09, "ro", 0, "Cycle counter since reset, high 32 bits."),
    Register("OPS", 0x0A, "ro", 0, "MAC vectors processed since reset (low 32 bits)."),
    Register(
        "NOISE_SEED", 0x0B, "rw", 0,
        "Key of a twin's per-conversion random stream: writing it restarts the stream at the key, so the codes that"
        " follow depend only on the key and the requests since (a sweep writes one per batch; a resumed sweep then"
        " repeats its codes). Held across RESET. A chip's noise is physical: it stores the value and nothing else.",
    ),
)

BY_NAME: dict[str, Register] = {r.name: r for r in REGISTERS}
BY_ADDR: dict[int, Register] = {r.addr: r for r in REGISTERS}

ERR_BAD_FRAME = 1 << 0
ERR_BAD_REQUEST = 1 << 1


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

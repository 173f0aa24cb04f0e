"""cimlab: hardware-in-the-loop for SRAM computing-in-memory macros, with a twin that speaks the board's bytes.

::

    from cimlab import Chip, open_link, MacroSpec, CimError

    cimlab                  (host/)            CLI, driver, links, characterization, training, deploy, bench
    cimlab.firmware_bridge  (firmware_bridge/) the wire contract both ends share, and the device-side bridge
    cimlab.chip_sim         (chip_sim/)        the twin

The names below are imported on first use, so ``import cimlab.firmware_bridge`` on a board, or ``cimlab info``,
loads nothing it does not need (no torch, no host code).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC: dict[str, str] = {
    "Chip": "cimlab.driver",
    "Hello": "cimlab.driver",
    "open_link": "cimlab.links",
    "Link": "cimlab.links",
    "MacErrorModel": "cimlab.errmodel",
    "MacroSpec": "cimlab.firmware_bridge.spec",
    "ArtifactError": "cimlab.firmware_bridge.errors",
    "BackendUnavailable": "cimlab.firmware_bridge.errors",
    "CimError": "cimlab.firmware_bridge.errors",
    "CimTimeoutError": "cimlab.firmware_bridge.errors",
    "ConfigError": "cimlab.firmware_bridge.errors",
    "DeviceError": "cimlab.firmware_bridge.errors",
    "LinkError": "cimlab.firmware_bridge.errors",
    "PayloadError": "cimlab.firmware_bridge.errors",
    "ShapeError": "cimlab.firmware_bridge.errors",
    "VersionMismatch": "cimlab.firmware_bridge.errors",
}
"""public name -> the module that defines it."""

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from cimlab.driver import Chip, Hello
    from cimlab.errmodel import MacErrorModel
    from cimlab.firmware_bridge.errors import (
        ArtifactError,
        BackendUnavailable,
        CimError,
        CimTimeoutError,
        ConfigError,
        DeviceError,
        LinkError,
        PayloadError,
        ShapeError,
        VersionMismatch,
    )
    from cimlab.firmware_bridge.spec import MacroSpec
    from cimlab.links import Link, open_link


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cimlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

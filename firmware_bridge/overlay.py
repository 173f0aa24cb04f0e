"""The board's overlays: ``bitstreams/manifest.json`` checked before anything is loaded, then the controller.

Runs on the board (Python 3.10, numpy < 2, no torch, no host code). ``open_board(name)`` looks the overlay up in
the manifest and refuses to go on when it is not listed (ConfigError, naming the ones that are), when its
register map version differs from this software's (VersionMismatch), or when its ``.bit`` or ``.hwh`` file is
missing or its SHA-256 differs from the one listed (ArtifactError; a checksum is verified only when one is listed).
It then loads the overlay with ``pynq``, checks that the fabric's BUILD_ID is the manifest's, and returns a
``FabricController`` over the controller IP's ``pynq.MMIO``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cimlab.firmware_bridge.board import EnergyModel, FabricController, open_pynq_overlay
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError, VersionMismatch
from cimlab.firmware_bridge.registers import REGMAP_VERSION, byte_offset

BITSTREAMS_DIR = Path(__file__).resolve().parents[1] / "bitstreams"
"""The repository's bitstreams/ folder (manifest.json and overlay files)."""
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class OverlayEntry:
    """One overlay as the manifest describes it.

    Attributes:
        name: overlay name (``pynq://OVERLAY``, ``cimlab board serve --overlay``).
        file: bitstream file name, relative to the manifest's folder.
        sha256: lower-case hex SHA-256 of the bitstream, or None when not yet recorded.
        hwh: hardware handoff file name (pynq reads it next to the .bit), or None.
        hwh_sha256: its SHA-256, or None.
        regmap_version: register map version the fabric implements.
        profile: the twin profile whose parameters the build used (``cimlab.chip_sim.rtl.rtl_parameters``).
        build_id: the fabric's BUILD_ID register for that build, or None when not yet recorded.
        ctrl: name of the controller's IP in the overlay (its AXI4-Lite port).
        description: free text.
    """

    name: str
    file: str
    sha256: str | None
    hwh: str | None
    hwh_sha256: str | None
    regmap_version: int
    profile: str
    build_id: int | None
    ctrl: str
    description: str = ""


def _field(
    entry: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, optional: bool = False
) -> Any:
    if key not in entry or entry[key] is None:
        if optional:
            return None
        raise ArtifactError(f"{where}: missing field {key!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ArtifactError(f"{where}: field {key!r} has type {type(value).__name__}, expected {kind}")
    return value


def _file_name(value: str | None, key: str, where: str) -> str | None:
    if value is not None and (not value or Path(value).name != value):
        raise ArtifactError(f"{where}: {key}={value!r} must be a plain file name inside the manifest's folder")
    return value


def _hash(value: str | None, key: str, where: str) -> str | None:
    if value is not None and not _SHA256.match(value):
        raise ArtifactError(f"{where}: {key} must be 64 lower-case hex digits or null, got {value!r}")
    return value


def _entry(raw: Any, where: str) -> OverlayEntry:
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: must be an object")
    name = _field(raw, "name", str, where)
    where = f"{where} ({name!r})"
    interfaces = _field(raw, "interfaces", dict, where)
    build_id = _field(raw, "build_id", int, where, optional=True)
    if build_id is not None and not 0 <= build_id < 2**32:
        raise ArtifactError(f"{where}: build_id={build_id} is not a 32-bit value")
    return OverlayEntry(
        name=name,
        file=_file_name(_field(raw, "file", str, where), "file", where) or "",
        sha256=_hash(_field(raw, "sha256", str, where, optional=True), "sha256", where),
        hwh=_file_name(_field(raw, "hwh", str, where, optional=True), "hwh", where),
        hwh_sha256=_hash(_field(raw, "hwh_sha256", str, where, optional=True), "hwh_sha256", where),
        regmap_version=_field(raw, "regmap_version", int, where),
        profile=_field(raw, "profile", str, where),
        build_id=build_id,
        ctrl=_field(interfaces, "ctrl", str, f"{where} interfaces"),
        description=_field(raw, "description", str, where, optional=True) or "",
    )


def load_manifest(directory: Path | str = BITSTREAMS_DIR) -> dict[str, OverlayEntry]:
    """The overlays listed in ``directory/manifest.json``, by name; ArtifactError when it is unreadable."""
    path = Path(directory) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"bitstream manifest {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"bitstream manifest {path} is unreadable: {err}") from err
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path}: the top level must be an object")
    version = doc.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ArtifactError(f"{path}: manifest_version {version!r} is not {MANIFEST_VERSION}")
    overlays = doc.get("overlays")
    if not isinstance(overlays, list):
        raise ArtifactError(f"{path}: 'overlays' must be a list")
    out: dict[str, OverlayEntry] = {}
    for i, raw in enumerate(overlays):
        entry = _entry(raw, f"{path} overlays[{i}]")
        if entry.name in out:
            raise ArtifactError(f"{path}: overlay {entry.name!r} is listed twice")
        out[entry.name] = entry
    return out


def sha256_file(path: Path | str) -> str:
    """Lower-case hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_overlay(name: str, directory: Path | str = BITSTREAMS_DIR) -> tuple[OverlayEntry, Path]:
    """Check overlay ``name`` against the manifest and return its entry and bitstream path (see the module doc)."""
    directory = Path(directory)
    overlays = load_manifest(directory)
    entry = overlays.get(name)
    if entry is None:
        known = ", ".join(sorted(overlays)) or "none"
        raise ConfigError(f"overlay {name!r} is not in {directory / MANIFEST_NAME} (known: {known})")
    if entry.regmap_version != REGMAP_VERSION:
        raise VersionMismatch(
            f"overlay {name!r} implements register map version {entry.regmap_version}; this software expects"
            f" {REGMAP_VERSION}"
        )
    for file_name, expected in ((entry.file, entry.sha256), (entry.hwh, entry.hwh_sha256)):
        if file_name is None:
            continue
        path = directory / file_name
        if not path.is_file():
            raise ArtifactError(
                f"overlay {name!r}: {path} is missing; build the overlay and copy the file there"
                " (see bitstreams/README.md)"
            )
        if expected is not None:
            actual = sha256_file(path)
            if actual != expected:
                raise ArtifactError(
                    f"overlay {name!r}: {path} has SHA-256 {actual}, the manifest lists {expected}"
                )
    return entry, directory / entry.file


def open_board(
    name: str,
    directory: Path | str = BITSTREAMS_DIR,
    *,
    ip: str | None = None,
    chip_id: str = "board",
    energy: EnergyModel | None = None,
) -> FabricController:
    """Check and load overlay ``name``, and return the controller over its fabric (see the module docstring)."""
    entry, bitfile = check_overlay(name, directory)
    _, bus = open_pynq_overlay(str(bitfile), ip or entry.ctrl)
    build = bus.read32(byte_offset("BUILD_ID"))
    if entry.build_id is not None and build != entry.build_id:
        raise ArtifactError(
            f"overlay {name!r}: the fabric reports BUILD_ID 0x{build:08x}, the manifest lists"
            f" 0x{entry.build_id:08x}"
        )
    return FabricController(bus, chip_id=chip_id, energy=energy, bitstream_id=f"{name}-{build:08x}")

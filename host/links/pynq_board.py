# URL format: pynq://OVERLAY[?dma=NAME&dir=PATH]
#
#   pynq://cimlab_ctrl                 load overlay "cimlab_ctrl" as described in bitstreams/manifest.json
#   pynq://cimlab_ctrl?dma=axi_dma_1   use another AXI DMA instance of the overlay
#
# Options:
#   dma=NAME    the overlay's AXI DMA IP carrying the frames (default: the manifest's interfaces.dma)
#   dir=PATH    folder holding manifest.json and the .bit/.hwh files (default: the repository's bitstreams/)
#
# Needs the optional `pynq` package (pip install 'cimlab[board]', on the board).
"""A PYNQ board: the controller in the fabric, its frames through an AXI DMA.

Before anything is loaded the overlay is checked against ``bitstreams/manifest.json``: the entry must exist,
speak this protocol version and register map version, its files must be present, and their SHA-256 must match
where the manifest lists one. ``write`` copies the bytes into a ``pynq.allocate`` send buffer and runs
``dma.sendchannel.transfer`` until the channel is idle again, within the write deadline. One receive into a
buffer of a whole frame is always posted on ``dma.recvchannel``; ``read`` polls it until the deadline (the
controller ends each reply frame with TLAST, which completes the receive).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from cimlab.firmware_bridge.errors import (
    ArtifactError,
    BackendUnavailable,
    CimTimeoutError,
    ConfigError,
    LinkError,
    VersionMismatch,
)
from cimlab.firmware_bridge.frame import MAX_PAYLOAD_LIMIT, OVERHEAD, PROTOCOL_VERSION
from cimlab.firmware_bridge.registers import REGMAP_VERSION
from cimlab.links.base import Link
from cimlab.links.url import parse_params, reject_unknown

BITSTREAMS_DIR = Path(__file__).resolve().parents[2] / "bitstreams"
"""The repository's bitstreams/ folder (manifest.json and overlay files)."""
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_POLL_MIN_S = 20e-6
_POLL_MAX_S = 1e-3


@dataclass(frozen=True)
class OverlayEntry:
    """One overlay as the manifest describes it.

    Attributes:
        name: overlay name (the URL's OVERLAY).
        file: bitstream file name, relative to the manifest's folder.
        sha256: lower-case hex SHA-256 of the bitstream, or None when not yet recorded.
        hwh: hardware handoff file name (pynq reads it next to the .bit), or None.
        hwh_sha256: its SHA-256, or None.
        protocol_version: frame protocol version the controller speaks.
        regmap_version: register map version the controller implements.
        max_payload: largest frame payload the controller accepts and sends, bytes.
        dma: name of the AXI DMA IP carrying the frames.
        description: free text.
    """

    name: str
    file: str
    sha256: str | None
    hwh: str | None
    hwh_sha256: str | None
    protocol_version: int
    regmap_version: int
    max_payload: int
    dma: str
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
        where = f"{path} overlays[{i}]"
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: must be an object")
        name = _field(raw, "name", str, where)
        where = f"{path} overlay {name!r}"
        if name in out:
            raise ArtifactError(f"{where}: listed twice")
        interfaces = _field(raw, "interfaces", dict, where)
        max_payload = _field(raw, "max_payload", int, where)
        if not OVERHEAD <= max_payload <= MAX_PAYLOAD_LIMIT:
            raise ArtifactError(f"{where}: max_payload={max_payload} is outside {OVERHEAD}..{MAX_PAYLOAD_LIMIT}")
        out[name] = OverlayEntry(
            name=name,
            file=_file_name(_field(raw, "file", str, where), "file", where) or "",
            sha256=_hash(_field(raw, "sha256", str, where, optional=True), "sha256", where),
            hwh=_file_name(_field(raw, "hwh", str, where, optional=True), "hwh", where),
            hwh_sha256=_hash(_field(raw, "hwh_sha256", str, where, optional=True), "hwh_sha256", where),
            protocol_version=_field(raw, "protocol_version", int, where),
            regmap_version=_field(raw, "regmap_version", int, where),
            max_payload=max_payload,
            dma=_field(interfaces, "dma", str, f"{where} interfaces"),
            description=_field(raw, "description", str, where, optional=True) or "",
        )
    return out


def sha256_file(path: Path | str) -> str:
    """Lower-case hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_overlay(name: str, directory: Path | str = BITSTREAMS_DIR) -> tuple[OverlayEntry, Path]:
    """Check overlay ``name`` against the manifest and return its entry and bitstream path.

    Raises ConfigError for an overlay the manifest does not list, VersionMismatch when its protocol or register
    map version differs from this host's, and ArtifactError for a missing file or a checksum mismatch.
    """
    directory = Path(directory)
    overlays = load_manifest(directory)
    entry = overlays.get(name)
    if entry is None:
        known = ", ".join(sorted(overlays)) or "none"
        raise ConfigError(f"overlay {name!r} is not in {directory / MANIFEST_NAME} (known: {known})")
    if entry.protocol_version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"overlay {name!r} speaks protocol version {entry.protocol_version};"
            f" this host speaks {PROTOCOL_VERSION}"
        )
    if entry.regmap_version != REGMAP_VERSION:
        raise VersionMismatch(
            f"overlay {name!r} implements register map version {entry.regmap_version};"
            f" this host expects {REGMAP_VERSION}"
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


def import_pynq() -> ModuleType:
    """The ``pynq`` module, or BackendUnavailable saying how to get it."""
    try:
        return importlib.import_module("pynq")
    except (ImportError, OSError, RuntimeError) as err:
        raise BackendUnavailable(
            f"the pynq:// link needs the pynq package ({err}); install cimlab[board] on the board"
        ) from err


class PynqLink(Link):
    """Frames through an AXI DMA of a PYNQ overlay.

    Args:
        url: ``pynq://OVERLAY[?dma=NAME&dir=PATH]``.
        timeout: seconds; the base of the write deadline.
    """

    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        super().__init__(url, timeout=timeout)
        where = f"pynq link {url!r}"
        parts = urlsplit(url)
        if parts.scheme.lower() != "pynq":
            raise ConfigError(f"{where}: scheme must be pynq://")
        name = parts.netloc
        if not name or parts.path not in ("", "/"):
            raise ConfigError(f"{where}: the format is pynq://OVERLAY[?dma=NAME]")
        params = parse_params(parts.query, where)
        reject_unknown(params, ("dma", "dir"), where)
        pynq = import_pynq()
        entry, bitfile = check_overlay(name, params.get("dir", BITSTREAMS_DIR))
        self.entry = entry
        self.dma_name = params.get("dma", entry.dma)
        self._txbuf: Any = None
        self._rxbuf: Any = None
        try:
            self.overlay = pynq.Overlay(str(bitfile))
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise LinkError(f"cannot load overlay {name!r} from {bitfile}: {err}") from err
        try:
            dma = getattr(self.overlay, self.dma_name)
        except AttributeError:
            ips = ", ".join(sorted(getattr(self.overlay, "ip_dict", {}))) or "none"
            raise ArtifactError(f"overlay {name!r} has no IP {self.dma_name!r} (it has: {ips})") from None
        self._send = getattr(dma, "sendchannel", None)
        self._recv = getattr(dma, "recvchannel", None)
        if self._send is None or self._recv is None:
            raise ArtifactError(
                f"overlay {name!r}: {self.dma_name!r} is not an AXI DMA with send and receive channels"
            )
        if not hasattr(self._recv, "transferred"):
            raise BackendUnavailable("this pynq's DMA channels do not report 'transferred'; install pynq >= 3")
        size = entry.max_payload + OVERHEAD
        try:
            self._txbuf = pynq.allocate(shape=(size,), dtype=np.uint8)
            self._rxbuf = pynq.allocate(shape=(size,), dtype=np.uint8)
            self._recv.transfer(self._rxbuf)
        except (OSError, ValueError, RuntimeError, MemoryError) as err:
            self._free()
            raise LinkError(f"cannot set up DMA buffers of {size} bytes on {name!r}: {err}") from err
        self._pending = b""

    def _wait_idle(self, channel: Any, deadline: float, what: str) -> bool:
        delay = _POLL_MIN_S
        while True:
            try:
                if channel.idle:
                    return True
                if getattr(channel, "error", False):
                    raise LinkError(f"{self.url!r}: DMA {what} channel reports an error")
            except (OSError, RuntimeError) as err:
                raise LinkError(f"{self.url!r}: DMA {what} channel failed: {err}") from err
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, _POLL_MAX_S)

    def _write(self, data: memoryview) -> None:
        limit = self.write_deadline(len(data))
        deadline = time.monotonic() + limit
        cap = len(self._txbuf)
        for off in range(0, len(data), cap):
            chunk = data[off : off + cap]
            n = len(chunk)
            try:
                self._txbuf[:n] = np.frombuffer(chunk, dtype=np.uint8)
                self._send.transfer(self._txbuf, nbytes=n)
            except (OSError, ValueError, RuntimeError) as err:
                raise LinkError(f"DMA send of {n} bytes on {self.url!r} failed: {err}") from err
            if not self._wait_idle(self._send, deadline, "send"):
                raise CimTimeoutError(
                    f"DMA send on {self.url!r} did not finish within {limit:.3g} s"
                    f" ({off} of {len(data)} bytes sent); the controller is not taking data"
                )
            try:
                self._send.wait()
            except (OSError, RuntimeError) as err:
                raise LinkError(f"DMA send on {self.url!r} failed: {err}") from err

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while not self._pending:
            if not self._wait_idle(self._recv, deadline, "receive"):
                return b""
            try:
                self._recv.wait()
                n = int(self._recv.transferred)
                self._pending = bytes(self._rxbuf[:n])
                self._recv.transfer(self._rxbuf)
            except (OSError, ValueError, RuntimeError) as err:
                raise LinkError(f"DMA receive on {self.url!r} failed: {err}") from err
        out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return out

    def _free(self) -> None:
        for buf in (self._txbuf, self._rxbuf):
            if buf is not None:
                buf.freebuffer()
        self._txbuf = self._rxbuf = None

    def _close(self) -> None:
        try:
            if not self._recv.idle:
                self._recv.stop()
        except (OSError, RuntimeError) as err:
            raise LinkError(f"cannot stop the DMA receive on {self.url!r}: {err}") from err
        finally:
            self._free()

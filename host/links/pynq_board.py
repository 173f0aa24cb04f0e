# URL format: pynq://OVERLAY[?dir=PATH&ip=NAME&max_payload=BYTES]
#
#   pynq://cimlab_ctrl                  on the board: overlay "cimlab_ctrl" as bitstreams/manifest.json lists it
#   pynq://cimlab_ctrl?ip=cimlab_ctrl_1 another controller IP of the overlay
#
# Options:
#   dir=PATH            folder of manifest.json and the .bit/.hwh files (default: the repository's bitstreams/)
#   ip=NAME             the controller IP in the overlay (default: the manifest's interfaces.ctrl)
#   max_payload=BYTES   largest frame payload the bridge accepts and sends, 256..16777216 (default 65536)
#
# Runs on the board (pip install 'cimlab[board]' there); from a PC, reach a board with `cimlab board serve` on it
# (tcp://board:PORT or its UART).
"""A PYNQ board in this process: the device end of the protocol over the fabric, with no wire in between.

The overlay is checked against ``bitstreams/manifest.json`` before anything is loaded
(``cimlab.firmware_bridge.overlay``), then loaded; the bytes written go to a ``Bridge`` over a
``cimlab.firmware_bridge.board.FabricController`` on the controller IP's ``pynq.MMIO``, exactly what
``cimlab board serve`` puts behind a TCP port or the UART, in the same in-process loop as ``sim://``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import DEFAULT_MAX_PAYLOAD, MAX_PAYLOAD_LIMIT
from cimlab.firmware_bridge.overlay import BITSTREAMS_DIR, check_overlay, load_manifest, open_board, sha256_file
from cimlab.links.base import Link
from cimlab.links.sim import MIN_PAYLOAD, SimLink
from cimlab.links.url import int_param, parse_params, reject_unknown

__all__ = ["BITSTREAMS_DIR", "PynqLink", "check_overlay", "load_manifest", "sha256_file"]


class PynqLink(Link):
    """The board's device end in this process (see the module docstring).

    Args:
        url: ``pynq://OVERLAY[?dir=PATH&ip=NAME&max_payload=BYTES]``.
        timeout: seconds (kept for the Link contract; writes here never wait on a line).
    """

    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        super().__init__(url, timeout=timeout)
        where = f"pynq link {url!r}"
        parts = urlsplit(url)
        if parts.scheme.lower() != "pynq":
            raise ConfigError(f"{where}: scheme must be pynq://")
        name = parts.netloc
        if not name or parts.path not in ("", "/"):
            raise ConfigError(f"{where}: the format is pynq://OVERLAY[?dir=PATH&ip=NAME]")
        params = parse_params(parts.query, where)
        reject_unknown(params, ("dir", "ip", "max_payload"), where)
        max_payload = int_param(params, "max_payload", MIN_PAYLOAD, MAX_PAYLOAD_LIMIT, DEFAULT_MAX_PAYLOAD, where)
        self.controller = open_board(
            name, params.get("dir", BITSTREAMS_DIR), ip=params.get("ip"), chip_id=f"pynq-{name}"
        )
        controller = self.controller
        self._inner = SimLink(
            f"sim://?max_payload={max_payload}",
            timeout=timeout,
            make_controller=lambda profile, seed, overrides: controller,
        )

    def _write(self, data: memoryview) -> None:
        self._inner.write(data)

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def _close(self) -> None:
        self._inner.close()

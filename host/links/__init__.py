"""Byte links by URL: one factory, a table of backends imported lazily, and two wrappers.

::

    sim://?profile=NAME&seed=N&max_payload=BYTES&KEY=VALUE   the twin in-process, through real frames
    tcp://HOST:PORT[?baud=B]                                 raw TCP (e.g. `cimlab sim serve --tcp`)
    pynq://OVERLAY[?dma=NAME&dir=PATH]                       a PYNQ board's AXI DMA (needs cimlab[board])
    /dev/ttyUSB0[?baud=N], /dev/pts/5, COM3                  serial devices
    socket://, rfc2217://, spy://, loop://, alt://, ...      any other pyserial URL

    ...#drop=P&flip=P&insert=P&dup=P&truncate=P&stall=P&stall_s=S&fault_seed=N   wrap in a FaultLink
    ...#rate=BAUD                                                                 pace like a UART (RateLink)

Each backend module opens with a comment giving its URL format and options.
"""

from __future__ import annotations

import importlib
import importlib.util

import serial

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.links.base import Link, LinkStats, WrapperLink
from cimlab.links.fault import FaultConfig, FaultLink, FaultStats
from cimlab.links.rate import RATE_RANGE, RateLink
from cimlab.links.url import int_param, parse_params, reject_unknown, scheme_of, split_fragment

BACKENDS: dict[str, tuple[str, str]] = {
    "sim": ("cimlab.links.sim", "SimLink"),
    "tcp": ("cimlab.links.tcp", "TcpLink"),
    "pynq": ("cimlab.links.pynq_board", "PynqLink"),
    "serial": ("cimlab.links.serial_port", "SerialLink"),
}
"""scheme -> (module, class). ``serial`` takes device paths and every pyserial URL scheme not listed here."""

SERIAL_BACKEND = "serial"

__all__ = [
    "BACKENDS",
    "FaultConfig",
    "FaultLink",
    "FaultStats",
    "Link",
    "LinkStats",
    "RateLink",
    "WrapperLink",
    "backend_for",
    "open_link",
]


def _pyserial_scheme(scheme: str) -> bool:
    for package in serial.protocol_handler_packages:
        try:
            if importlib.util.find_spec(f"{package}.protocol_{scheme}") is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def backend_for(url: str) -> str:
    """The BACKENDS key that opens ``url`` (fragment ignored); ConfigError for an unknown scheme."""
    scheme = scheme_of(split_fragment(url)[0])
    if scheme is None:
        return SERIAL_BACKEND
    if scheme in BACKENDS and scheme != SERIAL_BACKEND:
        return scheme
    if scheme.isidentifier() and _pyserial_scheme(scheme):
        return SERIAL_BACKEND
    ours = ", ".join(f"{s}://" for s in BACKENDS if s != SERIAL_BACKEND)
    raise ConfigError(
        f"link {url!r}: unknown scheme {scheme!r}; use {ours}, a serial device path or a pyserial URL"
        " (socket://, rfc2217://, spy://, loop://, alt://, ...)"
    )


def _load(key: str) -> type[Link]:
    module, cls = BACKENDS[key]
    return getattr(importlib.import_module(module), cls)


def open_link(url: str, *, timeout: float = 1.0) -> Link:
    """Open the link that ``url`` names (see the module docstring), wrapped as its ``#fragment`` asks.

    Args:
        url: link URL.
        timeout: seconds > 0: the open/connect deadline and the base of every write deadline.

    Raises:
        ConfigError: a malformed URL, unknown scheme, option or value (the message names it).
        LinkError: the link could not be opened (the message gives the URL and the OS reason).
        BackendUnavailable: the backend's optional dependency is missing.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"link URL must be a non-empty string, got {url!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
        raise ConfigError(f"timeout={timeout!r} must be a finite number of seconds > 0")
    base, fragment = split_fragment(url)
    where = f"link {url!r} fragment"
    params = parse_params(fragment, where)
    reject_unknown(params, ("rate", *FaultConfig.FRAGMENT_KEYS), where)
    baud = int_param(params, "rate", *RATE_RANGE, 0, where) if "rate" in params else None
    params.pop("rate", None)
    faults = FaultConfig.from_params(params, where) if params else None
    link = _load(backend_for(base))(base, timeout=timeout)
    try:
        if baud is not None:
            link = RateLink(link, baud, url=url)
        if faults is not None:
            link = FaultLink(link, faults, url=url)
    except BaseException:
        link.close()
        raise
    if baud is None and faults is None:
        link.url = url
    return link

"""Small helpers to take link URLs apart; every failure is a ConfigError naming the part at fault."""

from __future__ import annotations

import math
import re
from urllib.parse import parse_qsl

from cimlab.firmware_bridge.errors import ConfigError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme_of(url: str) -> str | None:
    """The lower-cased scheme of ``scheme://...``, or None for a plain device path (``/dev/ttyUSB0``, ``COM3``)."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else None


def split_fragment(url: str) -> tuple[str, str]:
    """``base#fragment`` -> (base, fragment); the fragment configures wrappers."""
    base, _, fragment = url.partition("#")
    return base, fragment


def parse_params(text: str, where: str) -> dict[str, str]:
    """``k=v&k2=v2`` -> dict; a key given twice, a key without ``=value`` or an empty value is a ConfigError."""
    if not text:
        return {}
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError as err:
        raise ConfigError(f"{where}: cannot parse {text!r} as key=value&...: {err}") from err
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"{where}: key {key!r} is given twice")
        if value == "":
            raise ConfigError(f"{where}: key {key!r} has no value")
        out[key] = value
    return out


def reject_unknown(params: dict[str, str], known: tuple[str, ...], where: str) -> None:
    """ConfigError naming the unknown keys and the known ones."""
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")


def int_param(params: dict[str, str], key: str, lo: int, hi: int, default: int, where: str) -> int:
    """Integer option ``key`` in ``lo..hi`` (``default`` when absent)."""
    if key not in params:
        return default
    text = params[key]
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError(f"{where}: {key}={text!r} is not an integer (allowed {lo}..{hi})") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: {key}={value} is outside the allowed range {lo}..{hi}")
    return value


def float_param(params: dict[str, str], key: str, lo: float, hi: float, default: float, where: str) -> float:
    """Finite float option ``key`` in ``lo..hi`` (``default`` when absent)."""
    if key not in params:
        return default
    text = params[key]
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {key}={text!r} is not a number (allowed {lo:g}..{hi:g})") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {key}={text} is outside the allowed range {lo:g}..{hi:g}")
    return value

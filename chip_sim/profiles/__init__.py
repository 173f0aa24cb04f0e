"""Bundled twin profiles (the ``*.toml`` files beside this module) and loading of any profile file.

A profile is named either by a bundled name (``default``) or by a path to a TOML file; a path works wherever a
name does. A file may start from another profile with ``base = "NAME_OR_PATH"`` and change only some fields
(a relative base path, like a relative ``error_model`` path, is taken from the file's directory).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from cimlab.chip_sim.config import Profile, apply_overrides, profile_from_dict, read_toml
from cimlab.firmware_bridge.errors import ConfigError

__all__ = ["Profile", "list_profiles", "load_profile", "profile_from_toml"]

_MAX_BASE_DEPTH = 8
MAX_PROFILE_BYTES = 1 << 20
"""Largest profile file read, bytes (a profile is a few kB of TOML)."""


def _bundled() -> dict[str, Any]:
    root = resources.files(__name__)
    return {p.name[: -len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def list_profiles() -> list[tuple[str, str]]:
    """(name, one-line description) of every bundled profile, sorted by name."""
    out = []
    for name, res in sorted(_bundled().items()):
        data = read_toml(res.read_text(encoding="utf-8"), f"bundled profile {name!r}")
        out.append((name, str(data.get("description", ""))))
    return out


def _read_raw(name_or_path: str | os.PathLike, depth: int = 0) -> tuple[dict[str, Any], str, Path]:
    """The profile's dict with ``base`` merged in, its source text for errors, and its directory."""
    if depth > _MAX_BASE_DEPTH:
        raise ConfigError(f"profile base chain deeper than {_MAX_BASE_DEPTH} (a cycle?) at {name_or_path!s}")
    text_name = os.fspath(name_or_path)
    bundled = _bundled()
    if text_name in bundled and os.sep not in text_name and not text_name.endswith(".toml"):
        source = f"bundled profile {text_name!r}"
        data = read_toml(bundled[text_name].read_text(encoding="utf-8"), source)
        base_dir = Path.cwd()
        data.setdefault("name", text_name)
    else:
        path = Path(os.path.expanduser(text_name))
        if not path.is_file():
            known = ", ".join(sorted(bundled))
            raise ConfigError(f"profile {text_name!r} is neither a bundled profile ({known}) nor a readable file")
        source = f"profile file {str(path)!r}"
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ConfigError(f"{source}: {path.stat().st_size:,} bytes, more than a profile's {MAX_PROFILE_BYTES:,}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{source}: cannot read: {err}") from err
        data = read_toml(text, source)
        base_dir = path.resolve().parent
        data.setdefault("name", path.stem)
        if isinstance(data.get("error_model"), str) and data["error_model"]:
            em = Path(os.path.expanduser(data["error_model"]))
            data["error_model"] = str(em if em.is_absolute() else base_dir / em)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{source}: base must be a profile name or path, got {base!r}")
        base_path = Path(os.path.expanduser(base))
        if base not in bundled and not base_path.is_absolute():
            base = str(base_dir / base_path)
        merged, _, _ = _read_raw(base, depth + 1)
        for key, value in data.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        data = merged
    return data, source, base_dir


def load_profile(
    name_or_path: str | os.PathLike = "default",
    overrides: Mapping[str, str | int | float | bool] | None = None,
) -> Profile:
    """Load a bundled profile or a TOML file, apply ``overrides`` and validate.

    Raises:
        ConfigError: unknown profile, unreadable or invalid file, unknown key, out-of-range value (the
            message names the field and its allowed range).
    """
    data, source, base_dir = _read_raw(name_or_path)
    if overrides:
        overrides = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in overrides.items()}
        em = overrides.get("error_model")
        if isinstance(em, str) and em:  # a path given on the command line or in a URL is relative to the cwd
            overrides["error_model"] = os.path.abspath(os.path.expanduser(em))
        apply_overrides(data, overrides)
        source += " with overrides"
    return profile_from_dict(data, source=source, base_dir=base_dir)


def profile_from_toml(text: str, *, source: str = "profile text") -> Profile:
    """A Profile from TOML text (as ``Profile.to_toml`` writes; no ``base``)."""
    data = read_toml(text, source)
    if "base" in data:
        raise ConfigError(f"{source}: base is only allowed in profile files")
    return profile_from_dict(data, source=source, base_dir=Path.cwd())

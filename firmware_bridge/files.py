"""What every artifact writer shares: atomic replacement of a file, and the software version for provenance."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path


def package_version() -> str:
    """The installed cimlab version ("0+unknown" when run from an uninstalled tree)."""
    try:
        return metadata.version("cimlab")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block succeeds, sync it and rename it over ``target``.

    A reader sees either the old file or the whole new one, never a half-written one; on any error (Ctrl-C
    included) the temporary file is removed and ``target`` is untouched. The parent folder is created if missing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

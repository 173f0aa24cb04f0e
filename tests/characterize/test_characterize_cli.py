"""`cimlab characterize / fit / report`: kill -9 and Ctrl-C mid-sweep, resume, merging, plots, the supply."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from characterize_helpers import store_counts, sweep
from click.testing import CliRunner

from cimlab.characterize import STORE_NAME, PlanOptions
from cimlab.cli import cli
from cimlab.errmodel import MacErrorModel
from cimlab.instruments import sim_bench_yaml

QUIET = "sim://?profile=default&rows=64&noise_sigma_lsb=0"  # deterministic codes with the default's static errors
IDEAL = "sim://?profile=ideal&rows=64"
SWEEP = ["--link", QUIET, "--repeats", "900", "--batch-vectors", "4", "--seed", "3", "--no-progress"]
OPTIONS = PlanOptions(repeats=900, batch_vectors=4, seed=3)  # what SWEEP asks for
ROOT = Path(__file__).resolve().parents[2]


def done_batches(out: Path) -> int:
    """Committed batches, read through a read-only connection while the sweep writes."""
    path = out / STORE_NAME
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0  # the store is being created


def start(out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cimlab.cli", "characterize", *SWEEP, "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
    )


def wait_for(proc: subprocess.Popen[bytes], out: Path, batches: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = done_batches(out)
        if n >= batches:
            return n
        if proc.poll() is not None:
            pytest.fail(f"the sweep exited ({proc.returncode}) before {batches} batches: {proc.stderr.read()!r}")
        time.sleep(0.005)
    pytest.fail(f"fewer than {batches} batches after {timeout} s")


def finish(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err.decode(errors="replace")


def test_kill9_mid_sweep_then_resume_loses_and_doubles_nothing(tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    proc = start(cut)
    total = None
    try:
        wait_for(proc, cut, 3)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        finish(proc)
    first = done_batches(cut)
    # resume, kill again further on, then resume to the end
    proc = start(cut, "--resume")
    try:
        wait_for(proc, cut, first + 10)
    finally:
        proc.send_signal(signal.SIGKILL)
        finish(proc)
    second = done_batches(cut)
    proc = start(cut, "--resume", "--json")
    rc, err = finish(proc)
    assert rc == 0, err
    whole = sweep(QUIET, tmp_path / "whole", OPTIONS)
    total = whole.batches_total
    assert 3 <= first < second < total  # both kills landed mid-sweep
    np.testing.assert_array_equal(store_counts(cut), store_counts(tmp_path / "whole"))
    a = MacErrorModel.load(cut / "dmacem.npz")
    b = MacErrorModel.load(tmp_path / "whole" / "dmacem.npz")
    np.testing.assert_array_equal(a.counts, b.counts)


def test_ctrl_c_stops_between_batches_and_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(out)
    try:
        wait_for(proc, out, 3)
        proc.send_signal(signal.SIGINT)
        rc, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            finish(proc)
    assert rc == 130
    assert "stopped after" in err and "--resume" in err and "store is consistent" in err.replace("\n", " ")
    stopped_at = done_batches(out)
    assert not (out / "dmacem.npz").exists()
    result = CliRunner().invoke(cli, ["characterize", "--link", QUIET, "--out", str(out), "--resume", "--json",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["complete"] and summary["batches_done"] == stopped_at + summary["conversions_run"] // (
        4 * 4096)
    whole = sweep(QUIET, tmp_path / "whole", OPTIONS)
    assert whole.batches_total == summary["batches_total"]
    np.testing.assert_array_equal(store_counts(out), store_counts(tmp_path / "whole"))


def invoke(*args: str) -> tuple[int, str]:
    """Exit status and output of ``cimlab ARGS`` run in this process."""
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def flat(text: str) -> str:
    """Whitespace runs collapsed: rich wraps long messages at the console width."""
    return " ".join(text.split())


def test_existing_output_and_conflicting_resume_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, text = invoke("characterize", "--link", IDEAL, "--out", str(out), "--repeats", "3", "--no-progress")
    assert code == 0, text
    code, text = invoke("characterize", "--link", IDEAL, "--out", str(out), "--repeats", "3", "--no-progress")
    assert code == 1 and "already holds a measurement store; pass --resume" in flat(text)
    code, text = invoke("characterize", "--link", IDEAL, "--out", str(out), "--resume", "--repeats", "4")
    assert code == 1 and "plan option repeats: store 3 vs requested 4" in flat(text)
    code, text = invoke("characterize", "--link", "sim://?profile=ideal&rows=32", "--out", str(out), "--resume")
    assert code == 1 and "rows: store 64 vs chip 32" in flat(text)
    code, text = invoke("characterize", "--link", IDEAL, "--out", str(tmp_path / "x"), "--levels", "3,40")
    assert code == 2 and "--levels: [40] outside the allowed range 0..16" in flat(text)
    code, text = invoke("characterize", "--link", IDEAL, "--out", str(tmp_path / "y"), "--smu", "GPIB0::24::INSTR")
    assert code == 2 and "--smu needs --vdd" in flat(text)
    code, text = invoke("characterize", "--link", IDEAL, "--out", str(tmp_path / "z"), "--resume")
    assert code == 1 and "holds no measurement store" in flat(text)


def test_fit_merges_runs_of_one_spec_and_refuses_others(tmp_path: Path) -> None:
    a = sweep(IDEAL, tmp_path / "a", PlanOptions(repeats=5, seed=1))
    b = sweep(IDEAL, tmp_path / "b", PlanOptions(repeats=7, seed=2))
    code, text = invoke("fit", str(tmp_path / "a"), str(b.models[0]), "--out", str(tmp_path / "merged.npz"),
                        "--json")
    assert code == 0, text
    merged = MacErrorModel.load(tmp_path / "merged.npz")
    expected = MacErrorModel.load(a.models[0]).counts + MacErrorModel.load(b.models[0]).counts
    np.testing.assert_array_equal(merged.counts, expected)
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["conversions"] == int(expected.sum()) and summary["exact_code_rate"] == 1.0
    sweep("sim://?profile=ideal&rows=32", tmp_path / "c", PlanOptions(repeats=5))
    code, text = invoke("fit", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "bad.npz"))
    assert code == 1 and "different MacroSpecs" in flat(text) and "rows" in flat(text)
    assert not (tmp_path / "bad.npz").exists()
    code, text = invoke("fit", str(tmp_path / "a"), "--condition", "vdd900mV", "--out", str(tmp_path / "n.npz"))
    assert code == 2 and "no condition 'vdd900mV'" in flat(text)


def test_smu_on_pyvisa_sim_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    profile = tmp_path / "chip.toml"
    profile.write_text('base = "default"\n[spec]\nrows = 64\n', encoding="utf-8")
    code, text = invoke("characterize", "--link", "sim://?profile=default&rows=64", "--out", str(out),
                        "--repeats", "200", "--vdd", "0.6,0.8", "--smu", "GPIB0::24::INSTR", "--profile", str(profile),
                        "--visa-library", f"{sim_bench_yaml()}@sim", "--compliance", "0.02", "--no-progress")
    assert code == 0, text
    with sqlite3.connect(out / STORE_NAME) as conn:
        instrument = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'instrument'").fetchone()[0])
        states = conn.execute("SELECT vdd_mv FROM conditions ORDER BY cond_id").fetchall()
    conn.close()
    assert states == [(600,), (800,)]
    assert instrument["resource"] == "GPIB0::24::INSTR" and instrument["compliance_a"] == 0.02
    assert instrument["model"] == "keithley2400"
    code, text = invoke("report", str(out), "--json")
    assert code == 0, text
    files = [Path(f) for f in json.loads(text.strip().splitlines()[-1])["files"]]
    assert {"transfer.png", "heatmap.png", "errors.png", "columns.png", "summary.md"} <= {f.name for f in files}
    for f in files:
        assert f.stat().st_size > 1000
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report" / "summary.md").read_text()
    assert "twin-default-s0" in md and "estimated by the chip model" in md and "| vdd800mV | 800 |" in md
    assert os.path.exists(out / "dmacem_vdd600mV.npz")


def test_fit_refuses_to_merge_two_chips_unless_asked(tmp_path: Path) -> None:
    sweep("sim://?profile=ideal&rows=64&seed=1", tmp_path / "a", PlanOptions(repeats=3))
    sweep("sim://?profile=ideal&rows=64&seed=2", tmp_path / "b", PlanOptions(repeats=3))
    out = tmp_path / "m.npz"
    code, text = invoke("fit", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out))
    assert code == 1 and "2 chips ('twin-ideal-s1', 'twin-ideal-s2')" in flat(text) and "--allow-mixed-chips" in text
    assert not out.exists()
    code, text = invoke("fit", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--allow-mixed-chips",
                        "--json")
    assert code == 0, text
    assert json.loads(text.strip().splitlines()[-1])["chip_ids"] == ["twin-ideal-s1", "twin-ideal-s2"]
    assert MacErrorModel.load(out).meta["provenance"]["chip_ids"] == ["twin-ideal-s1", "twin-ideal-s2"]

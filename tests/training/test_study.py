"""The D-NAT study's quick mode runs every step end to end and reports its figures in the JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "reproduce_dnat.py"


@pytest.mark.slow
def test_quick_study_reports_recovery_bound_held_out_gap_and_step_ratio(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    s = out["summary"]
    case = out["cases"][0]
    assert case["error_model"] == "noise"
    if case["recovery"] is None:  # naive lost nothing (tiny quick run): nothing to bound
        assert case["bound"] is None and case["bound_noise"] is None and case["bound_systematic"] is None
    else:  # both parts of the chip's errors, the lower
        assert case["bound"] == min(case["bound_noise"], case["bound_systematic"])
    assert set(s["recovery"]) == {"noise/digits_mlp"} and "noise/digits_mlp" in s["bound"]
    assert 0.0 <= case["quant"] <= 1.0 and 0.0 <= case["naive"] <= 1.0
    held = out["population"][0]["held_out"]
    assert set(held) == {"chip2"}
    assert held["chip2"]["chip_trained"] == max(held["chip2"]["chip_trained_unplaced"],
                                                held["chip2"]["chip_trained_placed"])
    assert set(out["bounds"]) == {"epact", "pact", "fixed"}
    assert s["step_ratio"] > 0 and out["step_time"][0]["dnat_step_s"] > 0
    assert (tmp_path / "em-noise-s1" / "short").is_dir()  # the deploy step's short characterization

"""The NVM study's quick mode runs every row end to end (train, compile, bench on twins, estimate) and reports its
figures, targets and denominators in the JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "reproduce_nvm.py"


@pytest.mark.slow
def test_quick_nvm_study_reports_every_row_against_the_baseline(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    task = out["tasks"][0]
    rows = {r["key"]: r for r in task["rows"]}
    assert list(rows) == ["baseline", "per_layer_4bit", "uniform_4bit", "uniform_2bit_unipolar"]
    assert rows["baseline"]["relative"]["isaac-32nm"] == {"area": 1.0, "energy": 1.0}
    for r in rows.values():
        assert r["chip_equals_host_on_ideal_twin"]  # the chip path computes the host's ideal logits bit for bit
        assert len(r["accuracy_chips"]) == out["draws"] and 0.0 <= r["accuracy_chips_mean"] <= 1.0
        est = r["estimate"]["isaac-32nm"]
        assert est["estimated"] is True and est["total_area_um2"] > 0
    assert rows["baseline"]["estimate"]["isaac-32nm"]["arrays"] == 2 * rows["per_layer_4bit"]["estimate"][
        "isaac-32nm"]["arrays"]  # G+ and G- arrays against one array with column pairs
    searched = rows["uniform_2bit_unipolar"]
    assert searched["polarity_search"]["assignment"] == searched["polarity"]
    assert rows["uniform_4bit"]["quant"] == "uniform" and rows["per_layer_4bit"]["quant"] == "per-layer"
    t = task["targets"]
    assert {"uniform_2bit_points_below_float", "within_3_points", "missed_by_points", "area_saved",
            "energy_saved"} <= set(t)
    assert out["accuracy_under_errors"].startswith("on the twin through the real chip path")
    assert "uniform 2-bit unipolar" in res.stdout and "estimated" in res.stdout

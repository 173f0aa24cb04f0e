"""cimlab.report: plots and summary of a model whose codes never leave the ideal code (no analog fit possible)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cimlab.errmodel import MacErrorModel
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.report import write_report


def test_report_of_an_ideal_model(tmp_path: Path) -> None:
    spec = MacroSpec(rows=32, cols=4)
    counts = np.zeros((spec.physical_cols, spec.n_levels, spec.n_codes), dtype=np.int64)
    s = np.arange(spec.n_levels)
    counts[:, s, s] = 5
    model = MacErrorModel.from_counts(spec, counts, chip_id="bench-chip-7", conditions={"vdd_mv": 750})
    files = write_report(model, tmp_path / "out", title="unit report")
    assert [f.name for f in files] == ["transfer.png", "heatmap.png", "errors.png", "columns.png", "summary.md"]
    for f in files[:-1]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    md = files[-1].read_text()
    assert md.startswith("# unit report")
    assert "`bench-chip-7`" in md and "'vdd_mv': 750" in md
    assert f"| conversions | {counts.sum():,} |" in md
    assert "| codes equal to the ideal code | 100.000 % |" in md
    assert "| analog fit resolved in | 0 of 16 columns |" in md
    assert "stay below one LSB" in md
    assert "![heatmap](heatmap.png)" in md

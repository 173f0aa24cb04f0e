"""cimlab.report: plots a chip engineer trusts (every condition, INL/DNL per code, chip and condition in every
title, the code axis cut to the codes in use) and a summary that says what each fit is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from characterize_helpers import sweep

from cimlab import report as report_module
from cimlab.characterize import MeasurementStore, PlanOptions
from cimlab.errmodel import MacErrorModel
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.report import codes_in_use, write_report


def test_report_of_an_ideal_model(tmp_path: Path) -> None:
    spec = MacroSpec(rows=32, cols=4)
    counts = np.zeros((spec.physical_cols, spec.n_levels, spec.n_codes), dtype=np.int64)
    s = np.arange(spec.n_levels)
    counts[:, s, s] = 5
    model = MacErrorModel.from_counts(spec, counts, chip_id="bench-chip-7", conditions={"vdd_mv": 750})
    files = write_report(model, tmp_path / "out", title="unit report")
    assert [f.name for f in files] == ["transfer.png", "inl_dnl.png", "heatmap.png", "errors.png", "columns.png",
                                       "summary.md"]
    for f in files[:-1]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    md = files[-1].read_text()
    assert md.startswith("# unit report")
    assert "`bench-chip-7`" in md and "| 750 mV | 750 |" in md  # the conditions as a table
    assert f"| conversions | {counts.sum():,} |" in md
    assert "| codes equal to the ideal code | 100.000 % |" in md
    assert "| quantization-aware fit: columns resolved | 0 of 16 |" in md
    assert "stay below one LSB" in md and "which to trust" in md
    assert "![inl_dnl](inl_dnl.png)" in md
    assert codes_in_use(model) == (0, spec.s_max)  # 5-bit ADC, 17 levels: the heat map shows codes 0..16


def test_every_condition_is_plotted_with_chip_and_condition_in_every_title(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    sweep("sim://?profile=default&rows=32", out, PlanOptions(repeats=20), vdd=[0.7, 0.9])
    figures: dict[str, Any] = {}
    save = report_module._save

    def keep(fig: Any, path: Path, title: str) -> Path:
        figures[path.name] = (title, [ax.get_title() for ax in fig.axes],
                              [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts])
        return save(fig, path, title)

    monkeypatch.setattr(report_module, "_save", keep)
    with MeasurementStore.open(out) as store:
        files = write_report(MacErrorModel.load(out / "dmacem.npz"), out / "report", store=store)
    for name in ("transfer.png", "inl_dnl.png", "errors.png"):
        title, _, legend = figures[name]
        assert "twin-default-s0" in title
        assert any("vdd700mV" in t for t in legend) and any("vdd900mV" in t for t in legend), (name, legend)
    _, panel_titles, _ = figures["heatmap.png"]
    assert [t for t in panel_titles if "twin-default-s0" in t] == ["twin-default-s0 · vdd700mV",
                                                                     "twin-default-s0 · vdd900mV"]
    assert "twin-default-s0 · vdd700mV" in figures["columns.png"][0]
    md = files[-1].read_text()
    assert "| vdd700mV | 700 | 25 |" in md and "| vdd900mV | 900 | 25 |" in md
    assert "estimated by the chip model" in md

"""``cimlab export aihwkit``: the fit against known models and the twin, the measured-noise class against the
data-driven twin, and a network trained in aihwkit-lightning evaluated there and by ``cimlab evaluate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cimlab.characterize import MeasurementStore, Plan, PlanOptions, SweepRunner, conditions_from_vdd, store_meta
from cimlab.cli import cli
from cimlab.driver import Chip
from cimlab.errmodel import MacErrorModel
from cimlab.export_aihwkit import MeasuredMacroNoise, export_lightning
from cimlab.firmware_bridge.spec import MacroSpec

HARSH = "sim://?offset_sigma_lsb=0.5&gain_sigma=0.05&seed=0"
"""The README's harsher twin: its errors cost a naive network most of its accuracy."""


def characterize(url: str, folder: Path, repeats: int = 16) -> Path:
    with Chip.open(url) as chip:
        plan = Plan(chip.spec, PlanOptions(repeats=repeats))
        conds = conditions_from_vdd(None)
        with MeasurementStore.create(folder, store_meta(chip, plan, conds, url, None), conds) as store:
            return SweepRunner(chip, store, plan).run().models[0]


@pytest.fixture(scope="module")
def harsh_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return characterize(HARSH, tmp_path_factory.mktemp("harsh"))


def offset_model(spec: MacroSpec) -> MacErrorModel:
    """Every conversion exact, except physical column 0, which always reads one code high."""
    counts = np.zeros((spec.physical_cols, spec.n_levels, spec.n_codes), np.int64)
    ideal = spec.ideal_codes(np.arange(spec.n_levels))
    counts[:, np.arange(spec.n_levels), ideal] = 50
    counts[0] = 0
    counts[0, np.arange(spec.n_levels), np.minimum(ideal + 1, spec.adc_max)] = 50
    return MacErrorModel.from_counts(spec, counts, chip_id="offset")


def test_fit_of_known_models() -> None:
    spec = MacroSpec(rows=32, cols=2)  # 8 physical columns, levels 0..16 under a 31-code ADC: nothing clips
    ideal = offset_model(spec).counts.copy()
    ideal[0] = ideal[1]
    exact = export_lightning(MacErrorModel.from_counts(spec, ideal))
    assert exact.error_rms_lsb == 0 and exact.tv_distance == 0 and exact.error_mean_lsb == 0
    assert exact.mac_noise(32) == 0 and exact.out_noise(32) == 0
    assert (exact.inp_res, exact.weight_res) == (2 * 15, 2 * 7)
    shifted = export_lightning(offset_model(spec))
    # by hand: one row in 8 is off by +1 LSB, and always the same way
    assert shifted.error_mean_lsb == pytest.approx(1 / 8)
    assert shifted.error_rms_lsb == pytest.approx(np.sqrt(1 / 8))
    assert shifted.systematic_fraction == pytest.approx(1.0)
    assert shifted.tv_distance > 0.1
    # column 0 is weight slice 0 of output 0: that output's MAC is off by sum over planes of 2**p per group
    assert shifted.mac_noise(32) == pytest.approx(np.sqrt((2 * 15) ** 2 / 2))
    assert MacroSpec(rows=32, cols=2, adc_full_scale=15).s_max - 15 == 1
    clipped = export_lightning(MacErrorModel.from_counts(MacroSpec(rows=32, cols=2, adc_full_scale=15),
                                                         np.ones((8, 17, 32), np.int64)))
    assert clipped.levels_clipped == 1


def test_out_noise_matches_the_twins_mac_error(harsh_model: Path) -> None:
    """The export's MAC error (a model of the table) against the twin's own MACs (its analog model): RMS over
    random operands within 15 %; the noise class's per-column mean errors follow the twin's."""
    model = MacErrorModel.load(harsh_model)
    fit = export_lightning(model)
    rng = np.random.default_rng(7)
    with Chip.open(HARSH) as chip:
        spec = chip.spec
        w = rng.integers(-7, 8, (64, spec.cols))
        x = rng.integers(0, spec.input_max + 1, (256, 64))
        chip.write_weights(np.vstack([w, np.zeros((spec.rows - 64, spec.cols), np.int64)]))
        twin_err = (chip.mac(x) - x @ w).astype(np.float64)
    assert fit.mac_noise(64) == pytest.approx(np.sqrt((twin_err**2).mean()), rel=0.15)
    ours = (MeasuredMacroNoise(model, seed=3).mac(x, w) - x @ w).astype(np.float64)
    assert np.corrcoef(ours.mean(axis=0), twin_err.mean(axis=0))[0, 1] > 0.9
    assert ours.std() == pytest.approx(twin_err.std(), rel=0.15)


def test_noise_class_samples_the_table(tmp_path: Path) -> None:
    """One row of the macro, one group: each MAC is one conversion per (plane, slice), so the codes the class
    drew can be read back; their frequencies follow the table's P(code | s, column)."""
    spec = MacroSpec(rows=16, cols=1, weight_bits=2, input_bits=1, adc_bits=3, adc_full_scale=7)
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 30, (spec.physical_cols, spec.n_levels, spec.n_codes))
    model = MacErrorModel.from_counts(spec, counts)
    x = np.zeros((20000, 16), np.int64)
    x[:, :5] = 1  # level 5 on slice 0 (weights 1: digit 1 on slice 0, 0 on slice 1 -> level 0 there)
    w = np.zeros((16, 1), np.int64)
    w[:5] = 1
    mac = MeasuredMacroNoise(model, seed=1).mac(x, w)[:, 0]
    # mac = code(slice 0, s=5) - 2 * code(slice 1, s=0) (two's complement: the top slice counts negative)
    p0 = counts[0, 5] / counts[0, 5].sum()
    p1 = counts[1, 0] / counts[1, 0].sum()
    expected = {}
    for a in range(spec.n_codes):
        for b in range(spec.n_codes):
            expected[a - 2 * b] = expected.get(a - 2 * b, 0.0) + p0[a] * p1[b]
    values, seen = np.unique(mac, return_counts=True)
    assert set(values) <= set(expected)
    for v, n in zip(values, seen, strict=True):
        assert abs(n / mac.size - expected[v]) < 0.012, (v, n / mac.size, expected[v])


def test_cli_export(harsh_model: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["export", "aihwkit", str(harsh_model), "--layers", "64,64",
                                   "--out", str(tmp_path / "e.json"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "e.json").read_text())
    assert out == saved
    assert out["config"]["forward.inp_res"] == 30 and out["config"]["modifier.res"] == 14
    assert out["out_noise_by_in_features"]["64"] > 0 and 0 < out["residual"]["tv_distance"] < 1
    res = CliRunner().invoke(cli, ["export", "aihwkit", str(harsh_model), "--layers", "6x"])
    assert res.exit_code == 2 and "--layers" in res.output


def test_lightning_network_matches_cimlab_evaluate(harsh_model: Path, tmp_path: Path) -> None:
    """A digits MLP trained in aihwkit-lightning with the exported config (hardware-aware: out_noise), then
    evaluated there, ideally and under the measured errors (``MeasuredMacroNoise``), and by ``cimlab evaluate`` on
    the same network (``lightning_to_checkpoint``) and model. Tolerance: ideal accuracies within 1 image; under
    errors, means over 4 draws each within 2 points (the draw-to-draw spread is about 0.5 point; both runs are
    seeded, so the outcome is fixed)."""
    pytest.importorskip("aihwkit_lightning")
    import torch
    import torch.nn.functional as F

    from cimlab.export_aihwkit import lightning_to_checkpoint, to_lightning
    from cimlab.training.models import build_model
    from cimlab.training.tasks import load_task

    torch.manual_seed(0)
    data = load_task("digits")
    model = MacErrorModel.load(harsh_model)
    fit = export_lightning(model)
    net = to_lightning(build_model("digits_mlp"), fit)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _epoch in range(6):
            net.train()
            order = torch.randperm(data.x_train.shape[0])
            for i in range(0, order.numel(), 64):
                idx = order[i : i + 64]
                loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            ideal = (net(data.x_test).argmax(1) == data.y_test).float().mean().item()
            noise = MeasuredMacroNoise(model)
            errors = []
            with noise.applied_to(net):
                for draw in range(4):
                    noise.reseed(100 + draw)
                    errors.append((net(data.x_test).argmax(1) == data.y_test).float().mean().item())
    finally:
        torch.set_num_threads(n_threads)
    ckpt = lightning_to_checkpoint(net, tmp_path / "lightning.safetensors", spec=model.spec, task="digits",
                                   model_name="digits_mlp")
    proc = subprocess.run([sys.executable, "-m", "cimlab.cli", "evaluate", str(ckpt), "--error-model",
                           str(harsh_model), "--per-column", "--draws", "4", "--json"],
                          capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr.decode()
    ours = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    n = data.y_test.numel()
    assert abs(ideal - ours["accuracy_ideal"]) <= 1 / n + 1e-9, (ideal, ours["accuracy_ideal"])
    assert ideal > 0.8
    # the errors matter on this model (else the comparison below would say nothing)
    assert ours["accuracy_errors_mean"] < ours["accuracy_ideal"] - 0.05
    assert abs(float(np.mean(errors)) - ours["accuracy_errors_mean"]) <= 0.02, (errors, ours)
    print(f"lightning: ideal {ideal:.4f}, errors {np.mean(errors):.4f} +- {np.std(errors):.4f}; cimlab evaluate: "
          f"ideal {ours['accuracy_ideal']:.4f}, errors {ours['accuracy_errors_mean']:.4f} "
          f"+- {ours['accuracy_errors_std']:.4f}")

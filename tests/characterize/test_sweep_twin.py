"""The sweep on the in-process twin: identity on `ideal`, the profile's parameters on `default`, resume, supply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from characterize_helpers import store_counts, sweep

from cimlab import chip_sim
from cimlab.characterize import MeasurementStore, Plan, PlanOptions, SupplySetup, SweepRunner, check_resume
from cimlab.characterize.sweep import conditions_from_vdd
from cimlab.driver import Chip
from cimlab.errmodel import MacErrorModel
from cimlab.firmware_bridge.errors import ArtifactError
from cimlab.instruments import BenchSupply, SupplyLimits, open_supply, sim_bench_yaml

IDEAL = "sim://?profile=ideal&rows=64"
QUIET = "sim://?profile=default&rows=64&noise_sigma_lsb=0"  # the default twin's static errors, no noise
BENCH = f"{sim_bench_yaml()}@sim"


def test_ideal_profile_gives_the_identity_transfer(tmp_path: Path) -> None:
    result = sweep(IDEAL, tmp_path / "run", PlanOptions(repeats=40, seed=2))
    assert result.complete and [p.name for p in result.models] == ["dmacem.npz"]
    m = MacErrorModel.load(result.models[0])
    spec = m.spec
    s = np.arange(spec.n_levels)
    assert (m.totals() >= 40).all()  # every column saw every level at least `repeats` times
    p = m.probabilities()
    assert np.all(p[:, s, spec.ideal_codes(s)] == 1.0)  # identity: code = s (s_max <= adc_max)
    np.testing.assert_array_equal(spec.ideal_codes(s), s)
    fit = m.gain_offset()
    np.testing.assert_allclose(fit.gain, 1.0)
    np.testing.assert_allclose(fit.offset, 0.0, atol=1e-12)
    assert m.summary()["exact_code_rate"] == 1.0
    assert m.model.chip_id == "twin-ideal-s0"
    assert m.meta["provenance"]["plan_digest"]


def test_default_profile_fit_matches_the_profile_parameters(tmp_path: Path) -> None:
    """At the profile's lowest VDD the gain drops by 15 %, so codes cross thresholds and the analog fit resolves.

    Expectations from the profile (read only here): gain = gain_cond * (1 + gain_sigma z) * (mean cell factor),
    offset = offset_sigma_lsb z, thermal noise = noise_sigma_lsb * (1 + noise_vdd_coeff * dV/V). Tolerances:
    - mean gain within 1.5 % of gain_cond (the ADC's INL bow of 0.08 LSB tilts it by ~0.6 %);
    - spread of gains and offsets within 25 % of sqrt(gain_sigma**2 + cell_sigma**2 / rows) and
      offset_sigma_lsb (256 columns: the sample sd itself varies by ~5 %);
    - median noise between the thermal noise and the thermal noise plus cell mismatch over random rows at full
      scale plus ADC DNL, +-5 % (the fit sees every conversion-to-conversion spread as noise);
    - per column, against the mismatch the twin drew: correlation > 0.97 and RMS error after the common bias
      < 0.002 (gain) and < 0.02 LSB (offset).
    """
    seed, vdd_mv = 5, 600
    url = f"sim://?profile=default&rows=64&seed={seed}"
    result = sweep(url, tmp_path / "run", PlanOptions(repeats=800, seed=1), vdd=[vdd_mv / 1000])
    m = MacErrorModel.load(result.models[0])
    assert m.model.conditions["vdd_mv"] == vdd_mv
    fit = m.fit_analog()
    assert fit.resolved.all()

    twin = chip_sim.make_twin("default", seed, {"rows": "64"})
    a = twin.profile.analog
    rel_v = (vdd_mv - a.vdd_nominal_mv) / a.vdd_nominal_mv
    gain_cond = 1 + a.gain_vdd_coeff * rel_v
    thermal = a.noise_sigma_lsb * (1 + a.noise_vdd_coeff * rel_v)
    spec = m.spec

    assert np.mean(fit.gain) == pytest.approx(gain_cond, rel=0.015)
    expected_gain_sd = np.sqrt(a.gain_sigma**2 + a.cell_sigma**2 / spec.rows)
    assert np.std(fit.gain) / gain_cond == pytest.approx(expected_gain_sd, rel=0.25)
    assert np.std(fit.offset) == pytest.approx(a.offset_sigma_lsb, rel=0.25)
    assert abs(np.mean(fit.offset)) < a.offset_sigma_lsb
    upper = np.sqrt(thermal**2 + (a.cell_sigma * gain_cond) ** 2 * spec.s_max + a.adc_dnl_sigma_lsb**2)
    assert 0.95 * thermal <= np.median(fit.noise) <= 1.05 * upper

    conv = twin.converter
    cell_mean = conv.cell_units[: spec.rows].mean(axis=0) / conv.cell_grid
    true_gain = conv.gain * gain_cond * cell_mean
    true_offset = conv.offset_lsb
    assert np.corrcoef(fit.gain, true_gain)[0, 1] > 0.97
    assert np.corrcoef(fit.offset, true_offset)[0, 1] > 0.97
    assert np.std(fit.gain - true_gain) < 0.002
    assert np.std(fit.offset - true_offset) < 0.02


def test_weights_that_did_not_store_as_written_are_accounted_for(tmp_path: Path) -> None:
    with Chip.open(IDEAL) as chip:
        original = chip.write_weights

        def lossy(weights: np.ndarray, row_start: int = 0) -> list[tuple[int, int]]:
            w = np.array(weights)
            w[::5, ::3] = 0  # these cells keep a 0 whatever is written
            return original(w, row_start)

        chip.write_weights = lossy  # type: ignore[method-assign]
        result = sweep(IDEAL, tmp_path / "lossy", PlanOptions(repeats=20), chip=chip)
    m = MacErrorModel.load(result.models[0])
    s = np.arange(m.spec.n_levels)
    # levels computed from the weights read back: still the exact identity transfer
    assert m.probabilities()[:, s, s][m.totals() > 0].min() == 1.0
    clean = sweep(IDEAL, tmp_path / "clean", PlanOptions(repeats=20))
    assert not np.array_equal(m.counts, MacErrorModel.load(clean.models[0]).counts)


def test_stop_between_batches_then_resume_equals_an_uninterrupted_sweep(tmp_path: Path) -> None:
    options = PlanOptions(repeats=60, batch_vectors=8, seed=4)
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    first = sweep(QUIET, tmp_path / "cut", options, should_stop=stop_after_three)
    assert first.interrupted and first.batches_done == 3 and not first.models
    assert not (tmp_path / "cut" / "dmacem.npz").exists()
    with Chip.open(QUIET) as chip, MeasurementStore.open(tmp_path / "cut") as store:
        opts, _conds = check_resume(store, chip, {}, None)
        assert opts == options
        second = SweepRunner(chip, store, Plan(chip.spec, opts)).run()
        kinds = [e[1] for e in store.events()]
    assert second.complete and second.batches_run == first.batches_total - 3
    assert kinds[:3] == ["created", "start", "condition"] and "interrupted" in kinds and kinds[-1] == "finished"
    whole = sweep(QUIET, tmp_path / "whole", options)
    np.testing.assert_array_equal(store_counts(tmp_path / "cut"), store_counts(tmp_path / "whole"))
    counts = store_counts(tmp_path / "whole")
    spec = MacErrorModel.load(whole.models[0]).spec
    assert counts.sum() == whole.batches_total * 8 * spec.conversions_per_vector  # nothing lost, nothing twice
    s = np.arange(spec.n_levels)
    assert counts[:, s, s].sum() < counts.sum()  # the static errors make some codes non-ideal


def test_resume_refuses_another_chip_spec_plan_or_conditions(tmp_path: Path) -> None:
    out = tmp_path / "run"
    sweep(QUIET, out, PlanOptions(repeats=5, seed=1), vdd=[0.8], should_stop=lambda: True)
    cases = [
        ("sim://?profile=default&rows=32&noise_sigma_lsb=0", {}, None,
         r"MacroSpec differs: rows: store 64 vs chip 32"),
        ("sim://?profile=default&rows=64&seed=9", {}, None,
         "chip id differs: store 'twin-default-s0' vs chip 'twin-default-s9'"),
        (QUIET, {"repeats": 6}, None, "plan option repeats: store 5 vs requested 6"),
        (QUIET, {}, conditions_from_vdd([0.7]), r"conditions differ: store \['vdd800mV'\] vs requested"),
    ]
    for url, requested, conds, message in cases:
        with (
            Chip.open(url) as chip,
            MeasurementStore.open(out) as store,
            pytest.raises(ArtifactError, match=message),
        ):
            check_resume(store, chip, requested, conds)


def test_columns_option_counts_only_those_columns(tmp_path: Path) -> None:
    result = sweep(IDEAL, tmp_path / "run", PlanOptions(repeats=5, columns=(3, 70)))
    totals = MacErrorModel.load(result.models[0]).totals().sum(axis=1)
    assert set(np.nonzero(totals)[0]) == {3, 70}


def _bench_supply(resource: str) -> BenchSupply:
    limits = SupplyLimits(v_min=0.6, v_max=1.0, compliance_a=0.05, ramp_step_v=0.1, ramp_dwell_s=0.0)
    return open_supply(resource, limits, BENCH)


def test_supply_sets_vdd_and_ends_off(tmp_path: Path) -> None:
    smu = _bench_supply("GPIB0::24::INSTR")
    try:
        result = sweep("sim://?profile=default&rows=64", tmp_path / "run", PlanOptions(repeats=10),
                       vdd=[0.7, 0.8], supply=SupplySetup(smu, sample_period_s=0.01))
        assert smu.volts == 0.0
        inst = smu.source.instrument
        assert inst.source_enabled is False and inst.source_voltage == 0.0
        assert inst.compliance_current == pytest.approx(0.05)
    finally:
        smu.close()
    assert result.complete and len(result.models) == 3
    with MeasurementStore.open(tmp_path / "run") as store:
        for ci, volts in enumerate((0.7, 0.8)):
            assert store.condition_state(ci)["vdd_mv"] == round(volts * 1000)
            for rec in store.batch_records(ci):
                assert rec["supply_energy_j"] is None  # pyvisa-sim's fixed timestamps: no time, no measurement
    energy = MacErrorModel.load(tmp_path / "run" / "dmacem_vdd700mV.npz").meta["provenance"]["energy"]
    assert energy["source"] == "estimated by the chip model" and energy["chip_fj_per_mac"] > 0


def test_supply_output_is_off_after_a_failed_sweep(tmp_path: Path) -> None:
    smu = _bench_supply("GPIB0::24::INSTR")

    def abort() -> bool:
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            sweep(IDEAL, tmp_path / "run", PlanOptions(repeats=5), vdd=[0.8], supply=SupplySetup(smu),
                  should_stop=abort)
        assert smu.volts == 0.0 and smu.source.instrument.source_enabled is False
    finally:
        smu.close()

"""``cimlab estimate``: the figures against a hand count of events and instances, the technology table's rules, and
the command on a compiled package."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cimlab.estimate import COMPONENTS, adc_scale, estimate, load_tech
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import Tile

UNI = MacroSpec(rows=64, cols=8, weight_bits=2, weight_storage="unsigned", cell_bits=2, input_bits=4,
                rows_per_conversion=16, adc_bits=6, adc_full_scale=63)
DIFF = UNI.replace(weight_storage="differential")


def _hand(spec: MacroSpec, n_rows: int, n_cols: int, vectors: int) -> dict[str, float]:
    """Energy of one tile at macro row 0, written out from ISAAC's Table 2 (pJ per event)."""
    planes, groups = 4, math.ceil(n_rows / 16)
    sides = 2 if spec.weight_storage == "differential" else 1
    conv = planes * groups * sides * n_cols
    adc = 2e-3 / 1.2e9 * 1e12 * 2.0 ** (6 - 8)
    return {
        "adcs": vectors * conv * adc,
        "drivers": vectors * conv * 10e-6 / 1024 * 100e-9 * 1e12,
        "shift_add": vectors * conv * 0.2e-3 / 9.6e9 * 1e12,
        "arrays": vectors * planes * n_rows * n_cols * sides * 0.3e-3 * 100e-9 / 16384 * 1e12,
        "dacs": vectors * planes * n_rows * sides * 4e-3 / 1024 * 100e-9 * 1e12,
    }


@pytest.mark.parametrize("spec", [UNI, DIFF], ids=["unipolar", "differential"])
def test_energy_and_totals_against_a_hand_count(spec: MacroSpec) -> None:
    tiles = {"fc": [Tile(0, 40, 0, 6, page=0)], "out": [Tile(0, 6, 0, 3, macro_row=48, page=0)]}
    est = estimate(spec, tiles, {"fc": 10, "out": 10}, load_tech())
    want = {k: _hand(spec, 40, 6, 10)[k] + _hand(spec, 6, 3, 10)[k] for k in COMPONENTS}
    for k in COMPONENTS:
        assert est.energy_pj[k] == pytest.approx(want[k], rel=2e-3), k
    d = est.as_dict()
    assert d["total_energy_pj_per_inference"] == pytest.approx(sum(d["energy_pj_per_inference"].values()), rel=1e-12)
    assert d["total_area_um2"] == pytest.approx(sum(d["area_um2"].values()), rel=1e-12)
    assert d["estimated"] is True
    sides = spec.sides
    assert est.arrays == sides and est.adcs == sides  # one page; 8 columns share one 128-column ADC per array
    assert est.area_um2["arrays"] == pytest.approx(sides * 64 * 8 * 0.0002e6 / 8 / 16384, rel=1e-3)
    assert est.area_um2["adcs"] == pytest.approx(sides * 0.0096e6 / 8 / 4, rel=1e-9)


def test_unipolar_halves_what_differential_costs() -> None:
    tiles = {"fc": [Tile(0, 64, 0, 8, page=0)], "out": [Tile(0, 8, 0, 8, page=1)]}
    uni = estimate(UNI, tiles, {"fc": 1, "out": 1}, load_tech())
    diff = estimate(DIFF, tiles, {"fc": 1, "out": 1}, load_tech())
    assert uni.total_energy_pj == pytest.approx(diff.total_energy_pj / 2, rel=1e-9)
    assert uni.total_area_um2 == pytest.approx(diff.total_area_um2 / 2, rel=1e-9)
    shared = estimate(UNI, tiles, {"fc": 1, "out": 1}, load_tech(), periphery="shared")
    assert (uni.adcs, shared.adcs) == (2, 1) and shared.total_energy_pj == uni.total_energy_pj


def test_tech_tables_need_units_and_sources(tmp_path: Path) -> None:
    tech = load_tech()
    assert all(src.strip() for table in tech.sources.values() for src in table.values())
    text = (Path(__file__).parents[2] / "host" / "tech" / "isaac-32nm.toml").read_text()
    bad_unit = tmp_path / "unit.toml"
    bad_unit.write_text(text.replace('energy_pj = { value = 1.6666667, unit = "pJ"',
                                     'energy_pj = { value = 1.6666667, unit = "nJ"'))
    with pytest.raises(ConfigError, match="in 'nJ'; give it in 'pJ'"):
        load_tech(bad_unit)
    no_source = tmp_path / "source.toml"
    no_source.write_text(text.replace('source = "ISAAC Table 2: 8 ADCs 0.0096 mm^2 (verified: hwcomponents-library '
                                      '9600 um^2 / 8; puma-simulator 0.0012 mm^2)"', 'source = " "'))
    with pytest.raises(ConfigError, match="needs a source"):
        load_tech(no_source)
    with pytest.raises(ConfigError, match="periphery"):
        estimate(UNI, {}, {}, tech, periphery="some")


def test_estimate_and_bench_commands_on_a_package(tmp_path: Path) -> None:
    import torch

    from cimlab.chip_sim.profiles import load_profile

    spec = load_profile("nvm-2bit").spec
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _estimate_and_bench(tmp_path, spec)
    finally:
        torch.set_num_threads(threads)


def _estimate_and_bench(tmp_path: Path, spec: MacroSpec) -> None:
    import json

    from click.testing import CliRunner

    from cimlab.cli import cli
    from cimlab.deploy.compile import compile_checkpoint
    from cimlab.training.api import prepare_model
    from cimlab.training.checkpoint import save_checkpoint
    from cimlab.training.tasks import load_task

    data = load_task("digits", limit=64)
    net, info = prepare_model(data, "quant", model_name="digits_mlp", spec=spec)
    ckpt = save_checkpoint(tmp_path / "mlp.safetensors", net.eval(),
                           {"task": "digits", "model": info, "mode": "quant", "spec": spec.to_dict(),
                            "quantizer": "epact"})
    compile_checkpoint(ckpt, spec=spec).save(tmp_path / "mlp.npz")
    r = CliRunner().invoke(cli, ["estimate", str(tmp_path / "mlp.npz"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    est = json.loads(r.output[r.output.index('{"source"'):])
    # 64 -> 64 and 64 -> 10, one vector each, bipolar on pairs: 4 bit planes x 4 row groups x 1 cell x 2 (64 + 10)
    # columns
    assert est["conversions_per_inference"] == 4 * 4 * 2 * (64 + 10)
    assert est["total_energy_pj_per_inference"] == pytest.approx(sum(est["energy_pj_per_inference"].values()))
    assert est["tech_sources"]["adc"]["energy_pj"].startswith("ISAAC")
    r = CliRunner().invoke(cli, ["bench", str(tmp_path / "mlp.npz"), "--link", "sim://?profile=nvm-2bit",
                                 "--limit", "8", "--draws", "0", "--no-progress", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    bench = json.loads(r.output[r.output.rindex('{"package"'):])
    assert bench["estimate"] == {k: est[k] for k in bench["estimate"]}


def test_the_bundled_tables_differ_only_in_how_adcs_scale_with_bits() -> None:
    default, saberi = load_tech(), load_tech("isaac-32nm-saberi")
    assert default.name == "isaac-32nm" and saberi.name == "isaac-32nm-saberi"
    for table, keys in default.values.items():
        for key, value in keys.items():
            if key not in ("energy_per_bit", "area_per_bit"):
                assert saberi.values[table][key] == value, (table, key)
    # Saberi et al.'s points as listed beside ISAAC's ADC: 6 bits 1.20 pJ and 626.91 um^2
    assert 1.6666667 * adc_scale(saberi, 6, "energy") == pytest.approx(1.20, rel=2e-3)
    assert 1200 * adc_scale(saberi, 6, "area") == pytest.approx(626.91, rel=2e-3)
    assert adc_scale(default, 6, "energy") == adc_scale(default, 6, "area") == 0.25

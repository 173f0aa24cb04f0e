"""Profiles: the bundled ones load and validate, round-trip through TOML, and bad ones name the field at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from cimlab import chip_sim
from cimlab.chip_sim.config import parameter_table
from cimlab.chip_sim.profiles import list_profiles, load_profile, profile_from_toml
from cimlab.firmware_bridge.errors import ConfigError

BUNDLED = ("default", "ideal", "large", "nvm-2bit", "nvm-4bit")


def test_bundled_profiles_are_listed_with_descriptions() -> None:
    listed = dict(list_profiles())
    assert set(BUNDLED) <= set(listed)
    assert all(listed[name] for name in BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    assert profile.name == name
    text = profile.to_toml()
    assert profile_from_toml(text) == profile
    path = tmp_path / "copy.toml"
    path.write_text(text)
    assert load_profile(path) == profile
    assert load_profile(str(path)) == profile


def test_bundled_geometries_match_the_issue() -> None:
    d = load_profile("default").spec
    geometry = (d.rows, d.cols, d.weight_bits, d.input_bits, d.input_slice_bits, d.rows_per_conversion, d.adc_bits)
    assert geometry == (256, 64, 4, 4, 1, 16, 5)
    assert load_profile("ideal").analog.is_ideal
    assert not load_profile("default").analog.is_ideal
    large = load_profile("large").spec
    assert (large.rows, large.cols, large.weight_bits, large.input_bits) == (1152, 256, 8, 8)
    nvm = load_profile("nvm-2bit").spec
    assert nvm.cell_bits == 2 and nvm.weight_storage in ("offset", "unsigned")


def test_overrides_parse_text_and_validate() -> None:
    p = load_profile("default", {"rows": "100", "noise_sigma_lsb": "0.02", "mode": "reference",
                                 "timing.adc_cycles": 9})
    assert p.spec.rows == 100
    assert p.analog.noise_sigma_lsb == 0.02
    assert p.mode == "reference"
    assert p.timing.adc_cycles == 9
    twin = chip_sim.make_twin("default", 3, {"rows": "100"})
    assert twin.spec.rows == 100
    assert twin.identity().chip_id == "twin-default-s3"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"no_such_knob": "1"}, ["no_such_knob"]),
        ({"noise_sigma_lsb": "9"}, ["noise_sigma_lsb", "0..8"]),
        ({"gain_sigma": "-0.1"}, ["gain_sigma", "0..0.5"]),
        ({"rows": "abc"}, ["rows", "int"]),
        ({"rows": "70000"}, ["rows", "1..65535"]),
        ({"mode": "turbo"}, ["mode", "fast", "reference"]),
        ({"analog.rows": "3"}, ["analog.rows"]),
        ({"vdd_nominal_mv": "1200"}, ["vdd_nominal_mv", "600..1000"]),
        ({"weight_storage": "twos", "cell_bits": "2"}, ["cell_bits"]),
        ({"adc_cycles": "0"}, ["adc_cycles", "1..10000"]),
    ],
)
def test_bad_overrides_name_the_field(overrides: dict[str, str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        chip_sim.make_twin("default", 0, overrides)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('name = "x"\n[analog]\nnoise_sigma_lsb = 20.0\n', ["noise_sigma_lsb", "0..8", "LSB"]),
        ('name = "x"\n[analog]\nnoise = 0.1\n', ["noise", "unknown"]),
        ('name = "x"\n[timing]\nbus_bits = "wide"\n', ["bus_bits", "integer"]),
        ('name = "x"\n[spec]\nrows = 0\n', ["rows", "1..65535"]),
        ('name = "x"\n[spec]\ncolumns = 3\n', ["columns"]),
        ('name = "x"\nflavour = "sweet"\n', ["flavour"]),
        ('name = "x"\n[analog]\nstuck_at_0 = 0.3\nstuck_at_1 = 0.3\n', ["stuck_at_0 + stuck_at_1"]),
        ('name = "x"\n[spec\n', ["not valid TOML"]),
        ('name = "x"\nmode = 3\n', ["mode"]),
    ],
)
def test_bad_files_are_rejected_naming_the_field(tmp_path: Path, body: str, words: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    for word in words:
        assert word in str(info.value)
    assert "bad.toml" in str(info.value)


def test_unknown_profile_lists_the_bundled_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("no-such-profile")
    assert "default" in str(info.value) and "no-such-profile" in str(info.value)


def test_a_file_can_start_from_a_base(tmp_path: Path) -> None:
    path = tmp_path / "hot.toml"
    path.write_text('base = "default"\n[analog]\nnoise_sigma_lsb = 0.5\n')
    p = load_profile(path)
    d = load_profile("default")
    assert p.name == "hot"
    assert p.analog.noise_sigma_lsb == 0.5
    assert p.analog.gain_sigma == d.analog.gain_sigma
    assert p.spec == d.spec
    child = tmp_path / "child.toml"
    child.write_text('base = "hot.toml"\n[spec]\nrows = 64\n')
    assert load_profile(child).analog.noise_sigma_lsb == 0.5
    assert load_profile(child).spec.rows == 64
    loop = tmp_path / "loop.toml"
    loop.write_text('base = "loop.toml"\n')
    with pytest.raises(ConfigError, match="deeper"):
        load_profile(loop)


def test_error_model_path_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "chip.toml"
    path.write_text('base = "default"\nerror_model = "models/chip7.npz"\n')
    assert load_profile(path).error_model == str((tmp_path / "models" / "chip7.npz").resolve())
    # an override is a path from the command line: relative to the working directory
    p = load_profile(path, {"error_model": "other.npz"})
    assert p.error_model == str((Path.cwd() / "other.npz").resolve())


def test_every_parameter_is_documented_with_unit_and_range() -> None:
    rows = parameter_table()
    assert len(rows) > 20
    for row in rows:
        assert row["unit"] and row["doc"] and row["min"] is not None and row["max"] is not None
        assert row["min"] <= row["default"] <= row["max"], row["key"]

"""The bench supply under `cimlab characterize`: no setpoint outside the chip's range ever reaches the instrument,
a refused run does not block the corrected one, and on a served twin the energy measured through its simulated SMU
agrees with the chip's own estimate."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from pathlib import Path

import pytest
import pyvisa.resources
from click.testing import CliRunner

from cimlab.characterize import STORE_NAME
from cimlab.cli import cli
from cimlab.errmodel import MacErrorModel
from cimlab.instruments import sim_bench_yaml
from cimlab.twinproc import TwinProcess

K2400 = "GPIB0::24::INSTR"
BENCH = f"{sim_bench_yaml()}@sim"
LINK = "sim://?profile=default&rows=32&noise_sigma_lsb=0"


@pytest.fixture
def chip_profile(tmp_path: Path) -> Path:
    """The profile of the chip at LINK: the default macro, 32 rows (a chip team's own profile file)."""
    path = tmp_path / "chip.toml"
    path.write_text('base = "default"\nname = "chip32"\n[spec]\nrows = 32\n', encoding="utf-8")
    return path


@pytest.fixture
def scpi_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every message written to any VISA instrument, as the instrument receives it."""
    sent: list[str] = []
    original = pyvisa.resources.MessageBasedResource.write

    def record(self: pyvisa.resources.MessageBasedResource, message: str, *args: object, **kw: object) -> int:
        sent.append(message)
        return original(self, message, *args, **kw)

    monkeypatch.setattr(pyvisa.resources.MessageBasedResource, "write", record)
    return sent


def characterize(out: Path, profile: Path, *extra: str) -> tuple[int, str]:
    args = ["characterize", "--link", LINK, "--out", str(out), "--profile", str(profile), "--repeats", "2",
            "--no-progress", "--smu", K2400, "--visa-library", BENCH, *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def setpoints(writes: list[str]) -> list[float]:
    return [float(m.group(1)) for w in writes if (m := re.fullmatch(r":SOURCE:VOLTAGE (\S+)", w))]


@pytest.mark.parametrize(("vdd", "why"), [("5", "5 V is outside the allowed 0.6..1 V"),
                                          ("800", "millivolts"), ("0.8,0.7,8", "8 V is outside")])
def test_typos_never_reach_the_instrument(tmp_path: Path, chip_profile: Path, scpi_writes: list[str], vdd: str,
                                          why: str) -> None:
    code, text = characterize(tmp_path / "run", chip_profile, "--vdd", vdd)
    assert code == 2 and why in " ".join(text.split())
    assert "Usage:" not in text  # a refused value is not a usage mistake
    assert setpoints(scpi_writes) == [] and "OUTPUT 1" not in scpi_writes
    assert not (tmp_path / "run" / STORE_NAME).exists()


def test_vdd_max_caps_the_range(tmp_path: Path, chip_profile: Path, scpi_writes: list[str]) -> None:
    code, text = characterize(tmp_path / "run", chip_profile, "--vdd", "0.8", "--vdd-max", "0.75")
    assert code == 2 and "0.8 V is outside the allowed 0.6..0.75 V" in " ".join(text.split())
    assert setpoints(scpi_writes) == []
    code, text = characterize(tmp_path / "run", chip_profile, "--vdd", "0.8", "--vdd-max", "1.5")
    assert code == 2 and "above the chip's maximum 1 V" in " ".join(text.split())


def test_a_good_run_ramps_within_the_limit_after_compliance_and_ends_off(tmp_path: Path, chip_profile: Path,
                                                                          scpi_writes: list[str]) -> None:
    code, text = characterize(tmp_path / "run", chip_profile, "--vdd", "0.7,0.8")
    assert code == 0, text
    volts = setpoints(scpi_writes)
    assert max(volts) == 0.8 and min(volts) == 0.0
    on = scpi_writes.index("OUTPUT 1")
    assert scpi_writes.index(":SENSE:CURRENT:PROTECTION 0.005") < on  # the profile's 5 mA, before output on
    assert setpoints(scpi_writes[:on]) == [0.0]
    steps = [b - a for a, b in itertools.pairwise(volts)]
    assert max(abs(s) for s in steps) <= 0.05 + 1e-9  # the profile's 50 mV ramp
    assert scpi_writes[-2:] == ["OUTPUT 0", ":SOURCE:VOLTAGE 0"]


def test_a_store_left_by_a_refused_run_does_not_block_the_corrected_run(tmp_path: Path, chip_profile: Path,
                                                                        scpi_writes: list[str]) -> None:
    out = tmp_path / "run"
    # 2 A is more than a 2400 can limit: its driver refuses it after the store was created
    code, text = characterize(out, chip_profile, "--vdd", "0.8", "--compliance", "2")
    assert code == 2 and "refused configuring the output: Value of 2 is not in range" in " ".join(text.split())
    assert (out / STORE_NAME).exists() and "OUTPUT 1" not in scpi_writes
    code, text = characterize(out, chip_profile, "--vdd", "0.8", "--compliance", "0.01")
    assert code == 0, text


def test_the_simulated_bench_measures_no_energy_and_the_report_says_estimated(tmp_path: Path,
                                                                                chip_profile: Path) -> None:
    out = tmp_path / "run"
    code, text = characterize(out, chip_profile, "--vdd", "0.8")
    assert code == 0, text
    with sqlite3.connect(out / STORE_NAME) as conn:
        energies = [r[0] for r in conn.execute("SELECT supply_energy_j FROM batches")]
    conn.close()
    assert energies and all(e is None for e in energies)  # pyvisa-sim's readings carry a fixed timestamp
    result = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    md = (out / "report" / "summary.md").read_text(encoding="utf-8")
    assert "estimated by the chip model" in md and "measured supply energy per conversion" not in md


def test_energy_measured_through_a_served_twins_smu_agrees_with_the_chip(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = TwinProcess(profile="default", sets=["rows=32"], smu=True)
    with proc as url:
        profile = tmp_path / "chip.toml"
        profile.write_text('base = "default"\nname = "chip32"\n[spec]\nrows = 32\n', encoding="utf-8")
        args = ["characterize", "--link", url, "--out", str(out), "--profile", str(profile), "--repeats", "20",
                "--no-progress", "--vdd", "0.7,0.9", "--smu", proc.smu_resource, "--visa-library", "@py", "--json"]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["complete"] is True
    for label in ("vdd700mV", "vdd900mV"):
        energy = MacErrorModel.load(out / f"dmacem_{label}.npz").meta["provenance"]["energy"]
        assert energy["source"] == "measured through the supply"
        assert energy["supply_vs_chip"] == pytest.approx(1.0, abs=1e-5)  # the meter's 7 digits
    e7, e9 = (MacErrorModel.load(out / f"dmacem_{x}.npz").meta["provenance"]["energy"]["supply_fj_per_conversion"]
              for x in ("vdd700mV", "vdd900mV"))
    assert e9 / e7 == pytest.approx((0.9 / 0.7) ** 2, rel=0.05)  # the twin's energy follows the supply it gets

"""Logs with the standard library: -v / --log-level / --log-file, the wire's frames and the SCPI traffic at DEBUG."""

from __future__ import annotations

import logging
from pathlib import Path

from click.testing import CliRunner

from cimlab.cli import cli
from cimlab.instruments import sim_bench_yaml


def invoke(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_debug_log_file_holds_the_frames_on_the_wire(tmp_path: Path) -> None:
    log = tmp_path / "cimlab.log"
    code, out, _ = invoke("-vv", "--log-file", str(log), "info", "--link", "sim://?profile=ideal")
    assert code == 0, out
    text = log.read_text(encoding="utf-8")
    assert "DEBUG   cimlab.wire: -> HELLO" in text and "cimlab.wire: <- HELLO" in text and "status=OK" in text
    assert not any(getattr(h, "_cimlab_cli", False) for h in logging.getLogger("cimlab").handlers)  # closed


def test_scpi_traffic_is_logged_at_debug(tmp_path: Path) -> None:
    log = tmp_path / "scpi.log"
    profile = tmp_path / "chip.toml"
    profile.write_text('base = "default"\n[spec]\nrows = 32\n', encoding="utf-8")
    code, _, err = invoke("--log-level", "debug", "--log-file", str(log), "characterize", "--link",
                            "sim://?profile=default&rows=32", "--out", str(tmp_path / "run"), "--repeats", "2",
                            "--vdd", "0.8", "--smu", "GPIB0::24::INSTR", "--profile", str(profile),
                            "--visa-library", f"{sim_bench_yaml()}@sim", "--no-progress")
    assert code == 0, err
    text = log.read_text(encoding="utf-8")
    assert "cimlab.instruments.scpi.Adapter: WRITE::SENSE:CURRENT:PROTECTION 0.005" in text
    assert "READ:KEITHLEY INSTRUMENTS" in text
    assert "cimlab.instruments.supplies: GPIB0::24::INSTR: output on" in text
    assert "cimlab.characterize.sweep: condition vdd800mV" in text


def test_quiet_by_default_and_levels_are_checked(tmp_path: Path) -> None:
    code, _, err = invoke("info", "--link", "sim://?profile=ideal")
    assert code == 0 and "cimlab.wire" not in err
    code, _, err = invoke("--log-level", "chatty", "info")
    assert code == 2 and "chatty" in err

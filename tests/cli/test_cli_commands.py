"""The command line as a user runs it: info, check, sim serve/profiles/show."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cimlab.firmware_bridge.frame import PROTOCOL_VERSION
from cimlab.cli import cli
from cimlab.twinproc import TwinProcess


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_info_json_reports_the_spec() -> None:
    code, out = run("info", "--link", "sim://?profile=ideal&rows=128", "--json")
    assert code == 0
    info = last_json(out)
    assert info["spec"]["rows"] == 128
    assert info["protocol_version"] == PROTOCOL_VERSION


def test_info_table() -> None:
    code, out = run("info")
    assert code == 0
    assert "spec.rows" in out and "conversions/vector" in out


def test_check_is_exact_on_ideal() -> None:
    code, out = run("check", "--link", "sim://?profile=ideal", "--json")
    assert code == 0, out
    rep = last_json(out)
    assert rep["ok"]
    assert rep["figures"]["mac_exact"] == 1.0
    assert rep["figures"]["raw_exact"] == 1.0
    assert {s["name"] for s in rep["steps"]} >= {"hello", "ping", "registers", "weights", "mac", "mac_raw", "status"}


def test_check_is_statistical_on_default() -> None:
    code, out = run("check", "--link", "sim://?profile=default&seed=2", "--json")
    rep = last_json(out)
    assert code == 0, out
    assert rep["figures"]["mac_exact"] == 0.0  # the default twin has analog errors
    assert rep["figures"]["mac_correlation"] >= 0.95


def test_check_through_a_faulty_link_still_passes() -> None:
    url = "sim://?profile=ideal#drop=0.03&flip=0.03&fault_seed=4"
    code, out = run("check", "--link", url, "--timeout", "0.1", "--json")
    rep = last_json(out)
    assert code == 0, out
    assert rep["link"]["retries"] > 0


def test_check_over_a_served_pty_in_another_process() -> None:
    """`cimlab sim serve --pty` in one process, `cimlab check --link /dev/pts/N` in another."""
    with TwinProcess(pty=True, profile="default") as url:
        proc = subprocess.run(
            [sys.executable, "-m", "cimlab.cli", "check", "--link", url, "--json"],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert last_json(proc.stdout)["ok"]


@pytest.mark.parametrize("args", [["info", "--json"], ["info", "--link", "sim://?device=cpu", "--json"]])
def test_info_does_not_import_torch(args: list[str]) -> None:
    code = (
        "import sys; from click.testing import CliRunner; from cimlab.cli import cli; "
        f"r = CliRunner().invoke(cli, {args!r}); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize(
    "args, message",
    [
        (("sim", "serve"), "exactly one of --pty or --tcp"),
        (("sim", "serve", "--pty", "--set", "rows"), "KEY=VALUE"),
        (("sim", "serve", "--tcp", "localhost"), "HOST:PORT"),
        (("info", "--link", "sim://?profile=ideal&rows=0"), "rows"),
        (("info", "--link", "sim://?profile=no-such-profile"), "no-such-profile"),
        (("sim", "serve", "--pty", "--device", "tpu"), "device='tpu'"),
        (("sim", "serve", "--pty", "--backend", "rtl", "--device", "cuda"), "--device applies to the Python twin"),
    ],
)
def test_bad_arguments_are_named(args: tuple[str, ...], message: str) -> None:
    code, out = run(*args)
    assert code == 2
    assert message in out


def test_unreachable_link_is_a_clean_error() -> None:
    code, out = run("info", "--link", "tcp://127.0.0.1:1", "--timeout", "0.5")
    assert code == 1
    assert "127.0.0.1:1" in out


def test_profiles_and_show_round_trip(tmp_path) -> None:
    code, out = run("sim", "profiles", "--json")
    assert code == 0
    names = {p["name"] for p in last_json(out)}
    assert {"ideal", "default"} <= names
    code, toml_text = run("sim", "show", "default", "--set", "rows=128")
    assert code == 0
    path = tmp_path / "mine.toml"
    path.write_text(toml_text)
    code, out = run("info", "--link", f"sim://?profile={path}", "--json")
    assert code == 0, out
    assert last_json(out)["spec"]["rows"] == 128


def test_served_tcp_prints_its_address_first() -> None:
    with TwinProcess(pty=False, profile="ideal") as url:
        assert url.startswith("tcp://127.0.0.1:")
        code, out = run("info", "--link", url, "--json")
        assert code == 0
        assert last_json(out)["spec"]["rows"] == 256

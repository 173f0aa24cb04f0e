"""`--json` means JSON: every command that takes it prints exactly one JSON document on stdout, and everything for
people on stderr. The chain runs each command as a user would, passing files from one to the next."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cimlab.cli import cli

TINY = "sim://?profile=default&rows=32&noise_sigma_lsb=0"


def run_json(*args: str, code: int = 0) -> Any:
    """Run a command with --json; stdout must parse as one strict JSON document (no NaN)."""
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == code, (result.stdout, result.stderr)
    text = result.stdout

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in the output of {args[0]}")

    return json.loads(text, parse_constant=no_constants)


def test_every_command_prints_one_json_document(tmp_path: Path) -> None:
    seen = set()

    def ok(*args: str) -> Any:
        seen.add(args[0] if args[0] != "sim" else f"sim {args[1]}")
        return run_json(*args)

    assert ok("info", "--link", TINY)["spec"]["rows"] == 32
    assert ok("check", "--link", "sim://?profile=ideal&rows=32", "--batch", "16")["ok"] is True
    assert {p["name"] for p in ok("sim", "profiles")} >= {"default", "ideal"}
    run = tmp_path / "char"
    assert ok("characterize", "--link", TINY, "--out", str(run), "--repeats", "2")["complete"] is True
    model = tmp_path / "m.npz"
    assert ok("fit", str(run), "--out", str(model))["conversions"] > 0
    assert ok("report", str(run))["files"]
    quick = ["--task", "digits", "--limit", "40", "--epochs", "1", "--batch-size", "20", "--model", "digits_mlp"]
    ck = ok("train", *quick, "--mode", "quant", "--profile", str(_profile(tmp_path)), "--out",
            str(tmp_path / "q.safetensors"))["checkpoint"]
    assert ok("evaluate", ck, "--error-model", str(model), "--draws", "2", "--limit", "40")["mode"] == "quant"
    pkg = ok("compile", ck, "--link", TINY, "--out", str(tmp_path / "q.npz"))["package"]
    assert ok("deploy", pkg, "--link", TINY)["ok"] is True
    bench = ok("bench", pkg, "--link", TINY, "--limit", "20", "--draws", "0")
    assert bench["images"] == 20
    est = ok("estimate", pkg)
    assert est["total_energy_pj_per_inference"] > 0 and bench["estimate"]["arrays"] == est["arrays"]
    assert seen >= {"info", "check", "sim profiles", "characterize", "fit", "report", "train", "evaluate",
                    "compile", "deploy", "bench", "estimate"}


def _profile(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text('base = "default"\n[spec]\nrows = 32\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("args", [["info", "--link", "nope://x"], ["fit", "/nonexistent-dir-x", "--out", "x.npz"]])
def test_errors_are_json_too(args: list[str]) -> None:
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code != 0
    if result.exit_code == 2 and "Usage:" in result.stderr:
        return  # click refused the arguments before the command ran (no JSON is promised there)
    doc = json.loads(result.stdout)
    assert doc["error"]["message"] and "Usage:" not in result.stderr

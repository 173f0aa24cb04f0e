"""``cimlab compile``, ``cimlab deploy`` and ``cimlab bench`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from cimlab.cli import cli


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_compile_deploy_bench(mlp_ckpt: Path, harsh_model: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "mlp.npz"
    code, out = run("compile", mlp_ckpt, "--link", "sim://?profile=default&seed=2", "--out", pkg, "--json")
    assert code == 0, out
    c = last_json(out)
    assert c["pages"] == 1 and c["programming_passes_per_batch"] == 0
    assert c["target"] == {"source": "the chip at sim://?profile=default&seed=2", "chip_id": "twin-default-s2"}
    assert [layer["tiles"] for layer in c["layers"]] == [1, 1]
    assert pkg.is_file()

    code, out = run("deploy", pkg, "--link", "sim://?profile=default", "--json")
    assert code == 0, out
    d = last_json(out)
    assert d["ok"] and d["passes"] == 1 and d["mismatched_cells"] == 0
    assert "verified" in out

    url = f"sim://?profile=default&error_model={harsh_model}&seed=1"
    code, out = run("bench", pkg, "--link", url, "--limit", "120", "--draws", "3", "--error-model", harsh_model,
                    "--no-progress", "--json")
    assert code == 0, out
    b = last_json(out)
    assert b["images"] == 120 and len(b["prediction"]["draws"]) == 3
    assert 0 <= b["accuracy_chip"] <= 1 and b["gap_sigma"] is not None
    for label in ("accuracy on the chip", "host, ideal MACs", "gap chip - prediction", "images/s",
                  "bytes on the link", "chip cycles", "chip latency", "chip energy", "bounds", "images/s ÷ min"):
        assert label in out, label


def test_usage_errors(mlp_ckpt: Path, tmp_path: Path) -> None:
    code, out = run("compile", mlp_ckpt, "--link", "sim://", "--profile", "default", "--out", tmp_path / "x.npz")
    assert code == 2 and "not both" in out
    pkg = tmp_path / "p.npz"
    assert run("compile", mlp_ckpt, "--profile", "default", "--out", pkg)[0] == 0
    code, out = run("bench", pkg, "--task", "har", "--limit", "5")
    assert code == 2 and "task 'digits'" in out


def test_deploy_to_another_macro_fails_with_a_message(mlp_ckpt: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "p.npz"
    assert run("compile", mlp_ckpt, "--profile", "default", "--out", pkg)[0] == 0
    url = "sim://?profile=default&adc_bits=6&adc_full_scale=63"
    result = CliRunner().invoke(cli, ["deploy", str(pkg), "--link", url])
    assert result.exit_code == 1
    assert "another MacroSpec" in result.output and "adc_bits" in result.output


def test_cimlab_info_never_imports_torch() -> None:
    code = ("import sys; from click.testing import CliRunner; from cimlab.cli import cli; "
            "r = CliRunner().invoke(cli, ['info']); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_compile_places_on_a_die(mlp_ckpt: Path, harsh_model: Path, tmp_path: Path) -> None:
    """``--place-on``: the harsh die reads every seventh physical column one code high, so the network's columns go
    elsewhere first; a file that is not an error model is refused by name."""
    pkg = tmp_path / "placed.npz"
    code, out = run("compile", mlp_ckpt, "--profile", "default", "--out", pkg, "--place-on", harsh_model, "--json")
    assert code == 0, out
    order = last_json(out)["column_order"]
    assert sorted(order) == list(range(64)) and order != list(range(64))
    assert "placed on the die of" in out
    bogus = tmp_path / "bogus.npz"
    bogus.write_bytes(b"not a zip")
    code, out = run("compile", mlp_ckpt, "--profile", "default", "--out", tmp_path / "x.npz", "--place-on", bogus)
    assert code != 0 and "bogus.npz" in out and not (tmp_path / "x.npz").exists()

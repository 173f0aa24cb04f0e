"""``cimlab train`` / ``cimlab evaluate``: one JSON object last, clear errors; ``cimlab info`` without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from training_helpers import SMALL_ODD, noisy_model

from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.cli import cli

QUICK = ["--limit", "48", "--epochs", "1", "--batch-size", "16", "--model", "digits_mlp", "--no-progress"]


def run(args: list[str]) -> dict:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    return json.loads(last)


@pytest.fixture(scope="module")
def error_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("em") / "dmacem.npz"
    noisy_model(MacroSpec(), seed=0, draws=40).save(path)
    return path


def test_float_quant_dnat_and_evaluate_chain(tmp_path: Path, error_model: Path) -> None:
    f = run(["train", "--task", "digits", "--mode", "float", "--out", str(tmp_path / "f.ckpt"), *QUICK, "--json"])
    assert f["mode"] == "float" and 0.0 <= f["accuracy_float"] <= 1.0 and f["steps"] == 3
    q = run(["train", "--task", "digits", "--mode", "quant", "--profile", "default", "--init", f["checkpoint"],
             "--out", str(tmp_path / "q.ckpt"), *QUICK, "--json"])
    assert q["spec_source"] == "twin profile 'default'" and "accuracy_ideal" in q
    d = run(["train", "--task", "digits", "--mode", "dnat", "--error-model", str(error_model), "--init",
             q["checkpoint"], "--out", str(tmp_path / "d.ckpt"), "--draws", "2", *QUICK, "--json"])
    assert d["error_model"]["pooled"] is False and len(d["accuracy_errors"]) == 2
    e = run(["evaluate", q["checkpoint"], "--error-model", str(error_model), "--draws", "2", "--limit", "48",
             "--json"])
    assert e["naive"] is True and e["draws"] == 2 and e["test_samples"] == 48
    assert e["accuracy_errors_std"] >= 0.0 and e["accuracy_ideal"] == pytest.approx(q["accuracy_ideal"])


def test_train_with_an_error_model_of_another_macro_than_the_profile_fails_clearly(tmp_path: Path) -> None:
    other = tmp_path / "odd.npz"
    noisy_model(SMALL_ODD, seed=0, draws=10).save(other)
    res = CliRunner().invoke(cli, ["train", "--task", "digits", "--mode", "dnat", "--error-model", str(other),
                                   "--profile", "default", "--out", str(tmp_path / "x.ckpt"), *QUICK])
    assert res.exit_code == 1
    assert "another MacroSpec" in res.output and "rows" in res.output


def test_dnat_without_error_model_and_float_with_one_are_usage_errors(tmp_path: Path, error_model: Path) -> None:
    res = CliRunner().invoke(cli, ["train", "--task", "digits", "--mode", "dnat", "--profile", "default",
                                   "--out", str(tmp_path / "x.ckpt"), *QUICK])
    assert res.exit_code == 2 and "--error-model" in res.output
    res = CliRunner().invoke(cli, ["train", "--task", "digits", "--mode", "float", "--error-model",
                                   str(error_model), "--out", str(tmp_path / "x.ckpt"), *QUICK])
    assert res.exit_code == 2 and "float" in res.output


def test_evaluate_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    res = CliRunner().invoke(cli, ["evaluate", str(bad)])
    assert res.exit_code == 1 and "artifact" in res.output


def test_cli_info_and_help_never_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cimlab.cli import cli\n"
        "r = CliRunner().invoke(cli, ['info', '--json', '--link', 'sim://?profile=ideal'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for cmd in (['train', '--help'], ['evaluate', '--help']):\n"
        "    assert CliRunner().invoke(cli, cmd).exit_code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_dnat_through_a_population_of_chips_with_their_deploy_step(tmp_path: Path, error_model: Path) -> None:
    """Several --error-model: one chip per batch, each decoded by its short characterization (--decode) and fitted
    per epoch (--calibrate), its columns shuffled; the accuracy is reported on every chip, and without the deploy
    step those figures are what ``cimlab evaluate`` gives on each chip."""
    second = tmp_path / "chip2.npz"
    noisy_model(MacroSpec(), seed=5, draws=40, noise=0.6).save(second)
    short = [tmp_path / "s1.npz", tmp_path / "s2.npz"]
    noisy_model(MacroSpec(), seed=0, draws=8).save(short[0])
    noisy_model(MacroSpec(), seed=5, draws=8, noise=0.6).save(short[1])
    chips = ["--error-model", str(error_model), "--error-model", str(second)]
    d = run(["train", "--task", "digits", "--mode", "dnat", *chips, "--decode", str(short[0]), "--decode",
             str(short[1]), "--calibrate", "32", "--shuffle-columns", "--out", str(tmp_path / "p.ckpt"), "--draws",
             "2", *QUICK, "--json"])
    assert [c["error_model"] for c in d["accuracy_chips"]] == [str(error_model), str(second)]
    assert d["accuracy_errors_mean"] == d["accuracy_chips"][0]["mean"]
    plain = run(["train", "--task", "digits", "--mode", "dnat", *chips, "--out", str(tmp_path / "q.ckpt"),
                 "--draws", "2", *QUICK, "--json"])
    for chip in plain["accuracy_chips"]:
        e = run(["evaluate", plain["checkpoint"], "--error-model", chip["error_model"], "--draws", "2", "--limit",
                 "48", "--json"])
        assert e["accuracy_errors_mean"] == pytest.approx(chip["mean"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--shuffle-columns"], "several --error-model"),
    (["--decode", "{em}", "--decode", "{em}"], "one short characterization per --error-model"),
])
def test_population_options_that_do_not_fit_are_usage_errors(tmp_path: Path, error_model: Path, extra: list[str],
                                                              message: str) -> None:
    args = ["train", "--task", "digits", "--mode", "dnat", "--error-model", str(error_model),
            *[a.format(em=error_model) for a in extra], "--out", str(tmp_path / "x.ckpt"), *QUICK]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and message in res.output, res.output
    q = CliRunner().invoke(cli, ["train", "--task", "digits", "--mode", "quant", "--profile", "default",
                                 "--calibrate", "8", "--out", str(tmp_path / "y.ckpt"), *QUICK])
    assert q.exit_code != 0 and "--mode dnat" in q.output

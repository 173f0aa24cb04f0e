"""Training survives interruption: a state saved at every epoch start, Ctrl-C prints the resume command, and
--resume finishes bit-identically to a run that was never interrupted."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from training_helpers import noisy_model

from cimlab.cli import cli
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.training.checkpoint import load_checkpoint
from cimlab.training.resume import EpochCheckpoint, resume_path


@pytest.fixture(scope="module")
def error_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("em") / "dmacem.npz"
    noisy_model(MacroSpec(), seed=0, draws=40).save(path)
    return path


def train_args(out: Path, error_model: Path) -> list[str]:
    # dnat: the sampled codes (each CIM layer's random stream) and Adam's moments must all resume exactly
    return ["train", "--task", "digits", "--mode", "dnat", "--error-model", str(error_model), "--model",
            "digits_mlp", "--limit", "40", "--epochs", "3", "--batch-size", "20", "--draws", "1", "--no-progress",
            "--out", str(out)]


def test_an_interrupted_run_resumes_bit_identically(tmp_path: Path, error_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    whole = runner.invoke(cli, train_args(tmp_path / "whole.ckpt", error_model), catch_exceptions=False)
    assert whole.exit_code == 0, whole.output
    assert not resume_path(tmp_path / "whole.ckpt").exists()  # a finished run leaves no state behind

    save = EpochCheckpoint.save

    def save_then_ctrl_c(self: EpochCheckpoint, *args: object, epoch: int, **kw: object) -> None:
        save(self, *args, epoch=epoch, **kw)
        if epoch == 2:
            raise KeyboardInterrupt  # what SIGINT raises, in the third epoch's first moment

    out = tmp_path / "cut.ckpt"
    with monkeypatch.context() as m:
        m.setattr(EpochCheckpoint, "save", save_then_ctrl_c)
        cut = runner.invoke(cli, train_args(out, error_model), catch_exceptions=False)
    assert cut.exit_code == 130
    assert "Resume with:" in cut.stderr and "--resume" in cut.stderr and "Aborted!" not in cut.output
    assert resume_path(out).is_file() and not out.exists()
    command = shlex.split(cut.stderr.split("Resume with:", 1)[1].strip().splitlines()[0])
    assert command[:2] == ["cimlab", "train"] and command[-1] == "--resume"
    given = train_args(out, error_model)[1:]

    def pairs(words: list[str]) -> list[tuple[str, str]]:
        return sorted(zip(words[::2], words[1::2], strict=False))

    flags = [w for w in command[2:-1] if w == "--no-progress"]
    assert flags == ["--no-progress"]
    assert pairs([w for w in command[2:-1] if w != "--no-progress"]) == pairs([w for w in given if w != "--no-progress"])

    again = runner.invoke(cli, [*train_args(out, error_model), "--resume", "--json"], catch_exceptions=False)
    assert again.exit_code == 0, again.stderr
    a, b = load_checkpoint(tmp_path / "whole.ckpt"), load_checkpoint(out)
    assert a.tensors.keys() == b.tensors.keys()
    for name, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[name]), name
    assert json.loads(again.stdout)["steps"] == 6  # 3 epochs of 2 steps, counted across the interruption
    assert a.manifest["metrics"] == b.manifest["metrics"]


def test_resume_refuses_another_run_and_a_missing_state(tmp_path: Path, error_model: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "x.ckpt"
    r = CliRunner().invoke(cli, [*train_args(out, error_model), "--resume"], catch_exceptions=False)
    assert r.exit_code == 2 and "no saved training state" in r.stderr
    save = EpochCheckpoint.save

    def stop(self: EpochCheckpoint, *args: object, epoch: int, **kw: object) -> None:
        save(self, *args, epoch=epoch, **kw)
        if epoch == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(EpochCheckpoint, "save", stop)
        assert CliRunner().invoke(cli, train_args(out, error_model), catch_exceptions=False).exit_code == 130
    other = [a if a != "20" else "10" for a in train_args(out, error_model)]  # another batch size
    r = CliRunner().invoke(cli, [*other, "--resume"], catch_exceptions=False)
    assert r.exit_code == 2 and "is of another run" in r.stderr and "batch_size" in r.stderr


@pytest.mark.parametrize(("model", "fits"), [("resnet20", "digits_mlp or digits_cnn"),
                                             ("har_cnn", "digits_mlp or digits_cnn")])
def test_a_model_that_does_not_fit_the_task_is_named(tmp_path: Path, model: str, fits: str) -> None:
    r = CliRunner().invoke(cli, ["train", "--task", "digits", "--mode", "float", "--model", model, "--out",
                                 str(tmp_path / "m.ckpt")], catch_exceptions=False)
    assert r.exit_code == 2 and fits in r.stderr and "Traceback" not in r.output and "Usage:" not in r.stderr

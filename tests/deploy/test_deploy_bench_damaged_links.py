"""`cimlab deploy` and `cimlab bench` through damaged links (about 1 % bit flips and 1 % lost chunks of replies) to a
served noisy twin, over a pty and over TCP: both succeed within every call's deadline, and the bench's predictions
are bit for bit those of a clean link (the device executes each request once, in order, whatever the link loses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cimlab.cli import cli
from cimlab.deploy.package import DeployPackage
from cimlab.twinproc import TwinProcess

FAULTS = "#flip=0.01&drop=0.01&fault_seed={seed}"


def run(*args: object) -> tuple[int, dict, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    lines = result.output.strip().splitlines()
    return result.exit_code, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}, result.output


@pytest.mark.parametrize("pty", [True, False], ids=["pty", "tcp"])
def test_deploy_and_bench_through_a_damaged_link(mlp_pkg: DeployPackage, pty: bool) -> None:
    assert mlp_pkg.path is not None
    pkg: Path = mlp_pkg.path
    bench = ("--limit", 120, "--batch", 4, "--draws", 0, "--no-progress", "--timeout", 0.3, "--json")
    code, clean, out = run("bench", pkg, "--link", "sim://?profile=default&seed=7", *bench)
    assert code == 0, out
    with TwinProcess(pty=pty, profile="default", seed=7) as url:
        code, dep, out = run("deploy", pkg, "--link", url + FAULTS.format(seed=3), "--timeout", 0.3, "--json")
        assert code == 0 and dep["ok"] and dep["rows_written"] > 0, out
        code, b, out = run("bench", pkg, "--link", url + FAULTS.format(seed=5), *bench)
        assert code == 0, out
    assert b["deploy"]["rows_written"] == 0  # deploy had already programmed the page through the damage
    assert b["predictions_sha256"] == clean["predictions_sha256"]
    assert b["accuracy_chip"] == clean["accuracy_chip"]
    assert b["chip"]["cycles"] == clean["chip"]["cycles"]  # nothing executed twice
    assert b["link_stats"]["retries"] > 0  # the faults hit

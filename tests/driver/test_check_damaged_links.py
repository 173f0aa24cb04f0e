"""`cimlab check` through damaged links to a served twin, over a pty and over TCP: about 1 % of writes and of the
chunks read have a bit flipped, and about 1 % of the chunks of replies are lost. Every run must pass, within the
deadline of every call (a call past its deadline fails the command)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cimlab.cli import cli
from cimlab.twinproc import TwinProcess

SEEDS = (2, 4, 6)


def check(url: str) -> tuple[int, dict]:
    args = ["check", "--link", url, "--batch", "96", "--timeout", "0.3", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    lines = result.output.strip().splitlines()
    return result.exit_code, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


@pytest.mark.parametrize("pty", [True, False], ids=["pty", "tcp"])
def test_check_passes_through_flips_and_lost_chunks(pty: bool) -> None:
    damaged = repaired = 0
    with TwinProcess(pty=pty, profile="default", seed=5) as url:
        for seed in SEEDS:
            code, rep = check(f"{url}#flip=0.01&drop=0.01&fault_seed={seed}")
            assert code == 0 and rep["ok"], (seed, rep.get("steps"))
            link = rep["link"]
            assert link["deadline_misses"] == 0
            damaged += link["bad_frames"] + link["stale_replies"] + link["nacks"]
            repaired += link["retries"]
    assert repaired >= 2 and damaged > 0  # the faults did hit: this was not a clean link

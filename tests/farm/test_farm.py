"""The board farm on a local Ray cluster (``ray.init(num_cpus=2)``), three served twins as boards.

One cluster for the module; each chip's model is checked against ``cimlab characterize`` run on that chip alone in
a subprocess (the twin gives the same codes for the same seed over TCP and in-process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cimlab.characterize import MeasurementStore
from cimlab.cli import cli
from cimlab.errmodel import MacErrorModel
from cimlab.farm import Board, BoardWorker, characterize_farm, check_resources, parse_boards
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.twinproc import TwinProcess

ray = pytest.importorskip("ray")

SETS = ("rows=32", "cols=4")
NAMES = ("chip1", "chip2", "chip3")
SEEDS = {"chip1": 11, "chip2": 12, "chip3": 13}
OPTIONS = {"repeats": 4, "batch_vectors": 2, "seed": 5}


def sim_url(seed: int) -> str:
    return f"sim://?profile=default&seed={seed}&" + "&".join(SETS)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, resources={f"board:{n}": 1 for n in NAMES}, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    try:
        # the driver opens its connection for actor calls on the first one; open it here, not inside a test
        actor = ray.remote(BoardWorker).options(num_cpus=0).remote("warmup", "sim://")
        assert ray.get(actor.host.remote(), timeout=60)
        ray.kill(actor)
        yield
    finally:
        ray.shutdown()


def independent_characterize(seed: int, out: Path, **extra: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "cimlab.cli", "characterize", "--link", sim_url(seed), "--out", str(out),
            "--no-progress", "--json"]
    for key, value in {**{k: str(v) for k, v in OPTIONS.items()}, **extra}.items():
        args += [f"--{key.replace('_', '-')}", value]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_each_chip_equals_characterize_alone(cluster: None, tmp_path: Path) -> None:
    twins = [TwinProcess(pty=False, profile="default", seed=SEEDS[n], sets=SETS) for n in NAMES]
    try:
        boards = [Board(n, t.start()) for n, t in zip(NAMES, twins, strict=True)]
        seen: dict[str, list[int]] = {n: [] for n in NAMES}
        result = characterize_farm(boards, tmp_path / "farm", options=OPTIONS,
                                   progress=lambda name, done, total, state: seen[name].append(done))
    finally:
        for t in twins:
            t.stop()
    procs = {n: independent_characterize(SEEDS[n], tmp_path / f"alone-{n}") for n in NAMES}
    for n, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert json.loads(out.decode().strip().splitlines()[-1])["complete"]
    assert result.complete
    models = {n: MacErrorModel.load(result.models[n]) for n in NAMES}
    for n in NAMES:
        alone = MacErrorModel.load(tmp_path / f"alone-{n}" / "dmacem.npz")
        assert models[n].model.chip_id == alone.model.chip_id == f"twin-default-s{SEEDS[n]}"
        assert models[n].counts.sum() > 0
        assert np.array_equal(models[n].counts, alone.counts), n
        # the store on the board's side is the one `cimlab characterize` would write
        with MeasurementStore.open(tmp_path / "farm" / n) as store:
            n_batches = store.meta["plan"]["n_batches"]
            assert len(store.done_batches(0)) == n_batches
        assert seen[n][-1] == n_batches
    merged = MacErrorModel.load(result.merged)
    assert np.array_equal(merged.counts, sum(m.counts for m in models.values()))
    # the chips differ (different seeds), so the farm did not measure one chip three times
    assert not np.array_equal(models["chip1"].counts, models["chip2"].counts)


def test_a_lost_host_resumes_where_it_stopped(cluster: None, tmp_path: Path) -> None:
    """chip2's board goes away after two committed batches; the others finish. A rerun with --resume runs only
    chip2's missing batches and keeps what was committed."""
    opts = {**OPTIONS, "batch_vectors": 1}
    # paced at 9600 baud (about 0.3 s a batch), so the driver's progress polls see it between batches
    lost = TwinProcess(pty=False, profile="default", seed=SEEDS["chip2"], sets=SETS, baud=9600)
    boards = [Board("chip1", sim_url(SEEDS["chip1"])), Board("chip2", lost.start()),
              Board("chip3", sim_url(SEEDS["chip3"]))]

    def lose_chip2(name: str, done: int, total: int, state: str) -> None:
        if name == "chip2" and done >= 2:
            lost.stop()

    try:
        first = characterize_farm(boards, tmp_path, options=opts, timeout=0.2, progress=lose_chip2)
    finally:
        lost.stop()
    by_name = {o.board.name: o for o in first.outcomes}
    assert not first.complete
    assert by_name["chip2"].result is None and by_name["chip2"].error
    assert by_name["chip1"].result["complete"] and by_name["chip3"].result["complete"]
    with MeasurementStore.open(tmp_path / "chip2") as store:
        kept = {r["batch"]: r["finished_at"] for r in store.batch_records(0)}
        total = store.meta["plan"]["n_batches"]
    assert 2 <= len(kept) < total

    with TwinProcess(pty=True, profile="default", seed=SEEDS["chip2"], sets=SETS) as url:
        boards[1] = Board("chip2", url)
        second = characterize_farm(boards, tmp_path, options=opts, resume=True)
    by_name = {o.board.name: o for o in second.outcomes}
    assert second.complete
    assert by_name["chip2"].result["batches_run"] == total - len(kept)
    assert by_name["chip1"].result["batches_run"] == 0
    with MeasurementStore.open(tmp_path / "chip2") as store:
        records = store.batch_records(0)
    assert sorted(r["batch"] for r in records) == list(range(total))
    assert {r["batch"]: r["finished_at"] for r in records if r["batch"] in kept} == kept
    # every planned conversion counted once: the same totals as an uninterrupted run of the same plan
    p = independent_characterize(SEEDS["chip2"], tmp_path / "alone", batch_vectors="1")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    alone = MacErrorModel.load(tmp_path / "alone" / "dmacem.npz")
    resumed = MacErrorModel.load(second.models["chip2"])
    assert np.array_equal(resumed.totals(), alone.totals())


def test_cli_farm_and_a_board_no_host_offers(cluster: None, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["farm", "characterize", "--ray", "auto", "--board", f"chip3={sim_url(3)}",
                              "--out", str(tmp_path), "--repeats", "2", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["complete"] and summary["boards"][0]["chip_id"] == "twin-default-s3"
    assert Path(summary["boards"][0]["model"]).is_file()
    with pytest.raises(ConfigError, match=r"board\(s\) chip9.*ray start --resources '\{\"board:chip9\": 1\}'"):
        check_resources(ray, [Board("chip9", "sim://")])


def test_board_arguments_are_checked() -> None:
    assert parse_boards(["a=sim://?seed=1", "b=/dev/ttyUSB0"]) == [Board("a", "sim://?seed=1"),
                                                                     Board("b", "/dev/ttyUSB0")]
    for bad, match in ((["a"], "NAME=URL"), (["a=x", "a=y"], "given twice: a"), ([], "at least one"),
                       (["a b=x"], "letters, digits")):
        with pytest.raises(ConfigError, match=match):
            parse_boards(bad)


def test_farm_bench_on_two_ideal_boards(cluster: None, tmp_path: Path) -> None:
    """Every board runs the package; on ideal twins each chip's predictions equal the host's ideal ones."""
    from cimlab.chip_sim import load_profile
    from cimlab.deploy.compile import compile_checkpoint
    from cimlab.farm import bench_farm
    from cimlab.training.api import prepare_model
    from cimlab.training.checkpoint import save_checkpoint
    from cimlab.training.tasks import load_task

    spec = load_profile("ideal").spec
    net, info = prepare_model(load_task("digits"), "quant", model_name="digits_mlp", spec=spec, seed=0)
    ckpt = save_checkpoint(tmp_path / "mlp.safetensors", net.eval(),
                           {"task": "digits", "model": info, "mode": "quant", "spec": spec.to_dict()})
    pkg = tmp_path / "mlp.npz"
    compile_checkpoint(ckpt, spec=spec, spec_source="test").save(pkg)
    boards = [Board("chip1", "sim://?profile=ideal&seed=1"), Board("chip2", "sim://?profile=ideal&seed=2")]
    outcomes = bench_farm(boards, pkg, options={"batch_size": 64, "draws": 0, "pooled": False, "seed": 0,
                                                "limit": 48, "data_dir": None})
    results = {o.board.name: o.result for o in outcomes}
    assert [o.error for o in outcomes] == [None, None]
    assert {r["chip_id"] for r in results.values()} == {"twin-ideal-s1", "twin-ideal-s2"}
    for r in results.values():
        assert r["images"] == 48 and r["package"] == str(pkg) and r["weight_mismatches"] == 0
        assert r["agreement_ideal"] == 1.0 and r["accuracy_chip"] == r["accuracy_ideal"]

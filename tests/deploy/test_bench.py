"""Bench: the network on the chip against the host's ideal path and the error model's prediction; determinism
across links and faults; the bounds."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from deploy_helpers import digits

from cimlab.firmware_bridge.errors import ArtifactError
from cimlab.deploy.bench import bench_package, chip_ideal_equal, public, resolve_error_model
from cimlab.deploy.package import DeployPackage
from cimlab.driver import Chip
from cimlab.training.api import model_from_checkpoint
from cimlab.training.checkpoint import load_checkpoint
from cimlab.training.loop import accuracy
from cimlab.links.base import Link, WrapperLink
from cimlab.twinproc import TwinProcess


def run(pkg: DeployPackage, url: str, limit: int | None = None, *, timeout: float = 1.0, window: int = 8,
        **kwargs: object) -> dict:
    data = digits(limit)
    with Chip.open(url, timeout=timeout, window=window) as chip:
        return bench_package(pkg, chip, data.x_test, data.y_test, **kwargs)  # type: ignore[arg-type]


def test_on_an_ideal_macro_the_chip_computes_the_hosts_ideal_path_bit_for_bit(mlp_ckpt: Path,
                                                                              mlp_pkg: DeployPackage) -> None:
    r = run(mlp_pkg, "sim://?profile=ideal", draws=0)
    assert chip_ideal_equal(r)
    assert r["accuracy_chip"] == r["accuracy_ideal"] and r["agreement_ideal"] == 1.0
    # ... and the host's ideal path is what `cimlab evaluate` computes from the checkpoint
    data = digits()
    model = model_from_checkpoint(load_checkpoint(mlp_ckpt))
    assert r["accuracy_ideal"] == accuracy(model, data.x_test, data.y_test)
    assert r["accuracy_chip"] > 0.5  # a trained network, not a constant guess
    assert r["prediction"]["mean"] is None and "no error model" in r["prediction"]["note"]


def test_a_three_page_network_reprograms_between_pages_and_stays_exact(cnn_pkg: DeployPackage) -> None:
    r = run(cnn_pkg, "sim://?profile=ideal", limit=48, draws=0, batch_size=16)
    assert chip_ideal_equal(r)
    s = r["schedule"]
    assert s["pages"] == 3 and s["programming_passes_per_batch"] == 3
    assert s["page_loads"] == 3 * 3 - 1  # three batches: 0 (verified), 1, 2, then 0, 1, 2 twice
    assert r["weight_mismatches"] == 0


def test_on_the_data_driven_twin_the_chip_lands_within_the_prediction(mlp_pkg: DeployPackage,
                                                                       harsh_model: Path) -> None:
    url = f"sim://?profile=default&error_model={harsh_model}&seed=4"
    r = run(mlp_pkg, url, draws=6, error_model=harsh_model)
    p = r["prediction"]
    assert len(p["draws"]) == 6 and p["std"] > 0 and p["pooled"] is False
    assert p["mean"] < p["ideal"] - 0.03  # the error model costs accuracy: the comparison is not trivial
    assert r["accuracy_chip"] < r["accuracy_ideal"] - 0.03
    assert r["within_spread"], (r["accuracy_chip"], p["mean"], p["std"])
    assert abs(r["gap_sigma"]) < 3.5


def test_the_same_seed_gives_the_same_result_over_sim_tcp_and_pty(mlp_pkg: DeployPackage) -> None:
    ref = run(mlp_pkg, "sim://?profile=default&seed=3", draws=0)
    assert ref["agreement_ideal"] < 1.0  # the default twin's errors do change some outputs
    for pty in (False, True):
        with TwinProcess(pty=pty, profile="default", seed=3) as url:
            r = run(mlp_pkg, url, draws=0)
        assert r["predictions_sha256"] == ref["predictions_sha256"], url
        assert r["accuracy_chip"] == ref["accuracy_chip"]
        assert r["chip"]["cycles"] == ref["chip"]["cycles"]


def test_a_faulty_link_slows_the_bench_but_never_changes_a_result(mlp_pkg: DeployPackage) -> None:
    # one frame in flight: a lost request is resent before any later one is sent, so the twin executes the
    # same operations in the same order (see the next test for several frames in flight)
    ref = run(mlp_pkg, "sim://?profile=default&seed=3", limit=200, draws=0, batch_size=50, window=1)
    r = run(mlp_pkg, "sim://?profile=default&seed=3#drop=0.05&flip=0.05&fault_seed=2", limit=200, draws=0,
            batch_size=50, timeout=0.05, window=1)
    assert r["link_stats"]["retries"] > 0
    assert r["predictions_sha256"] == ref["predictions_sha256"]
    assert r["accuracy_chip"] == ref["accuracy_chip"]
    assert r["chip"]["cycles"] == ref["chip"]["cycles"]  # nothing executed twice


class DropOnce(WrapperLink):
    """Drops the ``nth`` request frame of opcode ``opcode`` once (every frame is one write of the driver)."""

    def __init__(self, inner: Link, opcode: int, nth: int) -> None:
        super().__init__(inner)
        self.opcode, self.left = opcode, nth

    def _write(self, data: memoryview) -> None:
        if data[3] == self.opcode:
            self.left -= 1
            if self.left == 0:
                return
        self.inner.write(data)

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        return self.inner.read(max_bytes, timeout)


def test_a_lost_request_among_several_in_flight_does_not_change_a_result(mlp_pkg: DeployPackage) -> None:
    from cimlab.firmware_bridge.messages import Opcode
    from cimlab.links.sim import SimLink

    data = digits(200)
    results = []
    for drop in (False, True):
        inner = SimLink("sim://?profile=default&seed=3")
        link = DropOnce(inner, Opcode.MAC, 2) if drop else inner
        with Chip(link, timeout=0.05, window=8) as chip:
            results.append(bench_package(mlp_pkg, chip, data.x_test, data.y_test, draws=0, batch_size=200))
    assert results[1]["link_stats"]["retries"] > 0
    assert results[1]["predictions_sha256"] == results[0]["predictions_sha256"]


def test_bounds_on_a_paced_link(mlp_pkg: DeployPackage) -> None:
    run(mlp_pkg, "sim://?profile=ideal", limit=4, draws=0)  # the twin's kernels load once per process: not timed
    n = 100
    r = run(mlp_pkg, "sim://?profile=ideal#rate=1000000", limit=n, draws=0)
    ls, b, c = r["link_stats"], r["bounds"], r["chip"]
    assert ls["rate_source"] == "rate_hint" and ls["rate_Bps"] == 100_000
    busier = max(ls["bytes_out"], ls["bytes_in"])
    assert b["link_images_per_s"] == pytest.approx(100_000 * n / busier)
    assert b["macro_images_per_s"] == pytest.approx(mlp_pkg.spec.clock_hz * n / c["cycles"])
    assert b["holds"] == "link"
    assert r["images_per_s"] <= b["link_images_per_s"] * 1.05  # the pacing holds
    assert b["efficiency"] >= 0.6, b  # 0.8 on an idle machine; the host shares 2 cores here
    # chip cycles are the twin's per-vector cost for every tile, plus one op overhead per frame
    from cimlab.chip_sim import make_twin

    twin = make_twin("ideal")
    per_image = sum(twin.vector_cycles(t.macro_row, t.n_rows, raw=False)
                    for _, lm in mlp_pkg.schedule.layers for t in lm.tiles)
    assert per_image <= c["cycles_per_image"] <= per_image * 1.02
    assert c["energy_nj"] > 0 and c["conversions"] > 0
    assert c["latency_us_per_image"] == pytest.approx(c["cycles_per_image"] / mlp_pkg.spec.clock_hz * 1e6)


def test_an_unknown_link_rate_is_measured_with_ping(mlp_pkg: DeployPackage) -> None:
    r = run(mlp_pkg, "sim://?profile=ideal", limit=20, draws=0)
    ls = r["link_stats"]
    assert ls["rate_source"] == "measured (PING)" and ls["rate_Bps"] > 1e6  # in-process: far above a UART
    assert "_chip_logits" not in public(r)


def test_bench_refuses_another_macro(mlp_pkg: DeployPackage) -> None:
    with pytest.raises(ArtifactError, match="rows_per_conversion"):
        run(mlp_pkg, "sim://?profile=default&rows_per_conversion=8", limit=10, draws=0)


def test_the_training_error_model_is_found_only_when_unchanged(mlp_pkg: DeployPackage, harsh_model: Path,
                                                              tmp_path: Path) -> None:
    from cimlab.training.transfer import file_sha256

    pkg = copy.copy(mlp_pkg)
    em = {"source": str(harsh_model), "sha256": file_sha256(harsh_model)}
    pkg.manifest = {**mlp_pkg.manifest, "error_model": em}
    assert resolve_error_model(pkg, None) == (str(harsh_model), "the error model the checkpoint was trained with")
    pkg.manifest["error_model"] = {"source": str(harsh_model), "sha256": "0" * 64}
    path, note = resolve_error_model(pkg, None)
    assert path is None and "SHA-256 differs" in note
    pkg.manifest["error_model"] = {"source": str(tmp_path / "gone.npz"), "sha256": "0" * 64}
    assert resolve_error_model(pkg, None)[0] is None
    assert resolve_error_model(pkg, harsh_model) == (str(harsh_model), "given")


def test_a_package_whose_weights_disagree_with_its_tensors_is_refused(mlp_pkg: DeployPackage,
                                                                     tmp_path: Path) -> None:
    from cimlab.deploy.package import build_pages
    from cimlab.deploy.runner import build_model

    pkg = DeployPackage.load(mlp_pkg.path)
    name = next(iter(pkg.layers))
    w = pkg.layers[name].weights.copy()
    w[0, 0] = 0 if w[0, 0] else 1
    pkg.layers[name].weights = w
    pkg.pages = build_pages(pkg.spec, pkg.schedule, {n: lp.weights for n, lp in pkg.layers.items()})
    edited = DeployPackage.load(pkg.save(tmp_path / "edited.npz"))  # a consistent file ...
    with pytest.raises(ArtifactError, match="quantizes to other weights"):  # ... that is not the network
        build_model(edited)


def test_the_progress_bar_advances_per_tile_within_a_batch(cnn_pkg: DeployPackage,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from cimlab.deploy import bench as bench_module

    calls: list[int] = []
    totals: list[int] = []

    @contextlib.contextmanager
    def recording_bar(enabled: bool, total: int, description: str):  # noqa: ANN202
        totals.append(total)
        yield lambda n=1, **kw: calls.append(n)

    monkeypatch.setattr(bench_module, "progress_bar", recording_bar)
    x = digits(24).x_test[:24]
    with Chip.open("sim://?profile=ideal") as chip:
        run = bench_module.run_on_chip(cnn_pkg, chip, x, batch_size=24, progress=True, max_rewrites=1)
    tiles = sum(len(lm.tiles) for _, lm in cnn_pkg.schedule.layers)
    assert totals == [tiles] and len(calls) == tiles == run.runner.calls  # one batch, several steps, not 0/N

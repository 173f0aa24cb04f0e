"""Deploy: program, read back, rewrite what differs (bounded), report per tile/row/column; idempotent."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from cimlab.chip_sim import TwinController, load_profile
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.deploy.package import DeployPackage
from cimlab.deploy.program import PageLoader, deploy_package, row_runs
from cimlab.driver import Chip
from cimlab.links.sim import SimLink


class FaultyTwin(TwinController):
    """A twin whose weight memory has a stuck cell (reads back ``stuck_value`` whatever was written) and a row
    that drops its first ``flaky_writes`` writes."""

    stuck: tuple[int, int] | None = None
    stuck_value = 0
    flaky_row: int | None = None
    flaky_writes = 0

    def write_weights(self, row_start: int, weights: np.ndarray) -> None:
        w = np.array(weights)
        r = self.flaky_row
        if r is not None and row_start <= r < row_start + w.shape[0] and self.flaky_writes > 0:
            self.flaky_writes -= 1
            w[r - row_start] = 0
        super().write_weights(row_start, w)

    def read_weights(self, row_start: int, n_rows: int) -> np.ndarray:
        out = super().read_weights(row_start, n_rows)
        if self.stuck is not None:
            r, c = self.stuck
            if row_start <= r < row_start + n_rows:
                out[r - row_start, c] = self.stuck_value
        return out


@contextmanager
def faulty_chip(**faults: object) -> Iterator[tuple[Chip, FaultyTwin]]:
    made: list[FaultyTwin] = []

    def factory(profile: str, seed: int, overrides: dict[str, str]) -> FaultyTwin:
        twin = FaultyTwin(load_profile(profile, overrides), seed)
        for k, v in faults.items():
            setattr(twin, k, v)
        made.append(twin)
        return twin

    chip = Chip(SimLink("sim://?profile=default", make_controller=factory))
    try:
        chip.identify()
        yield chip, made[0]
    finally:
        chip.close()


def test_deploy_programs_verifies_and_is_idempotent(mlp_pkg: DeployPackage) -> None:
    image = mlp_pkg.page_image(0)
    with Chip.open("sim://?profile=default") as chip:
        rep = deploy_package(chip, mlp_pkg)
        assert rep.ok and rep.passes == 1
        assert rep.rows_written == int((image != 0).any(axis=1).sum())  # the twin starts with zeros
        np.testing.assert_array_equal(chip.read_weights(), image)
        energy = chip.status().energy_fj
        again = deploy_package(chip, mlp_pkg)
        assert again.ok and again.rows_written == 0 and again.passes == 0
        assert chip.status().energy_fj == energy  # nothing was written the second time (reads cost no energy)
        np.testing.assert_array_equal(chip.read_weights(), image)


def test_deploy_clears_what_another_network_left(mlp_pkg: DeployPackage) -> None:
    spec = mlp_pkg.spec
    with Chip.open("sim://?profile=default") as chip:
        rng = np.random.default_rng(1)
        chip.write_weights(rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols)))
        rep = deploy_package(chip, mlp_pkg)
        assert rep.ok and rep.rows_written == spec.rows
        np.testing.assert_array_equal(chip.read_weights(), mlp_pkg.page_image(0))


def test_a_stuck_cell_is_rewritten_then_reported_by_tile_row_and_column(mlp_pkg: DeployPackage) -> None:
    tile = mlp_pkg.schedule.page_tiles(0)[1]
    t = tile.tile
    r, c = t.macro_row + 2, t.macro_col + 3
    want = int(mlp_pkg.page_image(0)[r, c])
    stuck = mlp_pkg.spec.weight_min if want != mlp_pkg.spec.weight_min else mlp_pkg.spec.weight_max
    with faulty_chip(stuck=(r, c), stuck_value=stuck) as (chip, _):
        rep = deploy_package(chip, mlp_pkg, max_rewrites=2)
    assert not rep.ok
    assert rep.passes == 3  # the first write and two rewrites, then it gives up
    first = int((mlp_pkg.page_image(0) != 0).any(axis=1).sum())
    assert rep.rows_written == first + 2  # only the bad row is rewritten
    assert len(rep.mismatches) == 1
    m = rep.mismatches[0]
    assert (m.macro_row, m.macro_col, m.expected, m.read) == (r, c, want, stuck)
    assert (m.layer, m.tile, m.layer_row, m.layer_col) == (tile.layer, tile.index, t.row0 + 2, t.col0 + 3)
    assert rep.by_tile() == {f"{tile.layer}#{tile.index}": 1}
    d = rep.as_dict()
    assert d["mismatched_rows"] == [r] and d["mismatched_cols"] == [c] and d["ok"] is False


def test_a_cell_outside_every_tile_is_reported_as_such(mlp_pkg: DeployPackage) -> None:
    spec = mlp_pkg.spec
    with faulty_chip(stuck=(spec.rows - 1, spec.cols - 1), stuck_value=1) as (chip, _):
        rep = deploy_package(chip, mlp_pkg, max_rewrites=0)
    assert rep.passes == 1
    assert [(m.layer, m.tile, m.expected, m.read) for m in rep.mismatches] == [(None, None, 0, 1)]
    assert rep.by_tile() == {"(outside tiles)": 1}


def test_a_write_that_did_not_take_is_fixed_by_a_rewrite(mlp_pkg: DeployPackage) -> None:
    row = mlp_pkg.schedule.page_tiles(0)[0].tile.macro_row + 1
    with faulty_chip(flaky_row=row, flaky_writes=1) as (chip, twin):
        rep = deploy_package(chip, mlp_pkg)
        assert rep.ok and rep.passes == 2
        assert twin.flaky_writes == 0
        np.testing.assert_array_equal(chip.read_weights(), mlp_pkg.page_image(0))


def test_deploy_refuses_another_macro_and_writes_nothing(mlp_pkg: DeployPackage) -> None:
    with Chip.open("sim://?profile=default&cols=32") as chip:
        with pytest.raises(ArtifactError, match="cols"):
            deploy_package(chip, mlp_pkg)
        assert not chip.read_weights().any()


def test_page_loader_switches_pages_with_the_rows_that_differ(cnn_pkg: DeployPackage) -> None:
    assert cnn_pkg.n_pages == 3
    with Chip.open("sim://?profile=ideal") as chip:
        loader = PageLoader(chip, cnn_pkg)
        loader.ensure(0)  # first use: verified by read-back
        assert loader.current == 0 and loader.loads == 0 and len(loader.reports) == 1
        written = loader.rows_written
        loader.ensure(1)
        np.testing.assert_array_equal(chip.read_weights(), cnn_pkg.page_image(1))
        assert loader.rows_written - written == cnn_pkg.rows_written_per_pass()[1]
        loader.ensure(1)  # already there: nothing sent
        assert loader.loads == 1
        loader.ensure(0)
        np.testing.assert_array_equal(chip.read_weights(), cnn_pkg.page_image(0))
        assert loader.loads == 2 and not loader.mismatches


def test_row_runs_and_argument_checks(mlp_pkg: DeployPackage) -> None:
    assert row_runs(np.array([0, 1, 1, 0, 1, 0, 0, 1], dtype=bool)) == [(1, 2), (4, 1), (7, 1)]
    assert row_runs(np.zeros(4, dtype=bool)) == []
    assert row_runs(np.ones(3, dtype=bool)) == [(0, 3)]
    with Chip.open("sim://?profile=default") as chip:
        with pytest.raises(ConfigError, match="max_rewrites"):
            deploy_package(chip, mlp_pkg, max_rewrites=-1)
        with pytest.raises(ConfigError, match="page 3"):
            deploy_package(chip, mlp_pkg, page=3)

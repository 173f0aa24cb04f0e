"""cimlab's pytest plugin, run inside pytester sessions: options, marker, fixtures, and the documented example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cimlab.characterize import Plan, PlanOptions
from cimlab.errmodel import MacErrorModel
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.pytest_plugin import with_profile
from cimlab.twinproc import TwinProcess

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_my_chip.py"


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def test_plugin_is_registered_by_its_entry_point(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--cimlab-link=URL*", "*--cimlab-error-model=PATH*"])
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.cimlab(profile=None, needs=None)*"])


def test_example_file_runs_on_the_twin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_my_chip=EXAMPLE.read_text())
    result = _run(pytester, "-rs")
    result.assert_outcomes(passed=4, skipped=1)
    result.stdout.fnmatch_lines(["*needs a board; the chip under test (sim://) is a twin*"])


def test_example_file_runs_unchanged_on_a_served_twin(pytester: pytest.Pytester) -> None:
    """Behind a pty, as a board would be: the twin-only test skips (its profile cannot be set), the board-only
    test skips because the chip says it is a twin in HELLO."""
    pytester.makepyfile(test_my_chip=EXAMPLE.read_text())
    with TwinProcess(pty=True, profile="default") as url:
        result = _run(pytester, "-rs", f"--cimlab-link={url}")
    result.assert_outcomes(passed=3, skipped=2)
    result.stdout.fnmatch_lines([f"*needs the sim:// twin; the chip under test is {url}*",
                                 f"*needs a board; the chip under test ({url}) is a twin*"])


def test_board_only_tests_run_on_a_chip_that_is_no_twin(pytester: pytest.Pytester) -> None:
    """The rule reads HELLO: a chip whose bitstream_id is not the twin's is a board (here a served twin made to
    look like one by changing the id the plugin compares with)."""
    pytester.makeconftest("import cimlab.pytest_plugin as p\np.TWIN_BITSTREAM_ID = 'fpga-bitstream'\n")
    pytester.makepyfile(test_my_chip=EXAMPLE.read_text())
    with TwinProcess(pty=False, profile="default") as url:
        result = _run(pytester, "-rs", f"--cimlab-link={url}")
    result.assert_outcomes(passed=4, skipped=1)
    result.stdout.fnmatch_lines(["*needs the sim:// twin*"])


def test_chip_is_reset_between_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import numpy as np

        def test_a_dirties(chip):
            chip.write_weights(np.full((chip.spec.rows, chip.spec.cols), 3))
            chip.write_reg("VDD_MV", 650)
            chip.mac(np.ones((2, chip.spec.rows), dtype=np.int64))

        def test_b_sees_a_clean_chip(chip):
            assert (chip.read_weights() == 0).all()
            assert chip.read_reg("VDD_MV") != 650
            assert chip.status().ops == 0
        """
    )
    _run(pytester).assert_outcomes(passed=2)


def test_marker_profile_selects_the_twin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.cimlab(profile="ideal")
        def test_ideal(chip, cimlab_link):
            assert chip.hello.chip_id.startswith("twin-ideal")
            assert cimlab_link == "sim://?profile=ideal&seed=4"

        def test_default(chip):
            assert chip.hello.chip_id == "twin-default-s4"
        """
    )
    _run(pytester, "--cimlab-link=sim://?seed=4").assert_outcomes(passed=2)


def test_with_profile_keeps_the_other_keys() -> None:
    assert with_profile("sim://?profile=large&rows=32#drop=0.1", "ideal") == "sim://?profile=ideal&rows=32#drop=0.1"
    assert with_profile("/dev/pts/3", "ideal") == "/dev/pts/3"
    assert with_profile("sim://", None) == "sim://"


def test_bad_marker_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.cimlab(needs="boards")
        def test_x(chip):
            pass
        """
    )
    result = _run(pytester)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*needs is one of board, twin*"])


def test_twin_server_on_tcp(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from cimlab import Chip

        @pytest.mark.cimlab(profile="ideal")
        @pytest.mark.parametrize("twin_server", ["tcp"], indirect=True)
        def test_tcp(twin_server):
            assert twin_server.startswith("tcp://127.0.0.1:")
            with Chip.open(twin_server) as c:
                assert c.hello.chip_id.startswith("twin-ideal")
        """
    )
    _run(pytester).assert_outcomes(passed=1)


def test_error_model_from_a_path(pytester: pytest.Pytester, tmp_path: Path) -> None:
    spec = MacroSpec(rows=16, cols=2)
    counts = np.random.default_rng(0).integers(0, 5, (spec.physical_cols, spec.n_levels, spec.n_codes))
    path = MacErrorModel.from_counts(spec, counts, chip_id="chip7").save(tmp_path / "m.npz")
    np.save(tmp_path / "counts.npy", counts)
    pytester.makepyfile(
        f"""
        import numpy as np

        def test_loaded(error_model):
            assert error_model.model.chip_id == "chip7"
            assert (error_model.counts == np.load({str(tmp_path / "counts.npy")!r})).all()
        """
    )
    _run(pytester, f"--cimlab-error-model={path}").assert_outcomes(passed=1)


def test_error_model_by_quick_characterization(pytester: pytest.Pytester) -> None:
    """Without a path: one sweep of the chip under test per session, every reachable level of every column at
    least ``--cimlab-quick-repeats`` times; the chip is clean again afterwards."""
    spec = MacroSpec(rows=32, cols=4)
    reachable = [s for s in range(spec.n_levels) if s not in Plan(spec, PlanOptions(repeats=3)).unplanned_levels]
    pytester.makepyfile(
        f"""
        SEEN = []

        def test_first(error_model, chip):
            totals = error_model.totals()
            assert error_model.spec == chip.spec
            assert (totals[:, {reachable!r}] >= 3).all()
            assert (chip.read_weights() == 0).all()
            SEEN.append(id(error_model))

        def test_second_reuses_it(error_model):
            assert SEEN == [id(error_model)]
        """
    )
    _run(pytester, "--cimlab-link=sim://?rows=32&cols=4", "--cimlab-quick-repeats=3").assert_outcomes(passed=2)

"""The RTL twin against the Python twin: the same profile, seed and operations give bit-identical codes, outputs,
weights, cycle counts (the RTL's own counters), conversions and energy; the Python twin's reference mode (its
clock-by-clock sequencer) is checked against the RTL, not against itself."""

from __future__ import annotations

import numpy as np
import pytest
from cimlab.firmware_bridge.errors import DeviceError
from cimlab.firmware_bridge.messages import Status
from rtl_helpers import GEOMETRIES, NVM, TWOS, assert_same, exercise, python_chip, rtl_chip


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_the_rtl_and_both_python_paths_agree(name: str, rtl_builds: dict) -> None:
    profile, overrides = GEOMETRIES[name]
    with rtl_chip(profile, overrides, seed=7) as chip:
        hello = chip.hello
        rtl = exercise(chip, seed=11, steps=14)
    with python_chip(profile, overrides, seed=7) as chip:
        assert chip.spec == hello.spec
        fast = exercise(chip, seed=11, steps=14)
    with python_chip(profile, overrides, seed=7, mode="reference") as chip:
        ref = exercise(chip, seed=11, steps=14)
    assert_same(rtl, fast)
    assert_same(rtl, ref)
    assert hello.bitstream_id == "rtl-verilator" and hello.chip_id == f"rtl-{profile}-s7"


def test_reset_and_counters_behave_alike(rtl_builds: dict) -> None:
    profile, overrides = TWOS
    seen = []
    for open_chip in (lambda: rtl_chip(profile, overrides, seed=2), lambda: python_chip(profile, overrides, 2)):
        with open_chip() as chip:
            spec = chip.spec
            chip.write_weights(np.full((spec.rows, spec.cols), spec.weight_max))
            x = np.full((5, spec.rows), spec.input_max)
            y = chip.mac(x)
            chip.write_reg("SCRATCH", 0xDEADBEEF)
            chip.write_reg("CTRL", 1)  # clears the counters
            after_clear = chip.status()
            chip.reset(clear_weights=True)
            seen.append(
                (y, after_clear, chip.status(), chip.read_reg("SCRATCH"), chip.read_weights(), chip.mac(x))
            )
    rtl, python = seen
    for u, v in zip(rtl, python, strict=True):
        assert np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v
    assert rtl[1].cycles == 0 and rtl[3] == 0 and not rtl[4].any()


def test_conversion_times_may_vary(rtl_builds: dict) -> None:
    """The sequencer waits for each conversion: the macro's extra cycles add to the count, codes are unchanged."""
    profile, overrides = NVM
    extra = [0, 3, 1, 7]
    x = np.random.default_rng(3).integers(0, 16, (6, 24))
    with rtl_chip(profile, overrides, seed=5, macro_hooks={"adc_extra": extra}) as chip:
        y_rtl = chip.mac(x)
        cycles_rtl = chip.last_cost.cycles
    with python_chip(profile, overrides, seed=5) as chip:
        y_py = chip.mac(x)
        cycles_py = chip.last_cost.cycles
    spec = chip.spec
    conversions = 6 * spec.n_planes * spec.n_groups
    assert np.array_equal(y_rtl, y_py)
    assert cycles_rtl == cycles_py + sum(extra[i % len(extra)] for i in range(conversions))


def test_a_hung_macro_keeps_the_sequencer_busy_until_reset(rtl_builds: dict) -> None:
    profile, overrides = TWOS
    x = np.ones((2, 40), dtype=np.int64)
    with rtl_chip(profile, overrides, macro_hooks={"adc_stall_at": 3}, run_timeout_s=0.5) as chip:
        with pytest.raises(DeviceError) as err:
            chip.mac(x)
        assert err.value.status == Status.INTERNAL and "did not finish" in str(err.value)
        assert chip.status().busy
        chip.reset()
        assert not chip.status().busy
        chip.write_weights(np.ones((40, 3), dtype=np.int64))
        assert chip.mac(x).shape == (2, 3)


def test_characterize_on_the_rtl_twin_measures_what_the_python_twin_does(rtl_builds: dict, tmp_path) -> None:
    """``cimlab characterize`` through sim://?backend=rtl: the same error model, count for count."""
    from click.testing import CliRunner

    from cimlab.cli import cli

    profile, overrides = TWOS
    query = "&".join(f"{k}={v}" for k, v in {"profile": profile, "seed": 4, **overrides}.items())
    models = []
    for backend, link in (("rtl", f"sim://?backend=rtl&{query}"), ("python", f"sim://?{query}")):
        out = tmp_path / backend
        args = ["characterize", "--link", link, "--timeout", "10", "--out", str(out), "--repeats", "4",
                "--batch-vectors", "48"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        with np.load(out / "dmacem.npz", allow_pickle=False) as model:
            models.append(model["counts"].copy())
    assert models[0].sum() > 0 and np.array_equal(models[0], models[1])

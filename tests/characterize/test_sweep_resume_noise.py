"""A resumed sweep on a noisy twin repeats the codes of an uninterrupted one (the NOISE_SEED register, per batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from characterize_helpers import store_counts, sweep

from cimlab.characterize import MeasurementStore, Plan, PlanOptions, SweepRunner, check_resume
from cimlab.driver import Chip

NOISY = "sim://?profile=default&rows=64&seed=3&noise_sigma_lsb=0.8"  # static errors and strong read noise


def test_a_killed_batch_redone_draws_the_same_noise(tmp_path: Path) -> None:
    """The twin keeps running while the host dies mid-batch (its noise stream moves on); the resumed sweep still
    gives exactly the counts of a sweep that was never interrupted."""
    options = PlanOptions(repeats=40, batch_vectors=8, seed=2)
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with Chip.open(NOISY) as chip:
        first = sweep(NOISY, tmp_path / "cut", options, should_stop=stop_after_two, chip=chip)
        assert first.interrupted and first.batches_done == 2
        # the batch the host was killed in: its MAC_RAW ran on the twin, nothing reached the store
        plan = Plan(chip.spec, options)
        chip.mac_raw(plan.batch(2).inputs)
        with MeasurementStore.open(tmp_path / "cut") as store:
            opts, _ = check_resume(store, chip, {}, None)
            assert SweepRunner(chip, store, Plan(chip.spec, opts)).run().complete
    whole = sweep(NOISY, tmp_path / "whole", options)
    assert whole.complete and whole.batches_total > 3
    cut, full = store_counts(tmp_path / "cut"), store_counts(tmp_path / "whole")
    s = np.arange(cut.shape[1])
    assert cut[:, s, s].sum() < 0.8 * cut.sum()  # the noise makes many codes differ from the ideal one
    np.testing.assert_array_equal(cut, full)

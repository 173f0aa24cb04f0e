"""Per-chip column placement: the schedule's busiest columns on the chip's most accurate ones.

Dies of one design differ column by column (read noise, missing codes, a converter's non-linearity). A network
trained for the design, not for one die (``fit(population=..., shuffle_columns=True)``), does not depend on which
column holds which output, so at deploy time its columns may go where the target die converts best. The score of a
chip column is what the deploy step's table decoder (``cimlab.training.transfer.ColumnDecoder``) leaves of its
error, from a short characterization of that die:

- per physical column ``j``: the mean over the levels the characterization reached of
  ``E[(value[j, code] - s / adc_lsb)^2 | s]``, the squared error in ideal-code units of the decoded code of level
  ``s`` (read noise and the information a converter loses; what the decoder can invert costs nothing);
- per macro column ``c``: the sum over weight slices ``k`` of ``slice_weight[k]^2`` times the score of its physical
  column ``j = k * cols + c`` (the error variance it adds to a MAC output, up to the planes' common factor).

The schedule's logical columns are ranked by use (conversions per input vector over every tile of every page, so a
column that many layers share comes first) and the busiest gets the best chip column. A network trained on one die
at training's placement must keep that placement (leave it unplaced).
"""

from __future__ import annotations

import numpy as np

from cimlab.deploy.schedule import Schedule
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec


def decoded_error(model: ErrorModel) -> np.ndarray:
    """Mean squared error per physical column after the table decoder, ideal-code units^2, float64 [J]; the levels
    the characterization never reached on a column do not count (a column that reached none scores +inf)."""
    from cimlab.training.transfer import ColumnDecoder

    spec = model.spec
    table = ColumnDecoder.from_model(model).table  # [J, C]
    counts = model.counts.astype(np.float64)  # [J, L, C]
    totals = counts.sum(axis=2)
    freq = np.divide(counts, totals[:, :, None], out=np.zeros_like(counts), where=totals[:, :, None] > 0)
    ideal = np.arange(counts.shape[1], dtype=np.float64) / spec.adc_lsb  # [L]
    sq = (table[:, None, :] - ideal[None, :, None]) ** 2  # [J, L, C]
    per_level = (freq * sq).sum(axis=2)  # [J, L]
    reached = totals > 0
    n = reached.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = np.where(reached, per_level, 0.0).sum(axis=1) / n
    return np.where(n > 0, mse, np.inf)


def column_scores(spec: MacroSpec, error: np.ndarray) -> np.ndarray:
    """Each macro column's error variance in a MAC output (up to a common factor), float64 [cols], from the
    physical columns' ``decoded_error`` [J]."""
    e = np.asarray(error, dtype=np.float64)
    if e.shape != (spec.physical_cols,):
        raise ConfigError(f"column errors must have one entry per physical column ({spec.physical_cols}), "
                          f"got shape {list(e.shape)}")
    sw2 = spec.slice_weights().astype(np.float64) ** 2
    return (sw2[:, None] * e.reshape(spec.n_slices, spec.cols)).sum(axis=0)


def column_use(schedule: Schedule) -> np.ndarray:
    """Conversions per input vector on each logical macro column, every tile of every page, int64 [cols]."""
    spec = schedule.spec
    use = np.zeros(spec.cols, dtype=np.int64)
    for p in schedule.tiles():
        t = p.tile
        use[t.macro_col : t.macro_col + t.macro_cols] += spec.n_planes * t.n_groups(spec) * spec.n_slices
    return use


def quiet_column_order(schedule: Schedule, scores: np.ndarray) -> np.ndarray:
    """The chip column of each logical column, int64 [cols]: logical columns by use (most first), chip columns by
    score (lowest first), matched in turn; ties keep column order. Paired schedules move whole pairs."""
    spec = schedule.spec
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (spec.cols,):
        raise ConfigError(f"column scores must have one entry per macro column ({spec.cols}), got {list(s.shape)}")
    unit = 2 if any(p.tile.paired for p in schedule.tiles()) else 1
    n_units = spec.cols // unit
    use = column_use(schedule)[: n_units * unit].reshape(n_units, unit).sum(axis=1)
    unit_scores = s[: n_units * unit].reshape(n_units, unit).sum(axis=1)
    busiest = np.argsort(-use, kind="stable")
    quietest = np.argsort(unit_scores, kind="stable")
    unit_order = np.empty(n_units, dtype=np.int64)
    unit_order[busiest] = quietest
    order = np.arange(spec.cols, dtype=np.int64)
    lanes = np.arange(unit, dtype=np.int64)
    order[: n_units * unit] = (unit_order[:, None] * unit + lanes[None, :]).reshape(-1)
    return order


def place_on_chip(schedule: Schedule, model: ErrorModel) -> Schedule:
    """``schedule`` placed on the die that ``model`` (a short characterization of it) describes.

    Raises:
        ConfigError: the error model is for another MacroSpec.
    """
    if model.spec != schedule.spec:
        raise ConfigError(f"the error model is for {model.spec.describe()}, the schedule for "
                          f"{schedule.spec.describe()}")
    scores = column_scores(schedule.spec, decoded_error(model))
    return schedule.placed_on(quiet_column_order(schedule, scores))


__all__ = ["column_scores", "column_use", "decoded_error", "place_on_chip", "quiet_column_order"]

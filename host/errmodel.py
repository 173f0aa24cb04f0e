"""Analysis of a measured MAC error model (D-MAC-EM): the host's view of ``cimlab.firmware_bridge.errmodel``.

``MacErrorModel`` wraps ``cimlab.firmware_bridge.errmodel.ErrorModel`` (the ``.npz`` format, loading, saving and the
vectorised code sampler live there) and derives what characterization, training and reports need:

- conditional probabilities P(code | s) with additive smoothing, per column [J, L, C] or pooled [L, C];
- the mean transfer curve E[code | s], its local slope, the per-level sigma and the spread across columns;
- INL/DNL of the mean transfer against its best-fit line;
- a per-column straight-line fit of the mean codes (gain, offset): what the codes show;
- a per-column quantization-aware fit of the analog value behind the codes (gain, offset, noise), an ordinal
  probit model with the ideal ADC thresholds (see ``fit_analog``): what the macro does below one LSB.

Units: levels ``s`` are ideal partial sums (0 .. s_max); codes and "LSB" are ADC codes; a gain of 1 is the ideal
slope of ``1 / adc_lsb`` codes per level. Rows (column, level) without counts are NaN in every statistic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cimlab.firmware_bridge.errmodel import CodeSampler, ErrorModel
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec

RAIL_FRACTION = 0.0
"""A level whose codes reach the bottom or top code more often than this is left out of the line fits (clipped)."""


@dataclass(frozen=True)
class LineFit:
    """Straight line ``mean_code = gain * s / adc_lsb + offset`` per column (or pooled: arrays of shape [1]).

    Attributes:
        gain: slope relative to the ideal (1.0 = one code per ``adc_lsb`` levels).
        offset: intercept, LSB (codes).
        rms: RMS of the mean codes about the line, LSB.
        levels_used: levels that entered the fit (unclipped, observed).
    """

    gain: np.ndarray
    offset: np.ndarray
    rms: np.ndarray
    levels_used: np.ndarray


@dataclass(frozen=True)
class AnalogFit:
    """Per-column ordinal-probit fit (see ``MacErrorModel.fit_analog``), arrays of shape [J].

    Attributes:
        gain: slope of the analog value against the ideal one (1.0 = ideal).
        offset: analog offset, LSB.
        noise: analog noise, 1 sigma, LSB (also absorbs anything that varies conversion to conversion, such as
            cell mismatch over randomised rows).
        gain_se, offset_se, noise_se: standard errors from the observed information, same units.
        resolved: the codes determine the noise to better than ``resolve_rel`` (relative standard error); where
            False the analog errors stay below what the codes show, and the numbers are bounds, not estimates.
        conversions: counts that entered each column's fit.
    """

    gain: np.ndarray
    offset: np.ndarray
    noise: np.ndarray
    gain_se: np.ndarray
    offset_se: np.ndarray
    noise_se: np.ndarray
    resolved: np.ndarray
    conversions: np.ndarray


class MacErrorModel:
    """A measured error model with its analysis views.

    Args:
        model: the underlying ``cimlab.firmware_bridge.errmodel.ErrorModel`` (counts and meta).
    """

    def __init__(self, model: ErrorModel) -> None:
        self.model = model
        self._sampler: CodeSampler | None = None

    # ---- construction and files -------------------------------------------------------------------------
    @classmethod
    def from_counts(
        cls,
        spec: MacroSpec,
        counts: np.ndarray,
        *,
        chip_id: str = "",
        conditions: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> MacErrorModel:
        """A model from counts [J, n_levels, n_codes] (ShapeError if they do not fit ``spec``)."""
        return cls(ErrorModel(spec, np.asarray(counts), chip_id, dict(conditions or {}), dict(provenance or {})))

    @classmethod
    def load(cls, path: str | os.PathLike) -> MacErrorModel:
        """Read a ``.npz`` model (ArtifactError naming what is wrong)."""
        return cls(ErrorModel.load(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ``.npz`` atomically."""
        return self.model.save(path)

    @classmethod
    def merge(cls, models: Sequence[MacErrorModel], *, allow_mixed_chips: bool = False) -> MacErrorModel:
        """One model whose counts are the sum of ``models``' (all of one MacroSpec; ArtifactError otherwise).

        Models of different chips (chip ids) are refused unless ``allow_mixed_chips``: their errors differ column by
        column, and a sum of them describes neither. The merged provenance records every chip id
        (``chip_ids``), the conditions when they differ, and every input's provenance.
        """
        if not models:
            raise ConfigError("merge needs at least one model")
        spec = models[0].spec
        for i, m in enumerate(models[1:], start=1):
            if m.spec != spec:
                diff = spec_differences(spec, m.spec, "model 0", f"model {i}")
                raise ArtifactError(f"cannot merge models of different MacroSpecs: {diff}")
        counts = np.sum([m.counts for m in models], axis=0, dtype=np.int64)
        chip_ids = sorted({m.model.chip_id for m in models})
        if len(chip_ids) > 1 and not allow_mixed_chips:
            raise ArtifactError(f"the models come from {len(chip_ids)} chips ({', '.join(map(repr, chip_ids))}); "
                                "merging them mixes their per-column errors: pass --allow-mixed-chips to do it anyway")
        conds = [m.model.conditions for m in models]
        same_conditions = all(c == conds[0] for c in conds)
        provenance = {"merged_from": [m.model.provenance for m in models], "chip_ids": chip_ids}
        if not same_conditions:
            provenance["conditions_merged"] = conds
        return cls.from_counts(
            spec,
            counts,
            chip_id=chip_ids[0] if len(chip_ids) == 1 else "+".join(chip_ids),
            conditions=conds[0] if same_conditions else {},
            provenance=provenance,
        )

    # ---- basic views --------------------------------------------------------------------------------------
    @property
    def spec(self) -> MacroSpec:
        """The measured macro."""
        return self.model.spec

    @property
    def counts(self) -> np.ndarray:
        """int64 [J, n_levels, n_codes]."""
        return self.model.counts

    @property
    def meta(self) -> dict[str, Any]:
        """The model's meta object (spec, conditions, chip id, provenance)."""
        return self.model.meta()

    def column_counts(self, j: int) -> np.ndarray:
        """Counts of physical column ``j``: [n_levels, n_codes]."""
        if not 0 <= j < self.spec.physical_cols:
            raise ConfigError(f"column {j} is outside 0..{self.spec.physical_cols - 1}")
        return self.counts[j]

    def pooled_counts(self) -> np.ndarray:
        """Counts of all columns together: [n_levels, n_codes]."""
        return self.counts.sum(axis=0)

    def totals(self, pooled: bool = False) -> np.ndarray:
        """Conversions per (column, level) [J, L], or per level [L] when pooled."""
        c = self.pooled_counts() if pooled else self.counts
        return c.sum(axis=-1)

    def observed_levels(self) -> np.ndarray:
        """Levels with at least one count in some column (int array)."""
        return np.nonzero(self.totals(pooled=True) > 0)[0]

    def probabilities(self, alpha: float = 0.0, pooled: bool = False) -> np.ndarray:
        """P(code | s) per column [J, L, C] (or pooled [L, C]) with additive smoothing ``alpha`` per code.

        ``alpha=0`` gives the measured frequencies; ``alpha=0.5`` is the Jeffreys prior. Rows without counts
        are NaN (the sampler's fallback rule lives in ``cimlab.firmware_bridge.errmodel``).
        """
        if not (alpha >= 0 and np.isfinite(alpha)):
            raise ConfigError(f"smoothing alpha must be a finite number >= 0, got {alpha}")
        c = (self.pooled_counts() if pooled else self.counts).astype(np.float64)
        totals = c.sum(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = (c + alpha) / (totals + alpha * c.shape[-1])
        return np.where(totals > 0, p, np.nan)

    # ---- moments ----------------------------------------------------------------------------------------------
    def _moments(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codes = np.arange(self.spec.n_codes, dtype=np.float64)
        n = counts.sum(axis=-1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (counts * codes).sum(axis=-1) / n
            var = (counts * codes**2).sum(axis=-1) / n - mean**2
        mean = np.where(n > 0, mean, np.nan)
        var = np.where(n > 0, np.maximum(var, 0.0), np.nan)
        return n, mean, var

    def mean_transfer(self, pooled: bool = False) -> np.ndarray:
        """E[code | s], codes: [J, L] per column, or [L] over all conversions of all columns."""
        return self._moments(self.pooled_counts() if pooled else self.counts)[1]

    def slope(self, pooled: bool = False) -> np.ndarray:
        """Local slope of the mean transfer, codes per level: [J, L-1] (or [L-1]); ``slope[s] = m[s+1] - m[s]``."""
        m = self.mean_transfer(pooled)
        return np.diff(m, axis=-1)

    def sigma(self, pooled: bool = False) -> np.ndarray:
        """Standard deviation of the code at each level, codes: [J, L] per column.

        Pooled ([L]): the RMS of the per-column sigmas weighted by counts, i.e. the conversion-to-conversion
        spread without the column-to-column spread (that one is ``column_spread``).
        """
        n, _, var = self._moments(self.counts)
        if not pooled:
            return np.sqrt(var)
        w = np.where(np.isfinite(var), n, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled_var = np.nansum(np.where(w > 0, var * w, 0.0), axis=0) / w.sum(axis=0)
        return np.sqrt(np.where(w.sum(axis=0) > 0, pooled_var, np.nan))

    def column_spread(self) -> np.ndarray:
        """Standard deviation across columns of the per-column mean code at each level, codes: [L]."""
        m = self.mean_transfer()
        ok = np.isfinite(m)
        out = np.full(m.shape[1], np.nan)
        for s in range(m.shape[1]):
            vals = m[ok[:, s], s]
            if vals.size >= 2:
                out[s] = vals.std(ddof=1)
        return out

    def error_histogram(self, pooled: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Code errors against the ideal ADC code: (errors -adc_max..adc_max, counts), all columns and levels."""
        spec = self.spec
        ideal = spec.ideal_codes(np.arange(spec.n_levels))
        err = np.arange(spec.n_codes)[None, :] - ideal[:, None]  # [L, C]
        edges = np.arange(-spec.adc_max, spec.adc_max + 1)
        c = self.pooled_counts()
        hist = np.bincount((err + spec.adc_max).ravel(), weights=c.ravel(), minlength=edges.size)
        return edges, hist.astype(np.int64)

    # ---- line fits ---------------------------------------------------------------------------------------------
    def _fit_mask(self, counts: np.ndarray) -> np.ndarray:
        """Levels usable for a line fit: observed, ideal code inside the ADC range, codes not at a rail."""
        spec = self.spec
        n = counts.sum(axis=-1)
        ideal = spec.ideal_codes(np.arange(spec.n_levels))
        inside = (ideal > 0) & (ideal < spec.adc_max)
        with np.errstate(invalid="ignore", divide="ignore"):
            rail = (counts[..., 0] + counts[..., -1]) / np.maximum(n, 1)
        return (n > 0) & inside & (rail <= RAIL_FRACTION)

    def gain_offset(self, pooled: bool = False) -> LineFit:
        """Count-weighted least-squares line through the mean codes of the unclipped levels.

        Per column ([J] arrays) or pooled ([1] arrays). Columns with fewer than two usable levels get NaN.
        """
        counts = self.pooled_counts()[None] if pooled else self.counts
        _, mean, _ = self._moments(counts)
        mask = self._fit_mask(counts)
        x = np.arange(self.spec.n_levels, dtype=np.float64) / self.spec.adc_lsb
        w = np.where(mask, counts.sum(axis=-1), 0).astype(np.float64)
        y = np.where(mask, mean, 0.0)
        sw = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mx = (w * x).sum(axis=1) / sw
            my = (w * y).sum(axis=1) / sw
            sxx = (w * (x - mx[:, None]) ** 2).sum(axis=1)
            sxy = (w * (x - mx[:, None]) * (y - my[:, None])).sum(axis=1)
            gain = sxy / sxx
            offset = my - gain * mx
            resid = np.where(mask, y - (gain[:, None] * x + offset[:, None]), 0.0)
            rms = np.sqrt((w * resid**2).sum(axis=1) / sw)
        used = mask.sum(axis=1)
        bad = used < 2
        gain[bad] = offset[bad] = rms[bad] = np.nan
        return LineFit(gain, offset, rms, used)

    def inl_dnl(self, pooled: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """INL and DNL of the mean transfer against its best-fit line, LSB.

        ``INL[s] = m[s] - (gain * s / adc_lsb + offset)`` for every observed level; ``DNL[s] = INL[s+1] - INL[s]``
        (the step from level s to s+1 minus the best-fit step). Shapes [L] and [L-1] pooled, [J, L] and
        [J, L-1] per column; NaN where a level is unobserved or outside the fit range's ends.
        """
        fit = self.gain_offset(pooled)
        m = self.mean_transfer(pooled)
        m2 = m[None] if pooled else m
        x = np.arange(self.spec.n_levels, dtype=np.float64) / self.spec.adc_lsb
        inl = m2 - (fit.gain[:, None] * x + fit.offset[:, None])
        counts = self.pooled_counts()[None] if pooled else self.counts
        inl = np.where(self._fit_mask(counts), inl, np.nan)
        dnl = np.diff(inl, axis=-1)
        return (inl[0], dnl[0]) if pooled else (inl, dnl)

    # ---- quantization-aware analog fit -------------------------------------------------------------------------
    def fit_analog(self, *, max_iter: int = 100, tol: float = 1e-9, resolve_rel: float = 0.25) -> AnalogFit:
        """Fit, per column, the analog value behind the codes: ``a(s) = gain * s / adc_lsb + offset + noise``.

        The ADC is taken as ideal (thresholds at ``m + 1/2`` LSB, clipping at both ends), so
        ``P(code >= m + 1 | s) = Phi((gain * s / adc_lsb + offset - (m + 1/2)) / noise)``: an ordinal probit
        model. In the parameters ``(u, v, w) = (gain, offset, 1) / noise`` the log-likelihood is concave, and a
        damped Newton iteration, vectorised over columns, finds its maximum (``ProbitColumns``; scipy.optimize
        solves one problem at a time, and a chip has hundreds of columns). A weak penalty (one pseudo-observation
        per column, ``0.5 * (0.01 LSB)**2 * (w**2 + (u - w)**2 + v**2)``) keeps the optimum finite when no code
        ever changed; such columns, and any whose noise the codes do not pin down to ``resolve_rel``, are marked
        not ``resolved``. A shared ADC INL/DNL is absorbed into the gains, offsets and noise.
        """
        problem = ProbitColumns(self.spec, self.counts)
        theta = problem.maximize(problem.start(self.gain_offset()), max_iter=max_iter, tol=tol)
        return problem.result(theta, resolve_rel)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sampler(self) -> CodeSampler:
        """The vectorised sampler of ``cimlab.firmware_bridge.errmodel`` (its fallback rule for unobserved rows), built
        once: a MacErrorModel treats its counts as fixed (merge or re-load to get new ones)."""
        if self._sampler is None:
            self._sampler = self.model.sampler()
        return self._sampler

    def sample(self, levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Codes for ideal levels [..., J] or [..., n_slices, cols], drawn from P(code | s, column); vectorised."""
        spec = self.spec
        s = np.asarray(levels)
        if s.ndim >= 2 and s.shape[-2:] == (spec.n_slices, spec.cols):
            flat = s.reshape(*s.shape[:-2], spec.physical_cols)
            return self.sampler().sample(flat, rng).reshape(s.shape)
        if s.ndim < 1 or s.shape[-1] != spec.physical_cols:
            raise ShapeError(
                f"levels have shape {s.shape}; the last axes must be (n_slices, cols) = "
                f"{(spec.n_slices, spec.cols)} or J = {spec.physical_cols}"
            )
        return self.sampler().sample(s, rng)

    # ---- summary ------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Headline figures (JSON-friendly): conversions, coverage, exact-code rate, line-fit and analog fit."""
        spec = self.spec
        totals = self.totals()
        c = self.pooled_counts()
        ideal = spec.ideal_codes(np.arange(spec.n_levels))
        exact = float(c[np.arange(spec.n_levels), ideal].sum() / max(int(c.sum()), 1))
        lf = self.gain_offset()
        inl, dnl = self.inl_dnl(pooled=True)
        observed_cols = totals.sum(axis=1) > 0
        out: dict[str, Any] = {
            "conversions": int(totals.sum()),
            "columns_observed": int(observed_cols.sum()),
            "levels_observed": int((totals.sum(axis=0) > 0).sum()),
            "min_count_per_observed_cell": int(totals[totals > 0].min()) if (totals > 0).any() else 0,
            "exact_code_rate": exact,
            "pooled_sigma_max_lsb": _nanmax(self.sigma(pooled=True)),
            "column_spread_max_lsb": _nanmax(self.column_spread()),
            "inl_max_abs_lsb": _nanmax(np.abs(inl)),
            "dnl_max_abs_lsb": _nanmax(np.abs(dnl)),
            "line_gain_mean": _nanstat(np.nanmean, lf.gain),
            "line_gain_std": _nanstat(np.nanstd, lf.gain),
            "line_offset_mean_lsb": _nanstat(np.nanmean, lf.offset),
            "line_offset_std_lsb": _nanstat(np.nanstd, lf.offset),
        }
        return out


PENALTY_LSB = 0.01
"""Scale of the weak penalty that keeps the probit fit finite (LSB)."""
START_NOISE_LSB = 0.3
"""Noise the probit fit starts from (LSB)."""


class ProbitColumns:
    """The ordinal-probit likelihood of every column's counts (see ``MacErrorModel.fit_analog``), vectorised over
    columns. Only observed (column, level, code) cells enter; ``theta`` is [J, 3] of ``(u, v, w)``.
    """

    def __init__(self, spec: MacroSpec, counts: np.ndarray) -> None:
        self.J = spec.physical_cols
        self.jj, ss, cc = np.nonzero(counts)
        self.n = counts[self.jj, ss, cc].astype(np.float64)
        self.x = ss / spec.adc_lsb  # ideal analog value of the level, LSB
        self.has_hi = cc > 0  # a threshold below the code (else the bottom rail)
        self.has_lo = cc < spec.adc_max  # a threshold above the code (else the top rail)
        self.t_hi = cc - 0.5  # threshold between code c-1 and c, LSB
        self.t_lo = cc + 0.5  # threshold between code c and c+1, LSB
        ones = np.ones_like(self.x)
        self.da = (self.x, ones, -np.where(self.has_hi, self.t_hi, 0.0))  # dz/d(u, v, w) of the threshold below
        self.db = (self.x, ones, -np.where(self.has_lo, self.t_lo, 0.0))  # ... and of the threshold above
        self.n_col = np.bincount(self.jj, weights=self.n, minlength=self.J)
        self.active = self.n_col > 0

    def per_col(self, values: np.ndarray) -> np.ndarray:
        """Sum of per-cell values by column, [J]."""
        return np.bincount(self.jj, weights=values, minlength=self.J)

    def z_pair(self, th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardised distances to the thresholds below and above each cell's code: Phi(a) = P(code >= c),
        Phi(b) = P(code >= c + 1)."""
        u, v, w = th[self.jj, 0], th[self.jj, 1], th[self.jj, 2]
        base = u * self.x + v
        a = np.where(self.has_hi, base - w * self.t_hi, np.inf)
        b = np.where(self.has_lo, base - w * self.t_lo, -np.inf)
        return a, b

    @staticmethod
    def log_p(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """log(Phi(a) - Phi(b)) on whichever tail keeps precision."""
        from scipy.special import log_ndtr

        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            upper = (a + b) > 0
            lo1, lo2 = np.where(upper, -b, a), np.where(upper, -a, b)
            l1, l2 = log_ndtr(lo1), log_ndtr(lo2)
            return l1 + np.log1p(-np.exp(np.minimum(l2 - l1, 0.0)))

    @staticmethod
    def penalty(th: np.ndarray) -> np.ndarray:
        """The weak penalty per column."""
        u, v, w = th[:, 0], th[:, 1], th[:, 2]
        return 0.5 * PENALTY_LSB * PENALTY_LSB * (w * w + (u - w) ** 2 + v * v)

    def loglik(self, th: np.ndarray) -> np.ndarray:
        """Penalised log-likelihood per column, [J]."""
        return self.per_col(self.n * self.log_p(*self.z_pair(th))) - self.penalty(th)

    def derivatives(self, th: np.ndarray, with_penalty: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Gradient [J, 3] and Hessian [J, 3, 3] of the log-likelihood (penalised or not)."""
        a, b = self.z_pair(th)
        lp = self.log_p(a, b)
        fa, fb = np.isfinite(a), np.isfinite(b)
        aa, bb = np.where(fa, a, 0.0), np.where(fb, b, 0.0)
        with np.errstate(over="ignore", invalid="ignore"):
            pa = np.where(fa, np.exp(-0.5 * aa * aa - lp), 0.0) / np.sqrt(2 * np.pi)  # phi(a) / P
            pb = np.where(fb, np.exp(-0.5 * bb * bb - lp), 0.0) / np.sqrt(2 * np.pi)  # phi(b) / P
        n, da, db = self.n, self.da, self.db
        laa, lbb, lab = n * (-aa * pa - pa * pa), n * (bb * pb - pb * pb), n * (pa * pb)
        grad = np.stack([self.per_col(n * (pa * da[i] - pb * db[i])) for i in range(3)], axis=1)
        hess = np.empty((self.J, 3, 3))
        for i in range(3):
            for k in range(i, 3):
                h = laa * da[i] * da[k] + lbb * db[i] * db[k] + lab * (da[i] * db[k] + db[i] * da[k])
                hess[:, i, k] = hess[:, k, i] = self.per_col(h)
        if with_penalty:
            u, v, w = th[:, 0], th[:, 1], th[:, 2]
            r2 = PENALTY_LSB * PENALTY_LSB
            grad = grad - r2 * np.stack([u - w, v, 2 * w - u], axis=1)
            hess = hess - r2 * np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 2.0]])[None]
        return grad, hess

    def start(self, line: LineFit) -> np.ndarray:
        """The line fit where there is one, with a noise of START_NOISE_LSB."""
        sig0 = START_NOISE_LSB
        return np.stack(
            [np.where(np.isfinite(line.gain), line.gain, 1.0) / sig0,
             np.where(np.isfinite(line.offset), line.offset, 0.0) / sig0, np.full(self.J, 1.0 / sig0)], axis=1,
        )

    def newton_direction(self, theta: np.ndarray) -> np.ndarray:
        """The Newton step per column, or a small gradient step where the Newton step does not ascend."""
        g, h = self.derivatives(theta)
        h = h - 1e-12 * np.eye(3)[None]  # keeps the solve defined for inactive columns
        step = -np.linalg.solve(h, g[:, :, None])[:, :, 0]
        return np.where((g * step).sum(axis=1, keepdims=True) > 0, step, g * 1e-3)

    def line_search(self, theta: np.ndarray, f: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Halve each column's step until the likelihood does not fall (1/noise stays positive)."""
        t = np.ones(self.J)
        new, f_new = theta.copy(), f.copy()
        pending = self.active.copy()
        for _halving in range(40):
            cand = theta + t[:, None] * step
            cand[:, 2] = np.where(cand[:, 2] > 0, cand[:, 2], theta[:, 2] * 0.5)
            fc = self.loglik(cand)
            better = pending & (fc >= f)
            new[better], f_new[better] = cand[better], fc[better]
            pending &= ~better
            if not pending.any():
                break
            t = t * 0.5
        return new, f_new

    def maximize(self, theta: np.ndarray, *, max_iter: int, tol: float) -> np.ndarray:
        """Damped Newton ascent until no active column moves by more than ``tol`` (relative)."""
        f = self.loglik(theta)
        for _ in range(max_iter):
            new, f = self.line_search(theta, f, self.newton_direction(theta))
            delta = np.abs(new - theta).max(axis=1) / np.maximum(np.abs(theta).max(axis=1), 1.0)
            theta = new
            if (delta[self.active] < tol).all():
                break
        return theta

    def result(self, theta: np.ndarray, resolve_rel: float) -> AnalogFit:
        """Gain, offset, noise and their standard errors (observed information, delta method) per column."""
        _, h_data = self.derivatives(theta, with_penalty=False)
        u, v, w = theta[:, 0], theta[:, 1], theta[:, 2]
        gain, offset, noise = u / w, v / w, 1.0 / w
        se = np.full((self.J, 3), np.nan)
        for j in np.nonzero(self.active)[0]:
            try:
                cov = np.linalg.inv(-h_data[j])
            except np.linalg.LinAlgError:
                continue
            if np.all(np.isfinite(cov)) and np.all(np.diag(cov) > 0):
                # delta method from (u, v, w) to (u/w, v/w, 1/w)
                jac = np.array([[1 / w[j], 0.0, -u[j] / w[j] ** 2], [0.0, 1 / w[j], -v[j] / w[j] ** 2],
                                [0.0, 0.0, -1 / w[j] ** 2]])
                se[j] = np.sqrt(np.diag(jac @ cov @ jac.T))
        resolved = self.active & np.isfinite(se[:, 2]) & (se[:, 2] < resolve_rel * noise)
        for arr in (gain, offset, noise):
            arr[~self.active] = np.nan
        return AnalogFit(gain, offset, noise, se[:, 0], se[:, 1], se[:, 2], resolved, self.n_col.astype(np.int64))


def _nanmax(a: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmax(a)) if np.isfinite(a).any() else None


def _nanstat(fn: Any, a: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    return float(fn(a)) if np.isfinite(a).any() else None


def spec_differences(a: MacroSpec, b: MacroSpec, name_a: str, name_b: str) -> str:
    """``"rows: A 256 vs B 64; ..."`` for the fields where two MacroSpecs differ."""
    da, db = a.to_dict(), b.to_dict()
    parts = [f"{k}: {name_a} {da[k]!r} vs {name_b} {db[k]!r}" for k in da if da[k] != db.get(k)]
    return "; ".join(parts) or "no field differs"


__all__ = ["AnalogFit", "LineFit", "MacErrorModel", "ProbitColumns", "spec_differences"]

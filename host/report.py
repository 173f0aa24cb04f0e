"""The characterization report: PNG plots of a chip's error model, every condition, and a Markdown summary.

``write_report(model, folder, store=...)`` writes (every title names the chip and the condition)::

    transfer.png    mean code against the ideal transfer, one curve per condition, and each one's deviation
    inl_dnl.png     INL and DNL per ideal code, one curve per condition (the median column and its 5..95 % band)
    heatmap.png     P(code | s) over all columns, the code axis limited to the codes in use (one panel a condition)
    errors.png      histogram of code errors and the rate of non-ideal codes per level, per condition
    columns.png     per-column gain and offset from both fits (see below), for the first condition
    summary.md      identity, a table of conditions, headline figures, energy, and what each fit is

Two per-column fits, and when to trust each:

- the **line fit** draws a straight line through each column's mean codes. It is what the codes show: trust its
  gain and offset when the errors are a few LSB or more. Below one LSB the ADC's rounding flattens the mean codes
  and the line fit's gain and offset carry that rounding;
- the **quantization-aware fit** (``MacErrorModel.fit_analog``) models the analog value behind the ADC (gain,
  offset and noise, rounded at the ideal thresholds). It separates errors smaller than one LSB, but only where
  enough conversions cross a threshold: a column counts as *resolved* when the fit pins its noise to 25 %. Trust it
  in resolved columns; elsewhere it gives bounds, not estimates.

matplotlib runs on its Agg backend (no display needed) and is imported only here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cimlab.errmodel import AnalogFit, MacErrorModel

if TYPE_CHECKING:
    from cimlab.characterize.store import MeasurementStore

DPI = 110


@dataclass(frozen=True)
class Condition:
    """One measured condition of a chip: its label and its model."""

    label: str
    model: MacErrorModel

    @property
    def title(self) -> str:
        """``chip · condition``, for plot titles."""
        return f"{self.model.model.chip_id or 'unknown chip'} · {self.label}"


def condition_label(model: MacErrorModel) -> str:
    """A model's condition in words: its label, else its VDD and temperature, else 'as measured'."""
    c = model.model.conditions
    if c.get("label"):
        return str(c["label"])
    parts = [f"{c['vdd_mv']} mV" if c.get("vdd_mv") is not None else "",
             f"{c['temp_c']:g} °C" if isinstance(c.get("temp_c"), int | float) else ""]
    return ", ".join(p for p in parts if p) or "as measured"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, title: str) -> Path:
    plt = _pyplot()
    try:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _bands(values: np.ndarray) -> np.ndarray:
    """5th, 50th and 95th percentile over the columns (axis 0), NaN where no column has a value."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN levels: unobserved, NaN is the answer
        return np.nanpercentile(values, [5, 50, 95], axis=0)


def _chips(conds: list[Condition]) -> str:
    return ", ".join(sorted({c.model.model.chip_id or "unknown chip" for c in conds}))


def plot_transfer(conds: list[Condition], path: Path) -> Path:
    """Mean code (all columns) against the ideal transfer, one curve per condition, and each one's deviation."""
    plt = _pyplot()
    spec = conds[0].model.spec
    s = np.arange(spec.n_levels)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(s, spec.ideal_codes(s), color="0.4", lw=1, ls="--", label="ideal ADC code")
    ax2.axhline(0, color="0.4", lw=1, ls="--")
    for c in conds:
        mean, sigma = c.model.mean_transfer(pooled=True), c.model.sigma(pooled=True)
        ok = np.isfinite(mean)
        line = ax.errorbar(s[ok], mean[ok], yerr=sigma[ok], fmt="o-", ms=3, lw=1, capsize=2,
                           label=f"{c.label}: mean code ± sigma")
        dev = c.model.mean_transfer() - spec.ideal_codes(s)[None, :]
        q = _bands(dev)
        color = line[0].get_color()
        ax2.fill_between(s[ok], q[0][ok], q[2][ok], color=color, alpha=0.2)
        ax2.plot(s[ok], q[1][ok], color=color, label=f"{c.label}: median column (band 5..95 %)")
    ax.set_ylabel("ADC code")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax2.set_xlabel("ideal level s (partial sum)")
    ax2.set_ylabel("mean code - ideal (LSB)")
    ax2.legend(loc="lower left", fontsize=7)
    ax2.grid(alpha=0.3)
    return _save(fig, path, f"MAC transfer curve: {_chips(conds)}, {len(conds)} condition(s)")


def plot_inl_dnl(conds: list[Condition], path: Path) -> Path:
    """INL and DNL per ideal code (each level's mean code against its best-fit line, and the step between
    consecutive levels against the fitted step), one curve per condition: the median column and its 5..95 %."""
    plt = _pyplot()
    spec = conds[0].model.spec
    code = spec.ideal_codes(np.arange(spec.n_levels)).astype(float)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for c in conds:
        inl, dnl = c.model.inl_dnl(pooled=False)
        for axis, values, x in ((ax, inl, code), (ax2, dnl, code[1:])):
            q = _bands(values)
            ok = np.isfinite(q[1])
            line = axis.plot(x[ok], q[1][ok], "o-", ms=3, lw=1, label=f"{c.label}: median column")
            axis.fill_between(x[ok], q[0][ok], q[2][ok], color=line[0].get_color(), alpha=0.2)
    for axis, name in ((ax, "INL (LSB)"), (ax2, "DNL (LSB)")):
        axis.axhline(0, color="0.4", lw=1, ls="--")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    ax2.set_xlabel("ideal ADC code")
    return _save(fig, path, f"INL and DNL per code (band: columns 5..95 %): {_chips(conds)}")


def codes_in_use(model: MacErrorModel) -> tuple[int, int]:
    """The lowest and highest code with counts, or that an observed level ideally reads."""
    spec = model.spec
    used = np.nonzero(model.pooled_counts().sum(axis=0))[0]
    ideal = spec.ideal_codes(model.observed_levels())
    pool = np.concatenate([used, ideal]) if used.size else np.array([0, spec.adc_max])
    return int(pool.min()), int(pool.max())


def plot_heatmap(conds: list[Condition], path: Path) -> Path:
    """P(code | s) over all columns (log colour scale, unobserved blank), the code axis cut to the codes in use."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, len(conds), figsize=(1 + 5.5 * len(conds), 5), squeeze=False)
    for ax, c in zip(axes[0], conds, strict=True):
        lo, hi = codes_in_use(c.model)
        p = c.model.probabilities(pooled=True)[:, lo : hi + 1]
        shown = np.where(p > 0, p, np.nan)
        floor = np.nanmin(shown) if np.isfinite(shown).any() else 1e-6
        im = ax.imshow(shown.T, origin="lower", aspect="auto", interpolation="nearest", cmap="viridis",
                       norm=LogNorm(vmin=max(floor, 1e-9), vmax=1.0), extent=(-0.5, p.shape[0] - 0.5, lo - 0.5,
                                                                            hi + 0.5))
        fig.colorbar(im, ax=ax, label="P(code | s)")
        ax.set_xlabel("ideal level s")
        ax.set_ylabel(f"ADC code (codes {lo}..{hi} in use)")
        ax.set_title(c.title, fontsize=9)
    return _save(fig, path, "P(code | s), all columns")


def plot_errors(conds: list[Condition], path: Path) -> Path:
    """Histogram of code errors (log counts) and the rate of non-ideal codes per level, per condition."""
    plt = _pyplot()
    spec = conds[0].model.spec
    ideal = spec.ideal_codes(np.arange(spec.n_levels))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(conds)
    for i, c in enumerate(conds):
        edges, hist = c.model.error_histogram()
        nz = np.nonzero(hist)[0]
        lo, hi = (edges[nz[0]], edges[nz[-1]]) if nz.size else (-1, 1)
        keep = (edges >= min(lo, -1)) & (edges <= max(hi, 1))
        ax.bar(edges[keep] + (i - (len(conds) - 1) / 2) * width, np.maximum(hist[keep], 0), width=width, log=True,
               label=c.label)
        pooled = c.model.pooled_counts()
        tot = pooled.sum(axis=1)
        with np.errstate(all="ignore"):
            rate = 1.0 - pooled[np.arange(spec.n_levels), ideal] / tot
        ok = tot > 0
        ax2.plot(np.arange(spec.n_levels)[ok], rate[ok] * 100, "o-", ms=3, label=c.label)
    ax.set_xlabel("code - ideal code (LSB)")
    ax.set_ylabel("conversions")
    ax.set_title("code errors, all columns and levels", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax2.set_xlabel("ideal level s")
    ax2.set_ylabel("non-ideal codes (%)")
    ax2.set_title("error rate per level", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _save(fig, path, f"code errors: {_chips(conds)}")


def plot_columns(cond: Condition, fit: AnalogFit, path: Path) -> Path:
    """Per-column gain and offset from the line fit (every column) and the quantization-aware fit (its resolved
    columns, with standard errors)."""
    plt = _pyplot()
    model = cond.model
    line = model.gain_offset()
    j = np.arange(model.spec.physical_cols)
    r = fit.resolved
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    label_q = f"quantization-aware fit ({int(r.sum())} of {j.size} columns resolved)"
    ax.plot(j, line.gain, ".", ms=3, color="0.6", label="line fit of the mean codes")
    ax.errorbar(j[r], fit.gain[r], yerr=fit.gain_se[r], fmt=".", ms=3, color="tab:blue", label=label_q)
    ax.set_ylabel("gain (1 = ideal)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.plot(j, line.offset, ".", ms=3, color="0.6", label="line fit of the mean codes")
    ax2.errorbar(j[r], fit.offset[r], yerr=fit.offset_se[r], fmt=".", ms=3, color="tab:green", label=label_q)
    ax2.set_ylabel("offset (LSB)")
    ax2.set_xlabel("physical column j = slice * cols + col")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _save(fig, path, f"per-column gain and offset: {cond.title}")


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _analog_figures(fit: AnalogFit) -> dict[str, Any]:
    r = fit.resolved
    if not r.any():
        return {"resolved": 0}
    return {
        "resolved": int(r.sum()),
        "gain_mean": float(np.mean(fit.gain[r])),
        "gain_std": float(np.std(fit.gain[r])),
        "offset_mean": float(np.mean(fit.offset[r])),
        "offset_std": float(np.std(fit.offset[r])),
        "noise_median": float(np.median(fit.noise[r])),
    }


def energy_rows(energy: dict[str, Any]) -> list[str]:
    """The summary's energy rows: the chip's estimate, and the supply's measurement where one exists."""
    if not energy:
        return []
    rows = [(
        f"| energy per conversion, estimated by the chip model | {_fmt(energy.get('chip_fj_per_conversion'))} "
        f"fJ ({_fmt(energy.get('chip_fj_per_mac'))} fJ/MAC; the chip's energy counters) |"
    )]
    if "supply_fj_per_conversion" in energy:
        rows.append(
            f"| measured supply energy per conversion | {_fmt(energy['supply_fj_per_conversion'])} fJ "
            f"({_fmt(energy['supply_fj_per_mac'])} fJ/MAC; charge from the supply x its voltage, mean current "
            f"{_fmt(energy.get('supply_mean_a'))} A; measured / chip estimate "
            f"{_fmt(energy.get('supply_vs_chip'), '.6f')}) |"
        )
    else:
        rows.append("| measured supply energy | none: no supply measured these batches; the energy above is "
                    "estimated by the chip model |")
    return rows


FITS_EXPLAINED = [
    "## The two per-column fits, and which to trust",
    "",
    ("- **Line fit of the mean codes**: a straight line through each column's mean code per level. It is what the "
     "codes show. Trust its gain and offset when the errors reach a few LSB; below one LSB the ADC's rounding "
     "flattens the mean codes and the line fit's figures carry that rounding."),
    ("- **Quantization-aware fit**: models the analog value behind the ADC (gain, offset and noise, rounded at the "
     "ideal thresholds), so it separates errors smaller than one LSB. A column is *resolved* when the codes pin its "
     "noise to within 25 %. Trust it in resolved columns; in the others its figures are bounds, not estimates."),
    ("- When they disagree (for example on the gain spread), trust the quantization-aware fit if most columns are "
     "resolved, else the line fit, and measure longer (`--repeats`) to resolve more columns."),
    "",
]


def conditions_table(conds: list[Condition], energies: list[dict[str, Any]]) -> list[str]:
    """One row per condition: its VDD and temperature, exact-code rate, both fits' gain, noise and energy."""
    lines = [("| condition | VDD (mV) | temperature (°C) | conversions | exact codes | gain (line fit) | "
              "gain (quantization-aware, resolved columns) | noise (LSB) | energy per conversion (fJ) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for c, energy in zip(conds, energies, strict=True):
        m = c.model
        if m.counts.sum() == 0:
            lines.append(f"| {c.label} | | | 0 | not measured | | | | |")
            continue
        s, a = m.summary(), _analog_figures(m.fit_analog())
        if energy.get("supply_fj_per_conversion") is not None:
            e = f"{_fmt(energy['supply_fj_per_conversion'])} measured ({_fmt(energy['chip_fj_per_conversion'])} est.)"
        elif energy:
            e = f"{_fmt(energy.get('chip_fj_per_conversion'))} estimated by the chip model"
        else:
            e = "n/a"
        cond = m.model.conditions
        lines.append(
            f"| {c.label} | {_fmt(cond.get('vdd_mv'))} | {_fmt(cond.get('temp_c'))} | {s['conversions']:,} | "
            f"{s['exact_code_rate'] * 100:.2f} % | {_fmt(s['line_gain_mean'])} ± {_fmt(s['line_gain_std'])} | "
            f"{_fmt(a.get('gain_mean'))} ± {_fmt(a.get('gain_std'))} ({a['resolved']} of "
            f"{m.spec.physical_cols}) | {_fmt(a.get('noise_median'))} | {e} |"
        )
    return lines


def summary_markdown(conds: list[Condition], first: Condition, fit: AnalogFit, plots: list[Path], *,
                     title: str) -> str:
    """The summary.md text: every condition in a table, ``first`` (whose quantization-aware fit is ``fit``) in
    detail."""
    model = first.model
    spec, meta = model.spec, model.meta
    s, a = model.summary(), _analog_figures(fit)
    prov = meta.get("provenance", {})
    energies = [c.model.meta.get("provenance", {}).get("energy") or {} for c in conds]
    energy = model.meta.get("provenance", {}).get("energy") or {}
    lines = [f"# {title}", ""]
    lines += [
        f"- chip: `{meta.get('chip_id') or 'unknown'}`; macro: {spec.describe()}",
        (
            f"- provenance: {prov.get('tool', 'n/a')} {prov.get('software_version', '')}, plan "
            f"`{str(prov.get('plan_digest', 'n/a'))[:12]}`, seed {prov.get('seed', 'n/a')}, "
            f"link `{prov.get('link', 'n/a')}`"
        ),
        "",
        "## Conditions",
        "",
        *conditions_table(conds, energies),
        "",
        f"## Figures of {first.label}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| conversions | {s['conversions']:,} |",
        (
            f"| columns x levels observed | {s['columns_observed']} x {s['levels_observed']} "
            f"(fewest conversions in an observed cell: {s['min_count_per_observed_cell']}) |"
        ),
        f"| codes equal to the ideal code | {s['exact_code_rate'] * 100:.3f} % |",
        f"| largest per-level sigma | {_fmt(s['pooled_sigma_max_lsb'])} LSB |",
        f"| largest column-to-column spread | {_fmt(s['column_spread_max_lsb'])} LSB |",
        f"| INL / DNL, max | {_fmt(s['inl_max_abs_lsb'])} / {_fmt(s['dnl_max_abs_lsb'])} LSB |",
        f"| line fit: gain mean ± sd | {_fmt(s['line_gain_mean'])} ± {_fmt(s['line_gain_std'])} |",
        (
            f"| line fit: offset mean ± sd | {_fmt(s['line_offset_mean_lsb'])} ± "
            f"{_fmt(s['line_offset_std_lsb'])} LSB |"
        ),
        f"| quantization-aware fit: columns resolved | {a['resolved']} of {spec.physical_cols} |",
    ]
    if a["resolved"]:
        lines += [
            f"| quantization-aware fit: gain mean ± sd | {_fmt(a['gain_mean'])} ± {_fmt(a['gain_std'])} |",
            f"| quantization-aware fit: offset mean ± sd | {_fmt(a['offset_mean'])} ± {_fmt(a['offset_std'])} LSB |",
            f"| quantization-aware fit: noise (median column) | {_fmt(a['noise_median'])} LSB |",
        ]
    lines += energy_rows(energy)
    if a["resolved"] == 0:
        lines += ["", (
            "The analog errors stay below one LSB everywhere: no conversion crossed an ADC threshold often enough "
            "to separate gain, offset and noise; the line fit still applies."
        )]
    lines += ["", *FITS_EXPLAINED, "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def report_conditions(model: MacErrorModel, store: MeasurementStore | None) -> list[Condition]:
    """Every condition to report: the store's, each from its own counts, or the one model."""
    if store is None or len(store.conditions()) < 2:
        return [Condition(condition_label(model), model)]
    from cimlab.characterize.sweep import model_for_condition

    return [Condition(c.label, model_for_condition(store, ci)) for ci, c in enumerate(store.conditions())]


def write_report(model: MacErrorModel, folder: str | Path, *, store: MeasurementStore | None = None,
                 title: str = "cimlab characterization") -> list[Path]:
    """Write the plots and summary.md into ``folder`` (created); return the files written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    conds = report_conditions(model, store)
    measured = [c for c in conds if c.model.counts.sum() > 0] or conds
    fit = measured[0].model.fit_analog()
    plots = [
        plot_transfer(measured, out / "transfer.png"),
        plot_inl_dnl(measured, out / "inl_dnl.png"),
        plot_heatmap(measured, out / "heatmap.png"),
        plot_errors(measured, out / "errors.png"),
        plot_columns(measured[0], fit, out / "columns.png"),
    ]
    md = out / "summary.md"
    md.write_text(summary_markdown(conds, measured[0], fit, plots, title=title), encoding="utf-8")
    return [*plots, md]


__all__ = ["Condition", "codes_in_use", "plot_columns", "plot_errors", "plot_heatmap", "plot_inl_dnl",
           "plot_transfer", "summary_markdown", "write_report"]

"""The characterization report: PNG plots of an error model and a short Markdown summary.

``write_report(model, folder)`` writes::

    transfer.png    mean code +- sigma against the ideal transfer, with the spread of the per-column means
    heatmap.png     P(code | s) over all columns (log colour scale)
    errors.png      histogram of code errors (code - ideal code) and the error rate per level
    columns.png     per-column gain and offset (quantization-aware fit where resolved, else the line fit)
    summary.md      identity, conditions, coverage, headline figures, energy, per-condition table

matplotlib runs on its Agg backend (no display needed) and is imported only here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cimlab.errmodel import AnalogFit, MacErrorModel

if TYPE_CHECKING:
    from cimlab.characterize.store import MeasurementStore

DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_transfer(model: MacErrorModel, path: Path) -> Path:
    """Mean code +- sigma (pooled) against the ideal transfer, with the min..max band of the column means."""
    plt = _pyplot()
    spec = model.spec
    s = np.arange(spec.n_levels)
    mean = model.mean_transfer(pooled=True)
    sigma = model.sigma(pooled=True)
    cols = model.mean_transfer()
    ok = np.isfinite(mean)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    try:
        ax.plot(s, spec.ideal_codes(s), color="0.4", lw=1, ls="--", label="ideal ADC code")
        with np.errstate(all="ignore"):
            lo, hi = np.nanmin(cols, axis=0), np.nanmax(cols, axis=0)
        ax.fill_between(s[ok], lo[ok], hi[ok], color="tab:blue", alpha=0.2, label="column means, min..max")
        ax.errorbar(s[ok], mean[ok], yerr=sigma[ok], fmt="o", ms=3, color="tab:blue", capsize=2,
                    label="mean code +- sigma (all columns)")
        ax.set_ylabel("ADC code")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        dev = cols - spec.ideal_codes(s)[None, :]
        with np.errstate(all="ignore"):
            q = np.nanpercentile(dev, [5, 50, 95], axis=0)
        ax2.axhline(0, color="0.4", lw=1, ls="--")
        ax2.fill_between(s[ok], q[0][ok], q[2][ok], color="tab:orange", alpha=0.3, label="columns 5..95 %")
        ax2.plot(s[ok], q[1][ok], color="tab:orange", label="median column")
        ax2.set_xlabel("ideal level s")
        ax2.set_ylabel("mean code - ideal (LSB)")
        ax2.legend(loc="lower left", fontsize=8)
        ax2.grid(alpha=0.3)
        fig.suptitle("MAC transfer curve")
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def plot_heatmap(model: MacErrorModel, path: Path) -> Path:
    """P(code | s) over all columns, log colour scale; unobserved levels blank."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    p = model.probabilities(pooled=True)
    shown = np.where(p > 0, p, np.nan)
    floor = np.nanmin(shown) if np.isfinite(shown).any() else 1e-6
    fig, ax = plt.subplots(figsize=(7, 5.5))
    try:
        im = ax.imshow(shown.T, origin="lower", aspect="auto", interpolation="nearest", cmap="viridis",
                       norm=LogNorm(vmin=max(floor, 1e-9), vmax=1.0))
        fig.colorbar(im, ax=ax, label="P(code | s)")
        ax.set_xlabel("ideal level s")
        ax.set_ylabel("ADC code")
        ax.set_title("P(code | s), all columns")
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def plot_errors(model: MacErrorModel, path: Path) -> Path:
    """Histogram of code errors (log counts) and the rate of non-ideal codes per level."""
    plt = _pyplot()
    spec = model.spec
    edges, hist = model.error_histogram()
    nz = np.nonzero(hist)[0]
    lo, hi = (edges[nz[0]], edges[nz[-1]]) if nz.size else (-1, 1)
    keep = (edges >= min(lo, -1)) & (edges <= max(hi, 1))
    pooled = model.pooled_counts()
    ideal = spec.ideal_codes(np.arange(spec.n_levels))
    tot = pooled.sum(axis=1)
    with np.errstate(all="ignore"):
        rate = 1.0 - pooled[np.arange(spec.n_levels), ideal] / tot
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        ax.bar(edges[keep], np.maximum(hist[keep], 0), color="tab:red", log=True)
        ax.set_xlabel("code - ideal code (LSB)")
        ax.set_ylabel("conversions")
        ax.set_title("code errors, all columns and levels")
        ax.grid(alpha=0.3, axis="y")
        ok = tot > 0
        ax2.plot(np.arange(spec.n_levels)[ok], rate[ok] * 100, "o-", ms=3, color="tab:red")
        ax2.set_xlabel("ideal level s")
        ax2.set_ylabel("non-ideal codes (%)")
        ax2.set_title("error rate per level")
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def plot_columns(model: MacErrorModel, fit: AnalogFit, path: Path) -> Path:
    """Per-column gain and offset: analog fit where resolved, line fit of the mean codes otherwise."""
    plt = _pyplot()
    line = model.gain_offset()
    j = np.arange(model.spec.physical_cols)
    r = fit.resolved
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    try:
        ax.plot(j, line.gain, ".", ms=3, color="0.6", label="line fit of mean codes")
        ax.errorbar(j[r], fit.gain[r], yerr=fit.gain_se[r], fmt=".", ms=3, color="tab:blue", label="analog fit")
        ax.set_ylabel("gain")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax2.plot(j, line.offset, ".", ms=3, color="0.6", label="line fit of mean codes")
        ax2.errorbar(j[r], fit.offset[r], yerr=fit.offset_se[r], fmt=".", ms=3, color="tab:green",
                     label="analog fit")
        ax2.set_ylabel("offset (LSB)")
        ax2.set_xlabel("physical column j = slice * cols + col")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
        fig.suptitle(f"per-column gain and offset (analog fit resolved in {int(r.sum())} of {j.size} columns)")
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


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
    rows = [
        f"| energy per conversion, estimated by the chip model | {_fmt(energy.get('chip_fj_per_conversion'))} "
        f"fJ ({_fmt(energy.get('chip_fj_per_mac'))} fJ/MAC; the chip's energy counters) |"
    ]
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


def summary_markdown(model: MacErrorModel, fit: AnalogFit, plots: list[Path], *, title: str,
                     store: MeasurementStore | None = None) -> str:
    """The summary.md text."""
    spec = model.spec
    meta = model.meta
    s = model.summary()
    a = _analog_figures(fit)
    prov = meta.get("provenance", {})
    lines = [f"# {title}", ""]
    lines += [
        f"- chip: `{meta.get('chip_id') or 'unknown'}`; macro: {spec.describe()}",
        f"- conditions: {meta.get('conditions') or 'not recorded'}",
        (
            f"- provenance: {prov.get('tool', 'n/a')} {prov.get('software_version', '')}, plan "
            f"`{str(prov.get('plan_digest', 'n/a'))[:12]}`, seed {prov.get('seed', 'n/a')}, "
            f"link `{prov.get('link', 'n/a')}`"
        ),
        "",
        "## Figures",
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
        f"| line fit of mean codes: gain mean +- sd | {_fmt(s['line_gain_mean'])} +- {_fmt(s['line_gain_std'])} |",
        (
            f"| line fit of mean codes: offset mean +- sd | {_fmt(s['line_offset_mean_lsb'])} +- "
            f"{_fmt(s['line_offset_std_lsb'])} LSB |"
        ),
        f"| analog fit resolved in | {a['resolved']} of {spec.physical_cols} columns |",
    ]
    if a["resolved"]:
        lines += [
            f"| analog fit: gain mean +- sd | {_fmt(a['gain_mean'])} +- {_fmt(a['gain_std'])} |",
            f"| analog fit: offset mean +- sd | {_fmt(a['offset_mean'])} +- {_fmt(a['offset_std'])} LSB |",
            f"| analog fit: noise (median column) | {_fmt(a['noise_median'])} LSB |",
        ]
    lines += energy_rows(prov.get("energy") or {})
    if a["resolved"] == 0:
        lines += ["", (
            "The analog errors stay below one LSB everywhere: no conversion crossed an ADC threshold "
            "often enough to separate gain, offset and noise (the line fit still applies)."
        )]
    if store is not None and len(store.conditions()) > 1:
        from cimlab.characterize.sweep import model_for_condition

        lines += ["", "## Conditions", ""]
        lines += ["| condition | VDD (mV) | exact codes | gain (analog fit) | noise (LSB) |"]
        lines += ["|---|---|---|---|---|"]
        for ci, cond in enumerate(store.conditions()):
            m = model_for_condition(store, ci)
            if m.counts.sum() == 0:
                lines.append(f"| {cond.label} | {cond.vdd_mv} | not measured | | |")
                continue
            sc = m.summary()
            ac = _analog_figures(m.fit_analog())
            lines.append(
                f"| {cond.label} | {m.model.conditions.get('vdd_mv')} | {sc['exact_code_rate'] * 100:.2f} % | "
                f"{_fmt(ac.get('gain_mean'))} | {_fmt(ac.get('noise_median'))} |"
            )
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(model: MacErrorModel, folder: str | Path, *, store: MeasurementStore | None = None,
                 title: str = "cimlab characterization") -> list[Path]:
    """Write the plots and summary.md into ``folder`` (created); return the files written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    fit = model.fit_analog()
    plots = [
        plot_transfer(model, out / "transfer.png"),
        plot_heatmap(model, out / "heatmap.png"),
        plot_errors(model, out / "errors.png"),
        plot_columns(model, fit, out / "columns.png"),
    ]
    md = out / "summary.md"
    md.write_text(summary_markdown(model, fit, plots, title=title, store=store), encoding="utf-8")
    return [*plots, md]


__all__ = ["plot_columns", "plot_errors", "plot_heatmap", "plot_transfer", "summary_markdown", "write_report"]

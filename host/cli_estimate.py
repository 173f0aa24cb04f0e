"""``cimlab estimate``: area and energy per inference of a compiled network on a crossbar design, by component.

Registered into the ``cimlab`` group by ``cimlab.cli``. torch is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from cimlab.cli_common import cim_errors, console, emit_json, json_option
from cimlab.estimate import COMPONENTS, PERIPHERY


@click.command("estimate")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tech", "tech_file", default=None,
              help="Technology table: a TOML file (every number with its unit and source) or a bundled name "
                   "(isaac-32nm, the default; isaac-32nm-saberi: gentler ADC scaling with bits).")
@click.option("--periphery", type=click.Choice(("auto", *PERIPHERY)), default="auto", show_default=True,
              help="ADCs shared by all layers (uniform ranges) or per array (per-layer ranges); auto: as trained.")
@click.option("--pack", type=click.Choice(("rows", "full", "none")), default="rows", show_default=True,
              help="How a CHECKPOINT's tiles share macro loads when it is compiled here.")
@json_option
@cim_errors
def estimate_cmd(source: Path, tech_file: str | None, periphery: str, pack: str, as_json: bool) -> None:
    """Area (um^2) and energy per inference (pJ) of SOURCE, a deployment package (.npz from cimlab compile) or a
    quant checkpoint (compiled here for its own MacroSpec), by component: arrays, ADCs, DACs, drivers, shift-add.

    Estimated from the technology table and the compiled mapping (every page a resident crossbar), not measured.
    """
    from cimlab.deploy.package import DeployPackage
    from cimlab.estimate import estimate_package, load_tech

    tech = load_tech(tech_file)
    if source.suffix == ".npz":
        pkg = DeployPackage.load(source)
    else:
        from cimlab.deploy.compile import compile_checkpoint

        pkg = compile_checkpoint(source, pack=pack)
    est = estimate_package(pkg, tech, periphery=None if periphery == "auto" else periphery)
    t = Table(title=f"cimlab estimate: {source.name} on {pkg.spec.describe()} ({tech.name}, estimated)")
    for col in ("component", "estimated area (um^2)", "estimated energy / inference (pJ)"):
        t.add_column(col, justify="right" if col != "component" else "left")
    for c in COMPONENTS:
        t.add_row(c, f"{est.area_um2[c]:,.1f}", f"{est.energy_pj[c]:,.2f}")
    t.add_row("[bold]total[/]", f"[bold]{est.total_area_um2:,.1f}[/]", f"[bold]{est.total_energy_pj:,.2f}[/]")
    console.print(t)
    console.print(f"estimated, not measured: {est.arrays} array(s), {est.adcs} ADC(s), {est.conversions:,} "
                  "conversions per inference; " + "; ".join(est.notes), highlight=False)
    emit_json(as_json, {"source": str(source), "spec": pkg.spec.to_dict(), "tech_sources": tech.sources,
                        **est.as_dict()})


def register(group: click.Group) -> None:
    """Add ``estimate`` to a click group."""
    group.add_command(estimate_cmd)


__all__ = ["estimate_cmd", "register"]

"""``cimlab export aihwkit``: a measured error model as the closest aihwkit-lightning configuration.

Registered into the ``cimlab`` group by ``cimlab.cli`` (``register(cli)``). The fit needs numpy and scipy only.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cimlab.cli_common import cim_errors, console, json_option
from cimlab.firmware_bridge.errors import ConfigError


@click.group("export")
def export() -> None:
    """Export a measured error model to other tools."""


@export.command("aihwkit")
@click.argument("model_file", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.option("--layers", default=None, metavar="K[,K...]",
              help="Input counts of the network's layers: out_noise is given for each (default: one macro's rows).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the export as JSON (config fields, per-layer out_noise, residual).")
@json_option
@cim_errors
def export_aihwkit(model_file: Path, layers: str | None, out_file: Path | None, as_json: bool) -> None:
    """The aihwkit-lightning TorchInferenceRPUConfig that best matches MODEL (a dmacem.npz or a characterize
    folder), the residual of that fit, and what only cimlab.export_aihwkit.MeasuredMacroNoise carries."""
    from cimlab.errmodel import MacErrorModel
    from cimlab.export_aihwkit import export_lightning, summary_lines

    path = model_file / "dmacem.npz" if model_file.is_dir() else model_file
    fit = export_lightning(MacErrorModel.load(path))
    if layers:
        try:
            ks = [int(k) for k in layers.split(",")]
        except ValueError:
            raise ConfigError(f"--layers: {layers!r} is not a comma-separated list of input counts") from None
    else:
        ks = [fit.spec.rows]
    for line in summary_lines(fit, ks):
        console.print(line, highlight=False, soft_wrap=True)
    if out_file is not None:
        fit.save(out_file, ks)
        console.print(f"wrote {out_file}", highlight=False)
    if as_json:
        click.echo(json.dumps(fit.to_dict(ks)))


def register(group: click.Group) -> None:
    """Add the ``export`` group to a click group."""
    group.add_command(export)


__all__ = ["export", "export_aihwkit", "register"]

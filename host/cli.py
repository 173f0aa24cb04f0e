"""The ``cimlab`` command line. Every command that talks to a chip takes ``--link URL`` (default ``sim://``).

Heavy dependencies (torch) are imported inside the commands that need them, never at import time.
"""

from __future__ import annotations

import signal
import sys
import threading

import click
from rich.table import Table

from cimlab.cli_common import (
    cim_errors,
    console,
    emit_json,
    err_console,
    json_option,
    link_option,
    open_chip,
    parse_sets,
    server_exposure,
    server_options,
)
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.logs import LEVELS, setup_logging, teardown_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="cimlab")
@click.option("-v", "--verbose", count=True, help="Log more on stderr: -v INFO, -vv DEBUG (frames, SCPI traffic).")
@click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default=None,
              help="Log level (overrides -v).")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Also append the log to this file.")
def cli(verbose: int, log_level: str | None, log_file: str | None) -> None:
    """cimlab: characterize, train for, deploy to and benchmark an SRAM CIM macro, on a board or its twin."""
    try:
        setup_logging(verbose, log_level, log_file)
    except ConfigError as err:
        raise click.BadParameter(str(err), param_hint="--log-file") from err
    click.get_current_context().call_on_close(teardown_logging)


# ---- info / check ---------------------------------------------------------------------------------------------
@cli.command()
@link_option
@json_option
@cim_errors
def info(link_url: str, timeout: float, as_json: bool) -> None:
    """Identity and MacroSpec of the chip at --link."""
    with open_chip(link_url, timeout) as chip:
        hello = chip.hello
    if as_json:
        emit_json(as_json, hello.as_dict())
        return
    t = Table(title=f"chip at {link_url}", show_header=False)
    for key in ("chip_id", "firmware_id", "bitstream_id", "protocol_version", "regmap_version", "max_payload"):
        t.add_row(key, str(getattr(hello, key)))
    spec = hello.spec
    for key, value in spec.to_dict().items():
        t.add_row(f"spec.{key}", str(value))
    t.add_row("derived", f"{spec.n_planes} input slices x {spec.n_groups} row groups x {spec.n_slices} weight slices"
              f" x {spec.cols} cols = {spec.conversions_per_vector} conversions/vector; adc_lsb {spec.adc_lsb:g}")
    console.print(t)


@cli.command()
@link_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and inputs.")
@click.option("--batch", type=click.IntRange(1, 1_000_000), default=256, show_default=True, help="MAC vectors.")
@json_option
@cim_errors
def check(link_url: str, timeout: float, seed: int, batch: int, as_json: bool) -> None:
    """Bring-up self-test: ping, registers, weights write/read-back, MACs against the ideal, link figures.

    Overwrites the chip's weights. Exits 1 if a step fails.
    """
    from cimlab.selftest import run_check

    with open_chip(link_url, timeout) as chip:
        rep = run_check(chip, seed=seed, batch=batch)
    t = Table(title=f"cimlab check: {link_url}")
    t.add_column("step")
    t.add_column("result")
    t.add_column("detail", overflow="fold")
    for s in rep.steps:
        t.add_row(s.name, "[green]pass[/]" if s.ok else "[red]FAIL[/]", s.detail)
    console.print(t)
    f = rep.figures
    link = rep.link
    console.print(
        f"link: {link['frames_out']} frames out, {link['frames_in']} in, {link['retries']} retries, "
        f"{link['bad_frames']} damaged frames, {link['stale_replies']} stale replies, {link['timeouts']} timeouts; "
        f"weights {f['weights_write_Bps'] / 1e3:.0f} kB/s write, {f['weights_read_Bps'] / 1e3:.0f} kB/s read; "
        f"MAC {f['mac_vectors_per_s']:.0f} vectors/s",
        highlight=False,
    )
    emit_json(as_json, rep.as_dict())
    if not rep.ok:
        sys.exit(1)


# ---- the twin ---------------------------------------------------------------------------------------------------
@cli.group()
def sim() -> None:
    """The twin: serve it on a pty or TCP port, list and show its profiles."""


@sim.command("serve")
@click.option("--pty", "use_pty", is_flag=True, help="Serve on a new pseudo-terminal; prints its path.")
@click.option("--tcp", "tcp_addr", metavar="HOST:PORT",
              help="Serve on TCP (port 0 picks one); prints tcp://HOST:PORT. Loopback unless --allow-remote.")
@click.option("--profile", default="default", show_default=True, help="Profile name or TOML file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the twin's mismatch and noise.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a profile parameter (repeatable).")
@click.option("--baud", type=click.IntRange(min=1), default=None, help="Pace bytes at this UART line rate (10 bits/byte).")
@click.option("--max-payload", type=click.IntRange(256, 16 * 1024 * 1024), default=64 * 1024, show_default=True,
              help="Largest frame payload the twin accepts, bytes (a host's HELLO may ask for less).")
@server_options
@click.option("--smu", "smu_addr", metavar="HOST:PORT", default=None,
              help="Also serve a simulated SMU that powers the twin, as a raw SCPI socket on loopback (port 0 picks "
                   "one); the second line of stdout is its VISA resource, TCPIP::HOST::PORT::SOCKET.")
@click.option("--backend", type=click.Choice(["python", "rtl"]), default="python", show_default=True,
              help="python: the Python twin; rtl: the RTL (bitstreams/rtl) simulated behind the board's device end.")
@click.option("--simulator", type=click.Choice(["verilator"]), default="verilator", show_default=True,
              help="With --backend rtl: the simulator.")
@cim_errors
def sim_serve(use_pty: bool, tcp_addr: str | None, profile: str, seed: int, sets: tuple[str, ...],
              baud: int | None, max_payload: int, allow_remote: bool, server_token_file: str | None,
              idle_timeout: float, smu_addr: str | None, backend: str, simulator: str) -> None:
    """Serve a twin until stopped (Ctrl-C or SIGTERM). The first line of stdout is where to connect.

    Over TCP one host is served at a time: another is refused at once (BUSY), and a host idle for --idle-timeout
    is disconnected.
    """
    from cimlab import chip_sim
    from cimlab.firmware_bridge.bridge import Bridge
    from cimlab.firmware_bridge.serve import parse_hostport, serve_pty, serve_tcp

    if use_pty == bool(tcp_addr):
        raise ConfigError("choose exactly one of --pty or --tcp HOST:PORT")
    host, port, token = server_exposure(tcp_addr, allow_remote, server_token_file)
    if backend == "rtl":
        if smu_addr:
            raise ConfigError("--smu serves the Python twin's supply; it is not available with --backend rtl")
        from cimlab.cli_board import serve_rtl

        serve_rtl(use_pty=use_pty, host=host, port=port, profile=profile, seed=seed, overrides=parse_sets(sets),
                  baud=baud, max_payload=max_payload, simulator=simulator, token=token, allow_remote=allow_remote,
                  idle_timeout_s=idle_timeout)
        return
    controller = chip_sim.make_twin(profile, seed, parse_sets(sets))
    stop = threading.Event()
    smu_resource = ""
    if smu_addr:
        from cimlab.chip_sim.smu import start_smu

        controller, smu_resource = start_smu(controller, *parse_hostport(smu_addr), stop=stop)
    bridge = Bridge(controller, max_payload=max_payload)

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def ready(where: str) -> None:
        click.echo(where)
        if smu_resource:
            click.echo(smu_resource)
            err_console.print(f"simulated SMU powering the twin: {smu_resource} (--visa-library @py)",
                              highlight=False)
        sys.stdout.flush()
        extra = f", paced at {baud} baud" if baud else ""
        extra += ", token required" if token else ""
        err_console.print(f"serving twin '{profile}' (seed {seed}){extra} on {where}; Ctrl-C stops", highlight=False)

    if use_pty:
        serve_pty(bridge, stop=stop, on_ready=ready, baud=baud)
    else:
        serve_tcp(bridge, host, port, stop=stop, on_ready=ready, baud=baud, token=token, allow_remote=allow_remote,
                  idle_timeout_s=idle_timeout)


@sim.command("profiles")
@json_option
@cim_errors
def sim_profiles(as_json: bool) -> None:
    """List the bundled twin profiles."""
    from cimlab.chip_sim.profiles import list_profiles, load_profile

    rows = []
    for name, desc in list_profiles():
        rows.append({"name": name, "description": desc, "spec": load_profile(name).spec.describe()})
    if as_json:
        emit_json(as_json, rows)
        return
    t = Table(title="twin profiles")
    t.add_column("name")
    t.add_column("macro")
    t.add_column("description", overflow="fold")
    for r in rows:
        t.add_row(r["name"], r["spec"], r["description"])
    console.print(t)


@sim.command("show")
@click.argument("profile")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a parameter before showing.")
@cim_errors
def sim_show(profile: str, sets: tuple[str, ...]) -> None:
    """Print a profile (name or file) as TOML that loads back."""
    from cimlab.chip_sim.profiles import load_profile

    click.echo(load_profile(profile, parse_sets(sets) or None).to_toml(), nl=False)


from cimlab.cli_characterize import register as _register_characterize

_register_characterize(cli)

from cimlab.cli_deploy import register as _register_deploy

_register_deploy(cli)

from cimlab.cli_farm import register as _register_farm  # noqa: E402

_register_farm(cli)

from cimlab.cli_export import register as _register_export  # noqa: E402

_register_export(cli)

from cimlab.cli_estimate import register as _register_estimate  # noqa: E402

_register_estimate(cli)

from cimlab.cli_board import register as _register_board  # noqa: E402

_register_board(cli)

from cimlab.cli_train import evaluate as _evaluate_cmd
from cimlab.cli_train import train as _train_cmd

cli.add_command(_train_cmd)
cli.add_command(_evaluate_cmd)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="cimlab")


if __name__ == "__main__":
    main()

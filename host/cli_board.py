"""``cimlab board``: the device end on a board's processor, and the RTL twin behind a port.

``cimlab board serve`` runs on a PYNQ board (``pip install 'cimlab[board]'``): it loads the overlay the manifest
lists, and serves the protocol's device end (``Bridge`` over ``FabricController``) on a TCP port or the board's
UART. ``serve_rtl`` puts the RTL twin behind a pty or a TCP port for ``cimlab sim serve --backend rtl``.
Registered into the ``cimlab`` group by ``cimlab.cli`` (``register(cli)``); imports neither ``cimlab.cli`` nor
torch.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

import click
from cimlab.cli_common import cim_errors, err_console, server_exposure, server_options
from cimlab.firmware_bridge.errors import ConfigError, LinkError


def _until_signal() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _announce(what: str) -> Callable[[str], None]:
    def ready(where: str) -> None:
        click.echo(where)
        sys.stdout.flush()
        err_console.print(f"serving {what} on {where}; Ctrl-C stops", highlight=False)

    return ready


def serve_rtl(
    *,
    use_pty: bool,
    host: str,
    port: int,
    profile: str,
    seed: int,
    overrides: dict[str, str],
    baud: int | None,
    max_payload: int,
    simulator: str,
    token: bytes | None,
    allow_remote: bool,
    idle_timeout_s: float,
) -> None:
    """Serve an RTL twin on a new pty or a TCP port until SIGINT/SIGTERM; the first stdout line is where.

    TCP follows ``cimlab.firmware_bridge.serve.serve_tcp``'s rules (loopback unless ``allow_remote`` with a
    ``token``; one host at a time; ``idle_timeout_s``)."""
    from cimlab.chip_sim.rtl.twin import RtlTwin

    stop = _until_signal()
    with RtlTwin(
        profile,
        seed,
        overrides,
        simulator=simulator,
        max_payload=max_payload,
        serve="pty" if use_pty else "tcp",
        host=host,
        port=port,
        token=token,
        allow_remote=allow_remote,
        idle_timeout_s=idle_timeout_s,
        baud=baud,
    ) as twin:
        _announce(f"RTL twin '{profile}' (seed {seed}, {simulator})")(twin.where())
        while not stop.wait(0.2):
            if twin.proc is None or twin.proc.poll() is not None:
                raise LinkError(f"the RTL simulator stopped:\n{twin.log_tail()}")


def register(cli: click.Group) -> None:
    """Add the ``board`` group to ``cli``."""

    @cli.group()
    def board() -> None:
        """On a PYNQ board: serve the chip's device end over TCP or the UART."""

    @board.command("serve")
    @click.option("--tcp", "tcp_addr", metavar="HOST:PORT", help="Serve on TCP; prints tcp://HOST:PORT.")
    @click.option("--uart", "uart", metavar="DEVICE", help="Serve on a serial port, e.g. /dev/ttyPS1.")
    @click.option("--baud", type=click.IntRange(min=1), default=921600, show_default=True, help="UART line rate.")
    @click.option("--overlay", default="cimlab_ctrl", show_default=True, help="Overlay name in the manifest.")
    @click.option("--dir", "directory", default=None, help="Folder of manifest.json and the .bit/.hwh files.")
    @click.option("--chip-id", default="board", show_default=True, help="The chip id HELLO reports.")
    @click.option(
        "--max-payload",
        type=click.IntRange(256, 16 * 1024 * 1024),
        default=64 * 1024,
        show_default=True,
        help="Largest frame payload, bytes.",
    )
    @server_options
    @cim_errors
    def board_serve(
        tcp_addr: str | None,
        uart: str | None,
        baud: int,
        overlay: str,
        directory: str | None,
        chip_id: str,
        max_payload: int,
        allow_remote: bool,
        server_token_file: str | None,
        idle_timeout: float,
    ) -> None:
        """Load the overlay and serve the device end until stopped (Ctrl-C or SIGTERM).

        The first line of stdout is where to connect. TCP binds loopback unless --allow-remote, which needs a
        --token-file that hosts send in HELLO; one host is served at a time.
        """
        from cimlab.firmware_bridge.bridge import Bridge
        from cimlab.firmware_bridge.overlay import BITSTREAMS_DIR, open_board
        from cimlab.firmware_bridge.serve import serve_serial, serve_tcp

        if bool(tcp_addr) == bool(uart):
            raise ConfigError("choose exactly one of --tcp HOST:PORT or --uart DEVICE")
        host, port, token = server_exposure(tcp_addr, allow_remote, server_token_file)
        controller = open_board(overlay, directory or BITSTREAMS_DIR, chip_id=chip_id)
        bridge = Bridge(controller, max_payload=max_payload)
        stop = _until_signal()
        ready = _announce(f"overlay '{overlay}' ({controller.identity().bitstream_id})")
        if tcp_addr:
            serve_tcp(bridge, host, port, stop=stop, on_ready=ready, token=token, allow_remote=allow_remote,
                      idle_timeout_s=idle_timeout)
        else:
            serve_serial(bridge, uart or "", stop=stop, on_ready=ready, baud=baud)

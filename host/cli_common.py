"""What every cimlab command shares: the --link/--timeout/--json options, error reporting, chip opening.

Command modules (``cimlab.cli``, ``cimlab.cli_characterize``, ``cimlab.cli_train``, ``cimlab.cli_deploy``) import these;
``cimlab.cli`` imports the command modules to register them, so nothing here imports ``cimlab.cli``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import click
from rich.console import Console

from cimlab.firmware_bridge.errors import CimError, ConfigError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

LINK_HELP = (
    "Where the chip is: sim://[?profile=P&seed=N&KEY=VALUE] (in-process twin), a serial device "
    "(/dev/ttyUSB0?baud=3000000, /dev/pts/N), a pyserial URL (socket://, rfc2217://, spy://), tcp://HOST:PORT, "
    "or pynq://OVERLAY; append #drop=P&flip=P... to inject faults."
)


def link_option(f: F) -> F:
    """The ``--link`` and ``--timeout`` options every chip command shares."""
    f = click.option("--timeout", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
                     help="Seconds without progress before a request is resent.")(f)
    return click.option("--link", "link_url", default="sim://", show_default=True, help=LINK_HELP)(f)


def json_option(f: F) -> F:
    """``--json``: print one JSON object as the last line."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")(f)


def cim_errors(f: F) -> F:
    """Turn cimlab errors into a one-line message and a non-zero exit status."""

    @wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except ConfigError as err:
            raise click.UsageError(str(err)) from err
        except CimError as err:
            err_console.print(f"[bold red]error[/] ({err.code}): {err}", highlight=False)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@contextmanager
def open_chip(url: str, timeout: float) -> Iterator[Any]:
    """Open and identify a chip for one command."""
    from cimlab.driver import Chip

    chip = Chip.open(url, timeout=timeout)
    try:
        yield chip
    finally:
        chip.close()


def parse_sets(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("k=v", ...)`` -> dict; ConfigError naming a pair without '='."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out

"""What every cimlab command shares: the --link/--timeout/--deadline/--token-file/--json options, error reporting,
chip opening.

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


TIMEOUT_HELP = "Resend interval: seconds without a sign of a reply before a request is sent again."
DEADLINE_HELP = ("Seconds any one call to the chip may take, resends included (default: 5 s plus twice what the "
                 "call's bytes need at the line rate).")
TOKEN_HELP = "File holding the token a served device requires (cimlab sim serve --token-file)."
_LINK_META = "cimlab.link"


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta.setdefault(_LINK_META, {})[param.name] = value
    return value


def call_options(f: F) -> F:
    """``--deadline`` and ``--token-file``: not passed to the command; ``open_chip`` takes them from its context."""
    f = click.option("--token-file", type=click.Path(dir_okay=False), default=None, envvar="CIMLAB_TOKEN_FILE",
                     expose_value=False, callback=_remember, help=TOKEN_HELP)(f)
    return click.option("--deadline", type=click.FloatRange(min=0.001), default=None, expose_value=False,
                        callback=_remember, help=DEADLINE_HELP)(f)


def link_option(f: F) -> F:
    """The options every chip command shares: ``--link`` and ``--timeout`` (passed to the command as ``link_url``
    and ``timeout``), and ``call_options``."""
    f = call_options(f)
    f = click.option("--timeout", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
                     help=TIMEOUT_HELP)(f)
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


def chip_options() -> dict[str, Any]:
    """``deadline`` and ``token`` as the current command's ``--deadline`` and ``--token-file`` give them."""
    ctx = click.get_current_context(silent=True)
    given = ctx.meta.get(_LINK_META, {}) if ctx is not None else {}
    token = None
    if given.get("token_file"):
        from cimlab.firmware_bridge.serve import read_token_file

        token = read_token_file(given["token_file"])
    return {"deadline": given.get("deadline"), "token": token}


@contextmanager
def open_chip(url: str, timeout: float, **kwargs: Any) -> Iterator[Any]:
    """Open and identify a chip for one command, with its ``--deadline`` and ``--token-file``; ``kwargs`` go to
    ``Chip`` (e.g. ``window``)."""
    from cimlab.driver import Chip

    chip = Chip.open(url, timeout=timeout, **chip_options(), **kwargs)
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

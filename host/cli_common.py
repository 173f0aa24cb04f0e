"""What every cimlab command shares: the --link/--timeout/--deadline/--token-file/--json options, error reporting,
chip opening.

Command modules (``cimlab.cli``, ``cimlab.cli_characterize``, ``cimlab.cli_train``, ``cimlab.cli_deploy``) import these;
``cimlab.cli`` imports the command modules to register them, so nothing here imports ``cimlab.cli``.

With ``--json`` a command's stdout holds exactly one JSON document (``emit_json``; on an error, ``{"error": ...}``)
and everything for people goes to stderr: ``console`` prints to stdout normally and to stderr under ``--json``.
"""

from __future__ import annotations

import json
import math
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
"""Output for people: stdout, or stderr while a command runs with --json."""
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


def server_options(f: F) -> F:
    """What every device end served on TCP takes (``cimlab sim serve``, ``cimlab board serve``): ``--allow-remote``,
    ``--token-file`` (as ``server_token_file``) and ``--idle-timeout`` (seconds)."""
    from cimlab.firmware_bridge.serve import IDLE_TIMEOUT_S

    f = click.option("--idle-timeout", type=click.FloatRange(min=0.1), default=IDLE_TIMEOUT_S, show_default=True,
                     help="Seconds a connected TCP host may send nothing before it is disconnected.")(f)
    f = click.option("--token-file", "server_token_file", type=click.Path(dir_okay=False), default=None,
                     help="File with the token (16..255 bytes) hosts must send in HELLO before anything is "
                          "served.")(f)
    return click.option("--allow-remote", is_flag=True,
                        help="Allow a --tcp address other than loopback (needs --token-file).")(f)


def server_exposure(tcp_addr: str | None, allow_remote: bool, server_token_file: str | None
                    ) -> tuple[str, int, bytes | None]:
    """``(host, port, token)`` of a server's ``--tcp`` address, checked before anything listens: loopback unless
    ``--allow-remote``, which needs a token; ``--allow-remote``/``--token-file`` without ``--tcp`` are refused.
    Without ``--tcp``, host and port are ``("", 0)``."""
    from cimlab.firmware_bridge.serve import check_exposure, parse_hostport, read_token_file

    token = read_token_file(server_token_file) if server_token_file else None
    if not tcp_addr:
        if allow_remote or token:
            raise ConfigError("--allow-remote and --token-file apply to --tcp only (a pty or a UART is local)")
        return "", 0, None
    host, port = parse_hostport(tcp_addr)
    check_exposure(host, allow_remote=allow_remote, token=token)
    return host, port, token


def link_option(f: F) -> F:
    """The options every chip command shares: ``--link`` and ``--timeout`` (passed to the command as ``link_url``
    and ``timeout``), and ``call_options``."""
    f = call_options(f)
    f = click.option("--timeout", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
                     help=TIMEOUT_HELP)(f)
    return click.option("--link", "link_url", default="sim://", show_default=True, help=LINK_HELP)(f)


def json_option(f: F) -> F:
    """``--json``: stdout holds exactly one JSON document; everything for people goes to stderr."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout (everything else goes to stderr).")(f)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples as lists (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def emit_json(as_json: bool, document: Any) -> None:
    """With ``--json``: write ``document`` to stdout as one strict JSON document (one line)."""
    if as_json:
        click.echo(json.dumps(json_safe(document), allow_nan=False))


@contextmanager
def _people_output_to_stderr(as_json: bool) -> Iterator[None]:
    if not as_json:
        yield
        return
    console.file = sys.stderr
    try:
        yield
    finally:
        console.file = None  # type: ignore[assignment]  # back to following sys.stdout, as when created


EXIT_CONFIG = 2
"""Exit status of a command refused for a bad argument, file or configuration (as click's usage errors)."""


def cim_errors(f: F) -> F:
    """Turn cimlab errors into one line on stderr (no usage banner: they are not usage mistakes) and a non-zero
    exit status: 2 for configuration errors, 1 for the others, 130 for Ctrl-C. With --json, stdout gets
    ``{"error": {"code", "type", "message"}}``. Under --json, ``console`` prints to stderr."""

    @wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        with _people_output_to_stderr(as_json):
            try:
                return f(*args, **kwargs)
            except KeyboardInterrupt:
                err_console.print("[yellow]interrupted[/] (Ctrl-C)", highlight=False)
                emit_json(as_json, {"error": {"code": "interrupted", "type": "KeyboardInterrupt",
                                              "message": "interrupted (Ctrl-C)"}})
                sys.exit(130)
            except CimError as err:
                err_console.print(f"[bold red]error[/] ({err.code}): {err}", highlight=False, soft_wrap=True)
                emit_json(as_json, {"error": {"code": err.code, "type": type(err).__name__, "message": str(err)}})
                sys.exit(EXIT_CONFIG if isinstance(err, ConfigError) else 1)

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

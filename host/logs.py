"""Logging for the command line, with the standard library: ``cimlab -v``, ``--log-level``, ``--log-file``.

Loggers (children of ``cimlab`` unless named)::

    cimlab.wire                        every frame the driver sends and receives, at DEBUG ("-> MAC_RAW seq=7 ...")
    cimlab.instruments.scpi.Adapter    every SCPI command and reply, at DEBUG (PyMeasure's adapter logs there)
    cimlab.instruments.supplies        the supply's output on/off and ramps, at INFO
    cimlab.characterize.sweep          conditions and batches, at INFO
    pymeasure                          PyMeasure's own messages (SCPI error-queue entries at ERROR)

Nothing is configured at import: ``setup_logging`` runs when the command line starts, and ``teardown_logging``
closes the file when it ends. A library user configures logging as usual.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import WireLog

WIRE_LOG = logging.getLogger("cimlab.wire")
ROOTS = ("cimlab", "pymeasure")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class WireTrace(WireLog):
    """The driver's ring of recent frames, each also logged to ``cimlab.wire`` at DEBUG."""

    def add(self, line: str) -> None:
        WIRE_LOG.debug("%s", line)
        super().add(line)


_MARK = "_cimlab_cli"
"""Attribute set on the handlers this module installs (so a second setup replaces them)."""


def _level(verbose: int, log_level: str | None) -> int:
    if log_level is not None:
        name = log_level.upper()
        if name not in LEVELS:
            raise ConfigError(f"--log-level {log_level!r} is not one of {', '.join(LEVELS)}")
        return int(getattr(logging, name))
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def setup_logging(verbose: int = 0, log_level: str | None = None, log_file: str | os.PathLike | None = None) -> None:
    """Log cimlab's (and PyMeasure's) messages at ``-v`` (INFO), ``-vv`` (DEBUG) or ``log_level`` to stderr, and,
    with ``log_file``, to that file as well (appended)."""
    teardown_logging()
    level = _level(verbose, log_level)
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler()
    stream.setLevel(level)
    handlers.append(stream)
    if log_file is not None:
        path = Path(log_file)
        try:
            handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"--log-file {str(path)!r} cannot be opened: {err.strerror or err}") from err
        handlers[-1].setLevel(level)
    for h in handlers:
        h.setFormatter(logging.Formatter(FORMAT))
        setattr(h, _MARK, True)
    for name in ROOTS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for h in handlers:
            logger.addHandler(h)


def teardown_logging() -> None:
    """Remove (and close) the handlers ``setup_logging`` installed."""
    for name in ROOTS:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if getattr(h, _MARK, False)]:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(logging.NOTSET)


__all__ = ["LEVELS", "WIRE_LOG", "WireTrace", "setup_logging", "teardown_logging"]

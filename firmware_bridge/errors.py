"""The one exception tree of cimlab, shared by host, bridge and twin.

::

    CimError                      root; every error carries a ``code`` (a StatusCode where one applies)
    ├── ConfigError (ValueError)  a bad argument, URL, profile, spec or file; names the field at fault
    │   └── ShapeError            an array whose shape or dtype does not fit the MacroSpec
    ├── ProtocolError             a peer that breaks the wire contract (e.g. states a payload cap below the least)
    │   ├── VersionMismatch       the peer speaks another protocol version
    │   └── PayloadError          a well-framed payload whose contents do not parse
    ├── LinkError                 the transport failed (open, read, write, closed)
    │   └── BackendUnavailable    a link backend whose optional dependency is missing
    ├── DeviceError               the device answered with a non-OK status
    ├── CimTimeoutError (TimeoutError)  a deadline passed; says what was outstanding and what was on the wire
    └── ArtifactError             a store, model, checkpoint or package that is unreadable or foreign

Errors are translated at each layer boundary with ``raise ... from err``. A frame that cannot be decoded is not an
error: the framer reports it (``BadFrame``) and the transaction layer resends what it held.
"""

from __future__ import annotations

from collections.abc import Sequence


class CimError(Exception):
    """Root of every cimlab error. ``code`` is a short machine-readable tag."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(CimError, ValueError):
    """A bad argument, URL, profile, spec or configuration value."""

    code = "config"


class ShapeError(ConfigError):
    """An array whose shape, range or dtype does not fit the MacroSpec."""

    code = "shape"


class ProtocolError(CimError):
    """Bytes that break the wire contract."""

    code = "protocol"


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    code = "version"


class PayloadError(ProtocolError):
    """A frame whose payload does not parse as its opcode's message."""

    code = "payload"


class LinkError(CimError):
    """The transport failed: it could not be opened, read, written, or it closed."""

    code = "link"


class BackendUnavailable(LinkError):
    """A link backend whose optional dependency is not installed."""

    code = "backend_unavailable"


class DeviceError(CimError):
    """The device answered a request with a non-OK status.

    ``status`` is the ``StatusCode`` and ``detail`` the device's own text.
    """

    code = "device"

    def __init__(self, message: str, *, status: object = None, detail: str = "") -> None:
        super().__init__(message, code=getattr(status, "name", None))
        self.status = status
        self.detail = detail


class CimTimeoutError(CimError, TimeoutError):
    """A deadline passed. ``wire`` holds the last frames seen, newest last, for the report."""

    code = "timeout"

    def __init__(self, message: str, *, wire: Sequence[str] = ()) -> None:
        if wire:
            message = message + "\nlast frames on the wire:\n  " + "\n  ".join(wire)
        super().__init__(message)
        self.wire = list(wire)


class ArtifactError(CimError):
    """A measurement store, error model, checkpoint or package that is unreadable or foreign."""

    code = "artifact"

"""The contract both ends share: frames, messages, MacroSpec, register map, the device-side bridge."""

from cimlab.firmware_bridge.errors import (
    ArtifactError,
    BackendUnavailable,
    CimError,
    CimTimeoutError,
    ConfigError,
    DeviceError,
    LinkError,
    PayloadError,
    ProtocolError,
    ShapeError,
    VersionMismatch,
)
from cimlab.firmware_bridge.frame import DEFAULT_MAX_PAYLOAD, PROTOCOL_VERSION
from cimlab.firmware_bridge.spec import MacroSpec

__all__ = [
    "ArtifactError",
    "BackendUnavailable",
    "CimError",
    "CimTimeoutError",
    "ConfigError",
    "DEFAULT_MAX_PAYLOAD",
    "DeviceError",
    "LinkError",
    "MacroSpec",
    "PROTOCOL_VERSION",
    "PayloadError",
    "ProtocolError",
    "ShapeError",
    "VersionMismatch",
]

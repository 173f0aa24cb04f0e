"""The twin: a cycle-level model of the CIM macro and its controller, served over a pty or TCP.

``make_twin(profile, seed, overrides)`` builds the controller that ``cimlab.firmware_bridge.bridge.Bridge`` drives;
profiles are in ``cimlab.chip_sim.profiles`` (``list_profiles``, ``load_profile``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cimlab.chip_sim.config import Profile
from cimlab.chip_sim.controller import TwinController
from cimlab.chip_sim.profiles import list_profiles, load_profile

__all__ = ["Profile", "TwinController", "list_profiles", "load_profile", "make_twin"]


def make_twin(
    profile: str | os.PathLike = "default",
    seed: int = 0,
    overrides: Mapping[str, str | int | float | bool] | None = None,
    device: str = "cpu",
) -> TwinController:
    """A twin controller for a bundled profile name or a TOML file, with ``seed`` and parameter overrides; its fast
    path runs on ``device`` (``"cpu"``, or ``"cuda"``/``"cuda:N"`` with torch: the same codes).

    Raises:
        ConfigError: unknown profile, parameter or device, a value outside its allowed range (named in the
            message).
        ArtifactError: the profile's error model file is missing or invalid.
        BackendUnavailable: a GPU device without torch or without that GPU.
    """
    return TwinController(load_profile(profile, overrides), seed, device)

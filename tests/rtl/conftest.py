"""The RTL tests share one simulator build per geometry (cached across sessions under ~/.cache/cimlab/rtl)."""

from __future__ import annotations

import pytest
from cimlab.chip_sim.profiles import load_profile
from cimlab.chip_sim.rtl.build import SimBuild, build
from rtl_helpers import GEOMETRIES


@pytest.fixture(scope="session")
def rtl_builds() -> dict[str, SimBuild]:
    """Build (or find) the suite's RTL simulations once per session."""
    return {name: build(load_profile(p, o), "verilator") for name, (p, o) in GEOMETRIES.items()}

"""The RTL twin: ``bitstreams/rtl`` simulated with cocotb on Verilator behind the board's device end.

``RtlTwin`` (``cimlab.chip_sim.rtl.twin``) starts one; ``sim://?backend=rtl&...`` and ``cimlab sim serve --backend
rtl`` use it. ``rtl_parameters`` (``cimlab.chip_sim.rtl.params``) gives every build of the RTL its parameters.
Nothing here is imported by the Python twin; the cocotb side (``sim``, ``macro``) is imported only inside the
simulator.
"""

from cimlab.chip_sim.rtl.params import fabric_layout, fabric_timing, rtl_parameters, sim_parameters

__all__ = ["fabric_layout", "fabric_timing", "rtl_parameters", "sim_parameters"]

"""The RTL's parameters, from one source: a twin profile (its MacroSpec, timing and operating limits).

Every build of ``bitstreams/rtl`` (the simulator here, Yosys in ``scripts/synth.py``, Vivado through
``bitstreams/vivado/build.tcl``) takes its parameters from ``rtl_parameters``; nothing in the HDL restates them.
"""

from __future__ import annotations

import json
import zlib

from cimlab.chip_sim.config import Profile
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.fabric import FabricLayout, Timing
from cimlab.firmware_bridge.registers import STORAGE_CODES


def fabric_layout(profile: Profile) -> FabricLayout:
    """The buffer layout of ``profile``'s fabric (ConfigError when its buffers cannot hold what they must)."""
    t = profile.timing
    return FabricLayout(profile.spec, t.bus_bits, t.in_buffer_words, t.out_buffer_words)


def fabric_timing(profile: Profile) -> Timing:
    """The sequencer's timing for ``profile`` (the conversion time is the macro's ``adc_cycles``)."""
    t = profile.timing
    return Timing(
        op_overhead_cycles=t.op_overhead_cycles,
        wl_pulse_cycles=t.wl_pulse_cycles,
        write_row_cycles=t.write_row_cycles,
        read_row_cycles=t.read_row_cycles,
        adc_cycles=t.adc_cycles,
    )


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


def rtl_parameters(profile: Profile) -> dict[str, int]:
    """Parameters of ``cimlab_ctrl`` for ``profile`` (BUILD_ID is a CRC-32 of the others)."""
    spec, lay, t, a = profile.spec, fabric_layout(profile), profile.timing, profile.analog
    params = {
        "ROWS": spec.rows,
        "COLS": spec.cols,
        "WEIGHT_BITS": spec.weight_bits,
        "WEIGHT_STORAGE": STORAGE_CODES[spec.weight_storage],
        "CELL_BITS": spec.cell_bits,
        "INPUT_BITS": spec.input_bits,
        "SLICE_BITS": spec.input_slice_bits,
        "ROWS_PER_CONV": spec.rows_per_conversion,
        "ADC_BITS": spec.adc_bits,
        "ADC_FULL_SCALE": spec.adc_full_scale,
        "CLOCK_HZ": spec.clock_hz,
        "N_GROUPS": spec.n_groups,
        "N_SLICES": spec.n_slices,
        "N_PLANES": spec.n_planes,
        "BUS_BITS": lay.bus_bits,
        "IN_WORDS": lay.in_words,
        "OUT_WORDS": lay.out_words,
        "GROUP_WORDS": lay.group_words,
        "ROW_WORDS": lay.row_words,
        "MAC_WORDS": lay.mac_words,
        "CONV_WORDS": lay.conv_words,
        "CODE_BITS": lay.code_bits,
        "T_OVH": t.op_overhead_cycles,
        "T_WL": t.wl_pulse_cycles,
        "T_WR": t.write_row_cycles,
        "T_RD": t.read_row_cycles,
        "VDD_NOMINAL_MV": a.vdd_nominal_mv,
        "VDD_MIN_MV": a.vdd_min_mv,
        "VDD_MAX_MV": a.vdd_max_mv,
        "TEMP_NOMINAL_CC": _u32(round(a.temp_nominal_c * 100)),
        "TEMP_MIN_CC": _u32(round(a.temp_min_c * 100)),
        "TEMP_MAX_CC": _u32(round(a.temp_max_c * 100)),
    }
    params["BUILD_ID"] = zlib.crc32(json.dumps(params, sort_keys=True).encode())
    return params


def sim_parameters(profile: Profile) -> dict[str, int]:
    """Parameters of ``cimlab_sim_top``: the controller's, and the behavioural macro's conversion time.

    The behavioural macro answers a conversion start with a registered done, so a conversion takes at least 2
    cycles (ConfigError for a profile with ``adc_cycles`` = 1).
    """
    if profile.timing.adc_cycles < 2:
        raise ConfigError(
            f"adc_cycles={profile.timing.adc_cycles}: the behavioural macro takes at least 2 cycles a "
            "conversion (start, then a registered done)"
        )
    return {**rtl_parameters(profile), "ADC_CYCLES": profile.timing.adc_cycles}

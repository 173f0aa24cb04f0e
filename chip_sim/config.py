"""The twin's configuration schema: a profile is a MacroSpec plus analog, timing and energy parameters.

Every parameter is a dataclass field whose metadata gives its unit, its allowed range and what it means
(``parameter_table()`` lists them all). A profile file is TOML::

    name = "default"                  # shown in the chip id: twin-<name>-s<seed>
    description = "one line"
    mode = "fast"                     # "fast" (vectorised) or "reference" (one clock at a time)
    error_model = ""                  # "" = analytic model; a .npz path = data-driven twin of one measured chip
    base = "ideal"                    # optional: start from another profile (bundled name or path)
    [spec]    ...                     # cimlab.firmware_bridge.spec.MacroSpec fields
    [analog]  ...                     # AnalogParams
    [timing]  ...                     # TimingParams
    [energy]  ...                     # EnergyParams
    [supply]  ...                     # SupplyParams: how a bench supply may power the macro
    [device]  ...                     # cimlab.chip_sim.devices.DeviceParams: errors of multi-level NVM cells

Fields left out keep their defaults (the analog defaults are an ideal macro). Overrides (``--set key=value``,
``sim://?key=value``) name a field either bare (``rows``, ``noise_sigma_lsb``) or dotted (``spec.rows``); their
values may be text and are parsed to the field's type, then validated like a file's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # a PYNQ image's Python 3.10
    import tomli as tomllib

from cimlab.chip_sim.devices import DeviceParams
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

MODES = ("fast", "reference")
"""``fast``: the vectorised path. ``reference``: the controller FSM advanced one clock at a time."""


def _param(default: Any, lo: float | None, hi: float | None, unit: str, doc: str) -> Any:
    return field(default=default, metadata={"range": (lo, hi), "unit": unit, "doc": doc})


@dataclass(frozen=True)
class AnalogParams:
    """Non-idealities of the analog array and its ADCs. Defaults describe an ideal macro.

    Static mismatch (gain, offset, cells, stuck cells, ADC thresholds) is drawn once from the twin's seed;
    noise is drawn per conversion. "LSB" is one ADC code step (``adc_lsb`` ideal levels).
    """

    gain_sigma: float = _param(0.0, 0.0, 0.5, "relative", "Per-column gain mismatch, 1 sigma (0.01 = 1 %).")
    offset_sigma_lsb: float = _param(0.0, 0.0, 8.0, "LSB", "Per-column input-referred offset, 1 sigma.")
    cell_sigma: float = _param(
        0.0, 0.0, 0.5, "relative",
        "Per-bit-cell read-current variation, 1 sigma; quantised to 1/CELL_GRID of a nominal cell.",
    )
    stuck_at_0: float = _param(
        0.0, 0.0, 0.5, "fraction",
        "Cells whose compute port is stuck off (contribute 0). Normal reads still return the written data.",
    )
    stuck_at_1: float = _param(
        0.0, 0.0, 0.5, "fraction", "Cells whose compute port is stuck on (contribute the largest digit)."
    )
    noise_sigma_lsb: float = _param(
        0.0, 0.0, 8.0, "LSB", "Read/thermal noise per conversion, 1 sigma, at nominal VDD and temperature."
    )
    adc_dnl_sigma_lsb: float = _param(
        0.0, 0.0, 1.0, "LSB", "Random error of each ADC decision threshold, 1 sigma (shared by all columns)."
    )
    adc_inl_bow_lsb: float = _param(
        0.0, -4.0, 4.0, "LSB", "Systematic INL: parabolic bow of the thresholds, this much at mid-scale."
    )
    vdd_nominal_mv: int = _param(800, 300, 2000, "mV", "Supply at which the gain, noise and energy figures hold.")
    vdd_min_mv: int = _param(600, 300, 2000, "mV", "Lowest VDD_MV register value accepted.")
    vdd_max_mv: int = _param(1000, 300, 2000, "mV", "Highest VDD_MV register value accepted.")
    gain_vdd_coeff: float = _param(
        0.0, -10.0, 10.0, "1", "Relative gain change per relative VDD change (0.5: -10 % VDD gives -5 % gain)."
    )
    noise_vdd_coeff: float = _param(
        0.0, -10.0, 10.0, "1", "Relative noise change per relative VDD change (-1.5: -10 % VDD gives +15 %)."
    )
    temp_nominal_c: float = _param(25.0, -55.0, 150.0, "degC", "Temperature at which the figures hold.")
    temp_min_c: float = _param(-40.0, -55.0, 150.0, "degC", "Lowest TEMP_CC register value accepted.")
    temp_max_c: float = _param(125.0, -55.0, 150.0, "degC", "Highest TEMP_CC register value accepted.")
    gain_tempco_ppm: float = _param(0.0, -10000.0, 10000.0, "ppm/degC", "Gain drift with temperature.")
    offset_tempco_lsb: float = _param(0.0, -1.0, 1.0, "LSB/degC", "Offset drift with temperature (all columns).")

    @property
    def is_ideal(self) -> bool:
        """True when no non-ideality is enabled at nominal conditions."""
        return not any(
            (self.gain_sigma, self.offset_sigma_lsb, self.cell_sigma, self.stuck_at_0, self.stuck_at_1,
             self.noise_sigma_lsb, self.adc_dnl_sigma_lsb, self.adc_inl_bow_lsb)
        )


@dataclass(frozen=True)
class TimingParams:
    """The controller FSM's cycle costs (clock = ``spec.clock_hz``).

    The sequencer's states and their cycle counts are those of the RTL (``bitstreams/rtl/cimlab_seq.sv``); the
    formulas are in ``cimlab.firmware_bridge.fabric``. A request whose data do not fit the buffers runs as several
    runs, each paying ``op_overhead_cycles``.
    """

    op_overhead_cycles: int = _param(
        8, 0, 1_000_000, "cycles", "Command decode and set-up per run of the sequencer."
    )
    bus_bits: int = _param(
        64, 32, 4096, "bits", "Width of the buffers' sequencer port (32 x a power of two: 32, 64, 128, ...)."
    )
    write_row_cycles: int = _param(2, 1, 10_000, "cycles", "SRAM write of one weight row (all columns).")
    read_row_cycles: int = _param(2, 1, 10_000, "cycles", "SRAM read of one weight row (all columns).")
    wl_pulse_cycles: int = _param(2, 1, 10_000, "cycles", "Word-line pulse of one input slice.")
    adc_cycles: int = _param(6, 1, 10_000, "cycles", "One conversion of one row group (all columns in parallel).")
    in_buffer_words: int = _param(
        0, 0, 1 << 16, "bus words", "Input buffer depth, a power of two (0: 32 full vectors or weight rows)."
    )
    out_buffer_words: int = _param(
        0, 0, 1 << 16, "bus words",
        "Output buffer depth, a power of two (0: 32 vectors' outputs or rows, and one vector's raw codes).",
    )


@dataclass(frozen=True)
class EnergyParams:
    """Energy estimate per event at nominal VDD; scaled by ``(VDD / vdd_nominal)**2``."""

    adc_fj: float = _param(40.0, 0.0, 1e6, "fJ", "One ADC conversion of one column.")
    bitline_fj_per_level: float = _param(1.5, 0.0, 1e6, "fJ", "Bit-line discharge per unit of partial sum s.")
    wordline_fj: float = _param(6.0, 0.0, 1e6, "fJ", "One word-line pulse of one row (nonzero input slice).")
    digital_fj_per_vector: float = _param(250.0, 0.0, 1e9, "fJ", "Shift-add and FIFO work per MAC vector.")
    write_fj_per_bit: float = _param(2.0, 0.0, 1e6, "fJ", "Writing one cell bit.")


@dataclass(frozen=True)
class SupplyParams:
    """How a bench supply may power the macro's VDD (its allowed range is ``analog.vdd_min_mv..vdd_max_mv``).

    ``cimlab characterize --smu`` takes its default current compliance and its ramp from here; a served twin's
    simulated SMU (``cimlab sim serve --smu``) clips its current at the compliance like a real one.
    """

    compliance_ma: float = _param(
        5.0, 0.001, 1000.0, "mA", "Current limit set before the output turns on (the macro draws well below it)."
    )
    ramp_step_mv: int = _param(50, 1, 1000, "mV", "Largest voltage step while ramping the output up or down.")
    ramp_dwell_ms: float = _param(2.0, 0.0, 1000.0, "ms", "Pause after each ramp step, for the output to settle.")


SECTIONS: dict[str, type] = {
    "analog": AnalogParams, "timing": TimingParams, "energy": EnergyParams, "supply": SupplyParams,
    "device": DeviceParams,
}
TOP_LEVEL = ("name", "description", "mode", "error_model")


@dataclass(frozen=True)
class Profile:
    """A twin configuration without its seed: macro geometry, non-idealities, timing, energy.

    Attributes:
        name: short name, shown in the chip id.
        description: one line for humans.
        spec: the macro's MacroSpec.
        mode: one of ``MODES``.
        error_model: absolute path of a ``.npz`` error model (data-driven twin), or ``""`` (analytic model).
        analog, timing, energy, supply, device: the parameter groups.
    """

    name: str
    description: str = ""
    spec: MacroSpec = field(default_factory=MacroSpec)
    mode: str = "fast"
    error_model: str = ""
    analog: AnalogParams = field(default_factory=AnalogParams)
    timing: TimingParams = field(default_factory=TimingParams)
    energy: EnergyParams = field(default_factory=EnergyParams)
    supply: SupplyParams = field(default_factory=SupplyParams)
    device: DeviceParams = field(default_factory=DeviceParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, every field present (what ``to_toml`` writes)."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "mode": self.mode,
            "error_model": self.error_model,
            "spec": self.spec.to_dict(),
        }
        for section in SECTIONS:
            out[section] = dataclasses.asdict(getattr(self, section))
        return out

    def to_toml(self) -> str:
        """The profile as TOML; ``profile_from_toml`` (or saving it and ``load_profile``) gives an equal one."""
        return tomli_w.dumps(self.to_dict())

    def with_overrides(self, overrides: Mapping[str, str | int | float | bool] | None) -> Profile:
        """A copy with ``overrides`` applied and validated (see the module docstring)."""
        if not overrides:
            return self
        data = self.to_dict()
        apply_overrides(data, overrides)
        return profile_from_dict(data, source=f"profile {self.name!r} with overrides", base_dir=Path.cwd())


# ---- parsing and validation ---------------------------------------------------------------------------------
def _field_index() -> dict[str, list[tuple[str | None, str]]]:
    """Bare field name -> [(section or None, name)]."""
    index: dict[str, list[tuple[str | None, str]]] = {}
    for name in TOP_LEVEL:
        index.setdefault(name, []).append((None, name))
    for f in dataclasses.fields(MacroSpec):
        index.setdefault(f.name, []).append(("spec", f.name))
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            index.setdefault(f.name, []).append((section, f.name))
    return index


def _spec_types() -> dict[str, type]:
    return {f.name: (str if f.name == "weight_storage" else int) for f in dataclasses.fields(MacroSpec)}


def _field_type(section: str | None, name: str) -> type:
    if section is None:
        return str
    if section == "spec":
        return _spec_types()[name]
    f = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]
    return {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]


def _parse_text(value: str | int | float | bool, typ: type, where: str) -> Any:
    """Text from --set or a URL query -> the field's type."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if typ is bool:
            low = text.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise ValueError(text)
        if typ is int:
            try:
                return int(text, 0)
            except ValueError:
                as_float = float(text)
                if not as_float.is_integer():
                    raise
                return int(as_float)
        if typ is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a valid {typ.__name__}") from None
    return text


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, str | int | float | bool]) -> None:
    """Set ``overrides`` (bare or dotted keys, text or typed values) into a profile dict, in place."""
    index = _field_index()
    for key, value in overrides.items():
        section: str | None
        if "." in key:
            section, _, name = key.partition(".")
            targets = [t for t in index.get(name, []) if t[0] == section]
        else:
            name = key
            targets = index.get(key, [])
        if not targets:
            known = ", ".join(sorted(index))
            raise ConfigError(f"unknown profile parameter {key!r}; known parameters: {known}")
        if len(targets) > 1:
            options = ", ".join(f"{s}.{n}" for s, n in targets)
            raise ConfigError(f"profile parameter {key!r} is ambiguous; use one of {options}")
        section, name = targets[0]
        parsed = _parse_text(value, _field_type(section, name), f"override {key}")
        if section is None:
            data[name] = parsed
        else:
            data.setdefault(section, {})[name] = parsed


def _check_value(source: str, cls_name: str, f: dataclasses.Field, value: Any) -> Any:
    where = f"{source}: {cls_name}.{f.name}"
    typ = str(f.type)
    lo, hi = f.metadata["range"]
    unit = f.metadata["unit"]
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer ({unit}), got {value!r}")
    elif typ == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number ({unit}), got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
    if lo is not None and not lo <= value <= hi:
        raise ConfigError(f"{where}={value!r} is outside the allowed range {lo:g}..{hi:g} ({unit})")
    return value


def _build_section(cls: type, data: Any, source: str) -> Any:
    name = cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{_section_name(cls)}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: [{_section_name(cls)}] has unknown field(s) {', '.join(unknown)}; "
            f"known: {', '.join(fields)}"
        )
    values = {k: _check_value(source, name, fields[k], v) for k, v in data.items()}
    return cls(**values)


def _section_name(cls: type) -> str:
    return {v: k for k, v in SECTIONS.items()}.get(cls, "spec")


def profile_from_dict(data: Mapping[str, Any], *, source: str, base_dir: Path | None = None) -> Profile:
    """Validate a profile dict (as read from TOML, ``base`` already resolved) into a Profile."""
    allowed = set(TOP_LEVEL) | {"spec"} | set(SECTIONS)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    for key in TOP_LEVEL:
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{source}: {key} must be a string, got {data[key]!r}")
    name = data.get("name", "")
    if not name or any(c.isspace() for c in name):
        raise ConfigError(f"{source}: name must be a non-empty string without spaces, got {name!r}")
    mode = data.get("mode", "fast")
    if mode not in MODES:
        raise ConfigError(f"{source}: mode={mode!r} is not one of {', '.join(MODES)}")
    spec_data = data.get("spec", {})
    if not isinstance(spec_data, dict):
        raise ConfigError(f"{source}: [spec] must be a table")
    try:
        spec = MacroSpec.from_dict(dict(spec_data))
    except (ConfigError, TypeError, ValueError, OverflowError) as err:
        raise ConfigError(f"{source}: [spec] {err}") from err
    sections = {s: _build_section(cls, data.get(s, {}), source) for s, cls in SECTIONS.items()}
    analog: AnalogParams = sections["analog"]
    if not analog.vdd_min_mv <= analog.vdd_nominal_mv <= analog.vdd_max_mv:
        raise ConfigError(
            f"{source}: AnalogParams.vdd_nominal_mv={analog.vdd_nominal_mv} must lie in "
            f"vdd_min_mv..vdd_max_mv ({analog.vdd_min_mv}..{analog.vdd_max_mv})"
        )
    if not analog.temp_min_c <= analog.temp_nominal_c <= analog.temp_max_c:
        raise ConfigError(
            f"{source}: AnalogParams.temp_nominal_c={analog.temp_nominal_c} must lie in "
            f"temp_min_c..temp_max_c ({analog.temp_min_c}..{analog.temp_max_c})"
        )
    if analog.stuck_at_0 + analog.stuck_at_1 > 0.5:
        raise ConfigError(f"{source}: AnalogParams.stuck_at_0 + stuck_at_1 must not exceed 0.5")
    device: DeviceParams = sections["device"]
    device.check(source)
    error_model = data.get("error_model", "")
    if error_model:
        path = Path(os.path.expanduser(error_model))
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        error_model = str(path.resolve())
    return Profile(
        name=name,
        description=data.get("description", ""),
        spec=spec,
        mode=mode,
        error_model=error_model,
        analog=analog,
        timing=sections["timing"],
        energy=sections["energy"],
        supply=sections["supply"],
        device=device,
    )


def read_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text; ConfigError naming the source and the parser's complaint."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from err


def parameter_table() -> list[dict[str, Any]]:
    """Every tunable parameter: key, unit, allowed range, default and meaning (for docs and ``--help``)."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            lo, hi = f.metadata["range"]
            rows.append(
                {"key": f"{section}.{f.name}", "unit": f.metadata["unit"], "min": lo, "max": hi,
                 "default": f.default, "doc": f.metadata["doc"], "source": f.metadata.get("source", "")}
            )
    return rows

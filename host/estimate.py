"""``cimlab estimate``: area (um^2) and energy per inference (pJ) of a compiled network on a crossbar design, by
component: arrays, ADCs, DACs, drivers, shift-add. **Estimated** from a technology table and the compiled mapping,
not measured (``cimlab bench`` reports the chip's own energy counters beside it).

The design is the one NVM crossbars are built for: every page of the compiled schedule (one load of the macro) is
its own physical crossbar, so the weights stay resident and nothing is reprogrammed. An array is ``spec.rows`` rows
by ``cols * slices_per_side`` cells; ``differential`` storage needs two arrays per page (G+ and G-), each with its
own row DACs; a tile of both signs that the compiler put on pairs of adjacent columns of a unipolar array
(``Tile.paired``) uses twice its columns and shares its rows' DACs.

Events per input vector of a tile (a vector is one row of a layer's im2col matrix; ``vectors`` per inference are
counted by running the network on one input):

===========  ===============================================================================================
component    events
===========  ===============================================================================================
arrays       cells read: input slices x tile rows x the tile's cells per row (every row driven: an upper bound)
adcs         conversions (``Tile.conversions_per_vector``)
dacs         row drives: input slices x tile rows x arrays it spans
drivers      sample-and-holds, one per conversion
shift_add    one accumulation per conversion
===========  ===============================================================================================

Instances (area): cells of every array; ``ceil(array columns / adc.columns)`` ADCs (and as many shift-add units)
per array; one DAC per row and one sample-and-hold per column of every array. With **shared periphery** (uniform
quantization: one weight and one activation range for every layer, so one ADC and DAC design serves all layers, as
García-Redondo et al. 2020 argue) the layers, run one after the other, share one bank of ADCs and shift-add units
sized for the layer that needs most; with **per-layer** ranges every array keeps its own. An ADC of ``b`` bits costs
``energy_per_bit ** (b - bits_ref)`` times the reference's energy and ``area_per_bit ** (b - bits_ref)`` its area; a
DAC of ``b`` input bits ``2**b - 1`` unit drivers.

The technology table (TOML) gives every number as ``{value, unit, source}``; ``DEFAULT_TECH`` is ISAAC's Table 2
(``host/tech/isaac-32nm.toml``, each figure checked against two public transcriptions of that table);
``isaac-32nm-saberi`` scales its ADC more gently with resolution. The totals are the sums of the components,
nothing else.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import Tile

COMPONENTS = ("arrays", "adcs", "dacs", "drivers", "shift_add")
PERIPHERY = ("per-layer", "shared")
DEFAULT_TECH = "isaac-32nm"
MAX_TECH_BYTES = 1 << 20
TECH_UNITS: dict[str, dict[str, str]] = {
    "adc": {"bits_ref": "bits", "energy_pj": "pJ", "area_um2": "um^2", "columns": "columns", "energy_per_bit": "1",
            "area_per_bit": "1"},
    "dac": {"energy_pj": "pJ", "area_um2": "um^2"},
    "driver": {"energy_pj": "pJ", "area_um2": "um^2"},
    "array": {"cell_energy_pj": "pJ", "cell_area_um2": "um^2"},
    "shift_add": {"energy_pj": "pJ", "area_um2": "um^2"},
}
"""Every entry a technology table must give, with the unit it must state."""


@dataclass(frozen=True)
class Technology:
    """A technology table: ``values[table][key]`` (in ``TECH_UNITS``' units) and ``sources[table][key]``."""

    name: str
    description: str
    values: dict[str, dict[str, float]]
    sources: dict[str, dict[str, str]]

    def get(self, table: str, key: str) -> float:
        """One number, in the unit ``TECH_UNITS`` names."""
        return self.values[table][key]


def bundled_techs() -> list[str]:
    """Names of the technology tables that ship with cimlab."""
    return sorted(p.name[: -len(".toml")] for p in (resources.files("cimlab") / "tech").iterdir()
                  if p.name.endswith(".toml"))


def load_tech(path: str | os.PathLike | None = None) -> Technology:
    """A technology table: a TOML file, or the name of a bundled one (``bundled_techs``; default: the ISAAC table).

    Raises:
        ConfigError: unreadable file, a missing entry, an entry without value, unit and source, a unit other than
            the one expected, or a value that is not a finite positive number.
    """
    if path is None or (isinstance(path, str) and path in bundled_techs() and not Path(path).exists()):
        name = DEFAULT_TECH if path is None else str(path)
        res = resources.files("cimlab") / "tech" / f"{name}.toml"
        text, where = res.read_text(encoding="utf-8"), f"bundled technology {name!r}"
    else:
        p = Path(path)
        where = f"technology file {str(p)!r}"
        try:
            if p.stat().st_size > MAX_TECH_BYTES:
                raise ConfigError(f"{where}: larger than {MAX_TECH_BYTES:,} bytes")
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{where}: cannot read: {err}") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML: {err}") from err
    values: dict[str, dict[str, float]] = {}
    sources: dict[str, dict[str, str]] = {}
    for table, keys in TECH_UNITS.items():
        section = data.get(table)
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: missing table [{table}] (needs {', '.join(keys)})")
        values[table], sources[table] = {}, {}
        for key, unit in keys.items():
            entry = section.get(key)
            if not isinstance(entry, dict) or set(entry) != {"value", "unit", "source"}:
                raise ConfigError(f"{where}: [{table}] {key} must be {{value, unit, source}}, got {entry!r}")
            value, got_unit, source = entry["value"], entry["unit"], entry["source"]
            if got_unit != unit:
                raise ConfigError(f"{where}: [{table}] {key} is in {got_unit!r}; give it in {unit!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"{where}: [{table}] {key} = {value!r} must be a positive number ({unit})")
            if not isinstance(source, str) or not source.strip():
                raise ConfigError(f"{where}: [{table}] {key} needs a source (where the number comes from)")
            values[table][key] = float(value)
            sources[table][key] = source
    return Technology(str(data.get("name", where)), str(data.get("description", "")), values, sources)


@dataclass
class Estimate:
    """Area and energy per inference by component (see the module docstring)."""

    area_um2: dict[str, float]
    energy_pj: dict[str, float]
    arrays: int
    adcs: int
    conversions: int
    periphery: str
    tech: str
    notes: list[str] = field(default_factory=list)

    @property
    def total_area_um2(self) -> float:
        """Sum of the components' areas."""
        return sum(self.area_um2.values())

    @property
    def total_energy_pj(self) -> float:
        """Sum of the components' energies."""
        return sum(self.energy_pj.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly figures."""
        return {"area_um2": dict(self.area_um2), "energy_pj_per_inference": dict(self.energy_pj),
                "total_area_um2": self.total_area_um2, "total_energy_pj_per_inference": self.total_energy_pj,
                "arrays": self.arrays, "adcs": self.adcs, "conversions_per_inference": self.conversions,
                "periphery": self.periphery, "tech": self.tech, "estimated": True, "notes": list(self.notes)}


def adc_scale(tech: Technology, bits: int, what: str) -> float:
    """Energy (``what="energy"``) or area (``"area"``) of a ``bits``-bit ADC relative to the table's reference ADC."""
    return tech.get("adc", f"{what}_per_bit") ** (bits - tech.get("adc", "bits_ref"))


def dac_units(spec: MacroSpec) -> int:
    """Unit drivers in one row DAC: ``2**input_slice_bits - 1``."""
    return spec.slice_max


def tile_pair_factor(tile: Tile) -> int:
    """2 for a tile of both signs stored on pairs of adjacent columns of a unipolar array, else 1."""
    return 2 if getattr(tile, "paired", False) else 1


def estimate(spec: MacroSpec, tiles_by_layer: dict[str, list[Tile]], vectors: dict[str, int],
             tech: Technology, *, periphery: str = "per-layer") -> Estimate:
    """The estimate of a compiled mapping (see the module docstring).

    Args:
        spec: the macro the tiles are placed on.
        tiles_by_layer: each CIM layer's placed tiles (``Schedule.layers``), in execution order.
        vectors: input vectors each layer's tiles see per inference.
        periphery: ``per-layer`` (every array its own ADCs) or ``shared`` (uniform ranges: one ADC bank).

    Raises:
        ConfigError: an unknown periphery, or a layer without its vector count.
    """
    if periphery not in PERIPHERY:
        raise ConfigError(f"periphery {periphery!r} is not one of {', '.join(PERIPHERY)}")
    missing = sorted(set(tiles_by_layer) - set(vectors))
    if missing:
        raise ConfigError(f"no vector count for layer(s) {', '.join(missing)}")
    energy = dict.fromkeys(COMPONENTS, 0.0)
    conversions = 0
    adc_e = tech.get("adc", "energy_pj") * adc_scale(tech, spec.adc_bits, "energy")
    sides = spec.sides
    cells_per_row = spec.slices_per_side * sides
    for name, tiles in tiles_by_layer.items():
        v = vectors[name]
        for t in tiles:
            pair = tile_pair_factor(t)
            conv = t.conversions_per_vector(spec)  # a paired tile's counts both columns of each pair
            conversions += v * conv
            energy["adcs"] += v * conv * adc_e
            energy["drivers"] += v * conv * tech.get("driver", "energy_pj")
            energy["shift_add"] += v * conv * tech.get("shift_add", "energy_pj")
            cells = spec.n_planes * t.n_rows * t.n_cols * cells_per_row * pair
            energy["arrays"] += v * cells * tech.get("array", "cell_energy_pj")
            energy["dacs"] += v * spec.n_planes * t.n_rows * sides * dac_units(spec) * tech.get("dac", "energy_pj")
    pages = sorted({t.page for tiles in tiles_by_layer.values() for t in tiles})
    arrays = len(pages) * sides
    array_cols = spec.cols * spec.slices_per_side
    adcs_per_array = math.ceil(array_cols / tech.get("adc", "columns"))
    if periphery == "shared":
        adcs = max(len({t.page for t in tiles}) * sides for tiles in tiles_by_layer.values()) * adcs_per_array
    else:
        adcs = arrays * adcs_per_array
    area = {
        "arrays": arrays * spec.rows * array_cols * tech.get("array", "cell_area_um2"),
        "adcs": adcs * tech.get("adc", "area_um2") * adc_scale(tech, spec.adc_bits, "area"),
        "dacs": arrays * spec.rows * dac_units(spec) * tech.get("dac", "area_um2"),
        "drivers": arrays * array_cols * tech.get("driver", "area_um2"),
        "shift_add": adcs * tech.get("shift_add", "area_um2"),
    }
    notes = [f"{len(pages)} page(s), each a resident crossbar of {spec.rows} x {array_cols} cells"
             + (" per side (G+ and G-)" if sides == 2 else ""),
             f"{adcs} ADC(s) of {spec.adc_bits} bits, {periphery} periphery",
             "every row counted as driven (an upper bound on array and DAC energy)"]
    return Estimate(area, energy, arrays, adcs, conversions, periphery, tech.name, notes)


__all__ = ["COMPONENTS", "DEFAULT_TECH", "PERIPHERY", "TECH_UNITS", "Estimate", "Technology", "adc_scale",
           "bundled_techs", "estimate", "load_tech"]


# ---- a compiled package (imports torch) -------------------------------------------------------------------------
def layer_vectors(pkg: Any) -> dict[str, int]:
    """Input vectors each CIM layer of a ``DeployPackage`` drives per inference, counted by running its network
    on one input of the task's shape (a convolution drives one vector per output position)."""
    import torch

    from cimlab.deploy.runner import build_model
    from cimlab.training.layers import cim_layers
    from cimlab.training.tasks import INPUT_SHAPES

    if pkg.task not in INPUT_SHAPES:
        raise ConfigError(f"task {pkg.task!r} has no known input shape; known: {', '.join(INPUT_SHAPES)}")
    model = build_model(pkg)
    counts: dict[str, int] = {}
    handles = []
    for name, layer in cim_layers(model):
        def count(module: Any, args: tuple[Any, ...], name: str = name) -> None:
            counts[name] = int(module.macro_matrix_inputs(args[0]).shape[0])
        handles.append(layer.register_forward_pre_hook(count))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *INPUT_SHAPES[pkg.task]))
    finally:
        for h in handles:
            h.remove()
    return counts


def periphery_of(pkg: Any) -> str:
    """``shared`` when the package's network was trained with uniform ranges (one for every layer), else
    ``per-layer``."""
    ck = pkg.manifest.get("checkpoint", {}).get("manifest", {})
    return "shared" if ck.get("quant") == "uniform" else "per-layer"


def estimate_package(pkg: Any, tech: Technology | None = None, *, periphery: str | None = None) -> Estimate:
    """The estimate of a ``DeployPackage`` (periphery: as trained, unless given)."""
    tech = tech or load_tech()
    tiles = {name: list(lm.tiles) for name, lm in pkg.schedule.layers}
    return estimate(pkg.spec, tiles, layer_vectors(pkg), tech, periphery=periphery or periphery_of(pkg))


__all__ += ["estimate_package", "layer_vectors", "periphery_of"]

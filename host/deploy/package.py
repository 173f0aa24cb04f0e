"""The deployment package: what ``cimlab compile`` writes and ``cimlab deploy`` / ``cimlab bench`` read.

One ``.npz`` file (plain numpy, no pickle: ``numpy.load(path, allow_pickle=False)`` reads it), written atomically::

    manifest                0-d unicode array: a JSON object (below)
    page.<p>                [rows, cols] logical weights of macro load p as the chip holds them (a placed schedule's
                            columns on their chip columns), the chip's wire dtype (what WRITE_WEIGHTS sends; cells
                            outside every tile are 0)
    layer.<name>.weights    [K, M] int: the layer's logical weights as programmed (signed for a layer on column
                            pairs, whose tiles split them; magnitudes for a unipolar-neg layer on a unipolar macro)
    layer.<name>.scale      [M] float32: per-output-channel weight scale (negative for those magnitudes)
    layer.<name>.bias       [M] float32: bias added digitally (zeros for a layer without bias)
    layer.<name>.qsum       [M] int64: sum over rows of the signed quantized weights (the E-PACT offset term)
    state.<key>             the checkpoint's tensors (batch norm and every other host-side parameter)

Manifest::

    {"format": "cimlab.deploy", "version": 4,
     "spec": {MacroSpec fields}, "protocol_version": int, "regmap_version": int,
     "target": {"source": "...", "chip_id": "..."},
     "task": "digits", "model": {"name", "kwargs"}, "mode": "quant" | "dnat", "quantizer": "epact" | ...,
     "quant": "per-layer" | "uniform",
     "checkpoint": {"path", "sha256" (file bytes), "tensors_sha256", "manifest": {the checkpoint's manifest}},
     "error_model": {"sha256", ...} | null,          the error model the checkpoint was trained with
     "placed_on": {"path", "sha256"} | null,          the die's error model the columns were placed on
     "schedule": {Schedule.to_dict()},                  with "column_order" when placed
     "rows_written_per_pass": [int per page],         rows that differ from the previous page's image
     "layers": [{"name", "kind", "n_rows", "n_cols", "lo", "hi", "delta", "polarity", "geometry"}],
     "digital": "...",                                the host's arithmetic around the macro, in words
     "arrays_sha256": "...",                          over every array but the manifest (names, dtypes, shapes,
                                                      bytes, sorted by name)
     "created_by": "cimlab X.Y"}
    manifest_sha256         0-d unicode array: SHA-256 of the manifest text (the manifest is covered by its hash)

Loading trusts nothing: the manifest is read first (its declared size capped) and its hash and field types checked;
every array's declared size is then checked against what the manifest says it holds (page images and layer
arrays exactly, the checkpoint's state in total) before it is decompressed.

The host computes, per CIM layer and output channel ``m`` (``MAC`` from the macro, tiles of one column range
added, a paired tile's two columns per output subtracted): ``y = scale[m] * (delta * MAC[m] + lo * qsum[m]) +
bias[m]``; its inputs are ``codes = round((clip(x, lo, hi) - lo) / delta)``.

A package is for one MacroSpec and one protocol and register-map version: ``check_hello`` refuses a chip that
reports anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cimlab.deploy.schedule import Schedule
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError, ShapeError, VersionMismatch
from cimlab.firmware_bridge.files import (
    NpzReader,
    atomic_path,
    manifest_field,
    package_version,
    parse_manifest,
    read_text_member,
    require_types,
    text_sha256,
)
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import POLARITIES

FORMAT = "cimlab.deploy"
VERSION = 4
MAX_MANIFEST_CHARS = 1 << 22
"""Longest manifest read, characters."""
MAX_STATE_BYTES = 1 << 28
"""Most bytes the checkpoint's state arrays may hold in all."""
MAX_PACKAGE_BYTES = 1 << 32
"""Largest package file read, bytes."""
MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "spec": dict, "protocol_version": int, "regmap_version": int, "task": str, "model": dict, "mode": str,
    "checkpoint": dict, "schedule": dict, "layers": list, "arrays_sha256": str,
}
LAYER_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "kind": str, "n_rows": int, "n_cols": int, "lo": (int, float), "hi": (int, float),
    "delta": (int, float), "polarity": str,
}
DIGITAL = (
    "codes = round((clip(x, lo, hi) - lo) / delta); MAC = sum over tiles of the macro's outputs (a paired tile: "
    "each pair's first column minus its second); y[m] = scale[m] * (delta * MAC[m] + lo * qsum[m]) + bias[m]"
)


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class LayerParams:
    """The host-side numbers of one CIM layer (see the module docstring).

    Attributes:
        name: the layer's qualified module name.
        kind: ``linear``, ``conv1d`` or ``conv2d``.
        weights: logical weights as programmed [K, M] (int64).
        scale: per-channel weight scale [M] (float32).
        bias: per-channel bias [M] (float32).
        qsum: per-channel sum of the programmed weights [M] (int64).
        lo, hi: E-PACT bounds of the layer's input.
        delta: input value of one code step, ``(hi - lo) / input_max``.
        polarity: ``bipolar``, ``unipolar-pos`` or ``unipolar-neg`` (how the layer was trained and is placed).
        geometry: the layer's shape parameters (features, channels, kernel, stride, padding, dilation).
    """

    name: str
    kind: str
    weights: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    qsum: np.ndarray
    lo: float
    hi: float
    delta: float
    polarity: str
    geometry: dict[str, Any] = field(default_factory=dict)

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's entry (arrays are stored separately)."""
        k, m = self.weights.shape
        return {"name": self.name, "kind": self.kind, "n_rows": int(k), "n_cols": int(m), "lo": self.lo,
                "hi": self.hi, "delta": self.delta, "polarity": self.polarity, "geometry": self.geometry}


@dataclass
class DeployPackage:
    """A compiled network for one macro (see the module docstring).

    Attributes:
        manifest: the JSON manifest.
        spec: the macro it is compiled for.
        schedule: tile placement and pages.
        layers: the CIM layers' host-side numbers, in execution order.
        pages: the weight image of each macro load, [rows, cols] int64.
        state: the checkpoint's tensors as numpy arrays.
        path: where it was read from or written to.
    """

    manifest: dict[str, Any]
    spec: MacroSpec
    schedule: Schedule
    layers: dict[str, LayerParams]
    pages: list[np.ndarray]
    state: dict[str, np.ndarray]
    path: Path | None = None

    # ---- what the package says -----------------------------------------------------------------------------
    @property
    def task(self) -> str:
        """The task the network was trained on."""
        return str(self.manifest["task"])

    @property
    def n_pages(self) -> int:
        """Macro loads one inference needs."""
        return len(self.pages)

    def page_image(self, page: int) -> np.ndarray:
        """Weights [rows, cols] (int64) of macro load ``page``."""
        if not 0 <= page < self.n_pages:
            raise ConfigError(f"page {page} is outside 0..{self.n_pages - 1} (the package has {self.n_pages})")
        return self.pages[page]

    def rows_written_per_pass(self) -> list[int]:
        """Rows that differ between each page's image and the previous one's (page 0 follows the last page)."""
        if self.n_pages <= 1:
            return [0] * self.n_pages
        return [int(np.count_nonzero((self.pages[p] != self.pages[p - 1]).any(axis=1)))
                for p in range(self.n_pages)]

    def describe(self) -> str:
        """One line for humans."""
        s = self.schedule
        tiles = sum(len(lm.tiles) for _, lm in s.layers)
        m = self.manifest
        return (f"{m['model']['name']} ({m['mode']}, task {self.task}): {len(self.layers)} CIM "
                f"layers in {tiles} tiles on {self.n_pages} page(s), {s.programming_passes_per_batch} programming "
                f"pass(es) per batch; {self.spec.describe()}")

    def check_hello(self, hello: Any, where: str = "the chip") -> None:
        """Refuse a chip (its ``cimlab.driver.Hello``) of another protocol, register map or MacroSpec.

        Raises:
            VersionMismatch: another protocol or register-map version.
            ArtifactError: another MacroSpec (the differing fields named).
        """
        name = f"package {str(self.path)!r}" if self.path else "the package"
        for key, label in (("protocol_version", "protocol"), ("regmap_version", "register map")):
            want, got = int(self.manifest[key]), int(getattr(hello, key))
            if want != got:
                raise VersionMismatch(f"{name} was compiled for {label} v{want}, but {where} speaks v{got}; "
                                      "compile it again for this chip")
        if hello.spec != self.spec:
            from cimlab.errmodel import spec_differences

            diff = spec_differences(self.spec, hello.spec, "package", where)
            raise ArtifactError(f"{name} was compiled for another MacroSpec than {where}: {diff}")

    # ---- files ---------------------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the file but the manifest."""
        dt = self.spec.weight_dtype
        out: dict[str, np.ndarray] = {f"page.{p}": img.astype(dt) for p, img in enumerate(self.pages)}
        for name, lp in self.layers.items():
            out[f"layer.{name}.weights"] = lp.weights.astype(np.int64)
            out[f"layer.{name}.scale"] = lp.scale.astype(np.float32)
            out[f"layer.{name}.bias"] = lp.bias.astype(np.float32)
            out[f"layer.{name}.qsum"] = lp.qsum.astype(np.int64)
        for key, a in self.state.items():
            out[f"state.{key}"] = a
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the package atomically (a temporary file renamed over ``path``); returns the path."""
        arrays = self.arrays()
        manifest = {**self.manifest, "format": FORMAT, "version": VERSION, "spec": self.spec.to_dict(),
                    "schedule": self.schedule.to_dict(), "rows_written_per_pass": self.rows_written_per_pass(),
                    "layers": [lp.manifest_entry() for lp in self.layers.values()], "digital": DIGITAL,
                    "arrays_sha256": arrays_sha256(arrays), "created_by": f"cimlab {package_version()}"}
        target = Path(path)
        text = json.dumps(manifest, sort_keys=True)
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.savez(f, manifest=np.array(text), manifest_sha256=np.array(text_sha256(text)), **arrays)
        self.manifest = manifest
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeployPackage:
        """Read and verify a package: format, version, manifest hash and field types, declared array sizes, array
        hash, and that the page images are what the schedule makes of the layers' weights.

        Raises:
            ArtifactError: missing, unreadable, corrupt, or not a cimlab deployment package (naming the field).
        """
        p = Path(path)
        with NpzReader(p, "package", max_file_bytes=MAX_PACKAGE_BYTES) as npz:
            where = npz.where
            manifest = _read_manifest(npz)
            spec = _manifest_spec(where, manifest)
            with manifest_field(where, "schedule"):
                schedule = Schedule.from_dict(spec, manifest["schedule"])
            files = _read_arrays(npz, manifest, spec, schedule)
        if arrays_sha256(files) != manifest["arrays_sha256"]:
            raise ArtifactError(f"{where}: array data do not match the manifest's hash (corrupt or edited file)")
        layers = _layer_params(where, manifest, files)
        if [n for n, _ in schedule.layers] != list(layers):
            raise ArtifactError(f"{where}: the schedule's layers {[n for n, _ in schedule.layers]} are not the "
                                f"manifest's {list(layers)}")
        _check_polarity(where, spec, schedule, layers)
        pages = [files[f"page.{q}"].astype(np.int64) for q in range(max(schedule.n_pages, 1))]
        state = {k[len("state."):]: v for k, v in files.items() if k.startswith("state.")}
        pkg = cls(manifest, spec, schedule, layers, pages, state, p)
        try:
            expected = build_pages(spec, schedule, {n: lp.weights for n, lp in layers.items()})
        except ShapeError as err:
            raise ArtifactError(f"{where}: {err}") from err
        for q, (img, want) in enumerate(zip(pages, expected, strict=True)):
            if img.shape != want.shape or not np.array_equal(img, want):
                raise ArtifactError(f"{where}: page {q}'s image is not what the schedule makes of the layers' "
                                    "weights")
        return pkg


def _read_manifest(npz: NpzReader) -> dict[str, Any]:
    """The manifest, its hash checked, its top-level fields typed."""
    where = npz.where
    if "manifest" not in npz.members:
        raise ArtifactError(f"{where}: no manifest (a 0-d text array named 'manifest'); not a cimlab package")
    text = read_text_member(npz, "manifest", max_chars=MAX_MANIFEST_CHARS)
    stored_hash = read_text_member(npz, "manifest_sha256", max_chars=64)
    manifest = parse_manifest(where, text, stored_hash, "manifest_sha256", fmt=FORMAT, version=VERSION,
                              what="package")
    require_types(where, manifest, MANIFEST_TYPES)
    require_types(where, manifest["model"], {"name": str, "kwargs": dict}, "model.")
    require_types(where, manifest["checkpoint"], {"manifest": dict}, "checkpoint.")
    for i, entry in enumerate(manifest["layers"]):
        require_types(where, entry, LAYER_TYPES, f"layers[{i}].")
        if not isinstance(entry.get("geometry", {}), dict):
            raise ArtifactError(f"{where}: manifest field layers[{i}].geometry must be an object")
    return manifest


def _manifest_spec(where: str, manifest: dict[str, Any]) -> MacroSpec:
    try:
        return MacroSpec.from_dict(manifest["spec"])
    except (ConfigError, TypeError, ValueError, OverflowError) as err:
        raise ArtifactError(f"{where}: manifest spec is not a valid MacroSpec: {err}") from err


def _read_arrays(npz: NpzReader, manifest: dict[str, Any], spec: MacroSpec, schedule: Schedule
                 ) -> dict[str, np.ndarray]:
    """Every array but the manifest; each one's declared size checked against what the manifest says first."""
    expected: dict[str, tuple[int, ...]] = {f"page.{q}": (spec.rows, spec.cols)
                                           for q in range(max(schedule.n_pages, 1))}
    for entry in manifest["layers"]:
        name, k, m = entry["name"], entry["n_rows"], entry["n_cols"]
        if not (0 < k <= 1 << 24 and 0 < m <= 1 << 24):
            raise ArtifactError(f"{npz.where}: manifest field layers[{name!r}] has {k} x {m} weights")
        expected.update({f"layer.{name}.weights": (k, m), f"layer.{name}.scale": (m,),
                         f"layer.{name}.bias": (m,), f"layer.{name}.qsum": (m,)})
    state_bytes = 0
    out: dict[str, np.ndarray] = {}
    for name in npz.names:
        if name in ("manifest", "manifest_sha256"):
            continue
        if name in expected:
            shape = expected[name]

            def expect(dtype: np.dtype, got: tuple[int, ...], shape: tuple[int, ...] = shape) -> str | None:
                ok = dtype.kind in "iuf" and got == shape
                return None if ok else f"is {dtype} {list(got)}, the manifest says numbers of shape {list(shape)}"

            out[name] = npz.read(name, max_bytes=int(np.prod(shape)) * 8 + 4096, expect=expect)
        elif name.startswith("state."):
            state_bytes += npz.declared_bytes(name)
            if state_bytes > MAX_STATE_BYTES:
                raise ArtifactError(f"{npz.where}: the state arrays declare more than {MAX_STATE_BYTES:,} bytes")
            out[name] = npz.read(name, max_bytes=MAX_STATE_BYTES)
        else:
            raise ArtifactError(f"{npz.where}: array {name!r} is not described by the manifest")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ArtifactError(f"{npz.where}: missing array(s) {missing[:4]}")
    return out


def _layer_params(where: str, manifest: dict[str, Any], files: dict[str, np.ndarray]) -> dict[str, LayerParams]:
    layers: dict[str, LayerParams] = {}
    for entry in manifest["layers"]:
        name = entry["name"]
        with manifest_field(where, f"layers[{name!r}]"):
            layers[name] = LayerParams(
                name=name, kind=entry["kind"], weights=files[f"layer.{name}.weights"].astype(np.int64),
                scale=files[f"layer.{name}.scale"], bias=files[f"layer.{name}.bias"],
                qsum=files[f"layer.{name}.qsum"].astype(np.int64), lo=float(entry["lo"]), hi=float(entry["hi"]),
                delta=float(entry["delta"]), polarity=entry["polarity"],
                geometry=dict(entry.get("geometry", {})),
            )
    return layers


def _check_polarity(where: str, spec: MacroSpec, schedule: Schedule, layers: dict[str, LayerParams]) -> None:
    """ArtifactError for an unknown polarity, or a layer placed against it: on a unipolar macro a bipolar layer's tiles
    are all paired and a unipolar layer's none."""
    for name, lm in schedule.layers:
        pol = layers[name].polarity
        if pol not in POLARITIES:
            raise ArtifactError(f"{where}: layer {name!r} has polarity {pol!r}, not one of {', '.join(POLARITIES)}")
        want = spec.weight_storage == "unsigned" and pol == "bipolar"
        if any(t.paired != want for t in lm.tiles):
            raise ArtifactError(f"{where}: layer {name!r} is {pol} but its tiles are placed "
                                f"{'off' if want else 'on'} column pairs")


def build_pages(spec: MacroSpec, schedule: Schedule, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The weight image [rows, cols] (int64) of every page as the chip holds it: each tile's block of its layer's
    weights [K, M] at its place, its logical columns on the schedule's chip columns, 0 elsewhere.

    Raises:
        ShapeError: a layer's weights of the wrong shape or outside the spec's weight range.
    """
    pages = [np.zeros((spec.rows, spec.cols), dtype=np.int64) for _ in range(max(schedule.n_pages, 1))]
    for name, lm in schedule.layers:
        w = np.asarray(weights[name])
        if w.shape != (lm.n_rows, lm.n_cols):
            raise ShapeError(f"layer {name!r}: weights have shape {list(w.shape)}, expected "
                             f"{[lm.n_rows, lm.n_cols]}")
        paired = any(t.paired for t in lm.tiles)  # signed weights, each stored as a pair of magnitudes
        lo = -spec.weight_max if paired else spec.weight_min
        if w.size and (int(w.min()) < lo or int(w.max()) > spec.weight_max):
            raise ShapeError(f"layer {name!r}: weights span {int(w.min())}..{int(w.max())}, outside "
                             f"{lo}..{spec.weight_max}")
        for t in lm.tiles:
            rows = slice(t.macro_row, t.macro_row + t.n_rows)
            pages[t.page][rows, t.macro_col : t.macro_col + t.macro_cols] = t.split_pairs(t.weights(w))
    if schedule.column_order is None:
        return pages
    chip_cols = schedule.chip_columns()
    placed = []
    for img in pages:
        on_chip = np.zeros_like(img)
        on_chip[:, chip_cols] = img
        placed.append(on_chip)
    return placed


__all__ = ["DIGITAL", "FORMAT", "VERSION", "DeployPackage", "LayerParams", "arrays_sha256", "build_pages"]

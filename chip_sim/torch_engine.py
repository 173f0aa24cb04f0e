"""The twin's fast path with torch on a GPU (``device="cuda"``, ``sim://?device=cuda``): the same codes as the CPU.

Each chunk of vectors is computed on the device in the order ``Converter.convert`` defines:

- partial sums: the input slices times the compute weights, a batched matmul over row groups in float64 (exact
  for these integers whatever the summation order, and untouched by TF32 or other reduced-precision settings),
  then cast to float32, exact below 2**24;
- analytic converter: ``sums * scale``, ``+ shift``, ``+ noise[item]``, each a separate correctly rounded float32
  operation (no fused multiply-add), truncation to an integer, clamp and the ADC look-up table;
- data-driven converter: the error model's inverse-CDF draw (most likely code, its neighbours, else a search of
  the row's 32-bit bounds), integer arithmetic only;
- random items: the PCG64 words of ``VectorStream`` for the chunk's vectors, drawn on the host's cores by
  ``cimlab.chip_sim.kernels.pcg_fill_vectors`` and copied to the device.

This module imports torch; ``cimlab.chip_sim.fastpath.make_engine`` imports it only for a GPU device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cimlab.chip_sim.analog import FusedConversion
from cimlab.chip_sim.fastpath import default_threads, run_parts, sampler_tables
from cimlab.firmware_bridge.errors import BackendUnavailable
from cimlab.firmware_bridge.spec import MacroSpec

CHUNK_CONVERSIONS = 1 << 24
"""Conversions per chunk on the device (its temporaries: about 50 bytes a conversion)."""


class TorchEngine:
    """The fast path's operations as torch tensor operations on ``device`` (see the module docstring).

    Args:
        spec: the macro.
        device: a torch device string (``"cuda"``, ``"cuda:1"``; ``"cpu"`` runs the same operations on the host,
            which the tests use to compare them with numpy's).

    Raises:
        BackendUnavailable: the device does not exist in this torch build or machine.
    """

    def __init__(self, spec: MacroSpec, device: str) -> None:
        self.spec = spec
        try:
            self.device = torch.device(device)
            torch.zeros(1, device=self.device)
        except (RuntimeError, AssertionError) as err:
            raise BackendUnavailable(f"device={device!r} is not usable with this torch: {err}") from err
        self._weights: torch.Tensor | None = None
        self._rowsum: torch.Tensor | None = None
        self._tables: dict[int, tuple[object, torch.Tensor]] = {}
        self._sampler: tuple[object, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def weights_changed(self, row0: int, n_rows: int) -> None:
        self._weights = None  # copied to the device again at the next MAC

    def _put(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _on_device(self, a: np.ndarray, make=None) -> torch.Tensor:  # noqa: ANN001
        """The device copy of a converter table ``a`` (of ``make(a)`` when given), kept while ``a`` is the same
        object: the converter replaces its tables when conditions change."""
        hit = self._tables.get(id(a))
        if hit is None or hit[0] is not a:
            if len(self._tables) > 32:
                self._tables.clear()
            hit = (a, self._put(make(a) if make is not None else a))
            self._tables[id(a)] = hit
        return hit[1]

    def mac(self, x: np.ndarray, row_start: int, g0: int, g1: int, weights: np.ndarray, rowsum: np.ndarray,
            op: FusedConversion, rng_state: np.ndarray | None, first_vector: int, *, raw: bool,
            stages: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See ``cimlab.chip_sim.fastpath.Engine.mac`` (``stages`` is accepted for the same signature; the GPU
        always runs them all)."""
        from cimlab.chip_sim import kernels

        spec = self.spec
        if self._weights is None:
            self._weights = self._put(weights.astype(np.float64))
            self._rowsum = self._put(rowsum)
        n = x.shape[0]
        P, J = spec.n_planes, spec.physical_cols
        per_vector = P * (g1 - g0) * J
        chunk = max(1, CHUNK_CONVERSIONS // per_vector)
        item_bytes = op.item_bytes if rng_state is not None else 0
        words = math.ceil(spec.conversions_per_vector * item_bytes / 8)
        outs, tallies = [], []
        for b0 in range(0, n, chunk):
            xb = x[b0 : b0 + chunk]
            items = None
            if item_bytes:
                buf = np.empty((xb.shape[0], words), dtype=np.uint64)
                threads = min(default_threads(), buf.shape[0])
                rows = -(-buf.shape[0] // threads)

                def draw(i: int, buf: np.ndarray = buf, rows: int = rows, b0: int = b0) -> None:
                    kernels.pcg_fill_vectors(buf[i * rows : (i + 1) * rows], rng_state, first_vector + b0 + i * rows)

                run_parts(draw, threads)  # the host draws the PCG64 words, the cores sharing the vectors
                items = self._items(buf, item_bytes, g0, g1)
            sums, tally = self._sums(xb, row_start, g0, g1)
            codes = self._analytic(sums, items, op) if op.kind == "analytic" else self._sampled(sums, items, op)
            outs.append(self._out(codes, raw))
            tallies.append(tally)
        return np.concatenate(outs), np.concatenate(tallies)

    def _items(self, words: np.ndarray, item_bytes: int, g0: int, g1: int) -> torch.Tensor:
        """The chunk's random items of the spanned groups [n, P, Gs, J] (int64, unsigned values)."""
        spec = self.spec
        view = np.int16 if item_bytes == 2 else np.int32
        raw = words.view(view)[:, : spec.conversions_per_vector]
        t = self._put(raw).to(torch.int64) & ((1 << (8 * item_bytes)) - 1)
        return t.reshape(-1, spec.n_planes, spec.n_groups, spec.physical_cols)[:, :, g0:g1]

    def _sums(self, x: np.ndarray, row_start: int, g0: int, g1: int) -> tuple[torch.Tensor, np.ndarray]:
        """Partial sums [Gs, n, P, J] float32 and per vector [level sum, word-line pulses]."""
        spec = self.spec
        R, P, sb = spec.rows_per_conversion, spec.n_planes, spec.input_slice_bits
        n, gs = x.shape[0], g1 - g0
        full = torch.zeros((n, gs * R), dtype=torch.int64, device=self.device)
        first = row_start - g0 * R
        full[:, first : first + x.shape[1]] = self._put(x.astype(np.int64))
        shifts = torch.arange(P, device=self.device, dtype=torch.int64) * sb
        planes = (full[:, None, :] >> shifts[None, :, None]) & spec.slice_max  # [n, P, Gs * R]
        rowsum = self._rowsum[g0 * R : g1 * R]
        tally = torch.stack([(planes * rowsum).sum(dim=(1, 2)), (planes != 0).sum(dim=(1, 2))], dim=1)
        xg = planes.to(torch.float64).reshape(n * P, gs, R).permute(1, 0, 2)  # [Gs, n*P, R]
        sums = torch.bmm(xg, self._weights[g0:g1]).to(torch.float32)  # exact integers below 2**24
        return sums.reshape(gs, n, P, -1), tally.cpu().numpy()

    def _analytic(self, sums: torch.Tensor, items: torch.Tensor | None, op: FusedConversion) -> torch.Tensor:
        lut = self._on_device(op.lut, lambda a: a.astype(np.int64))
        t = sums * self._on_device(op.scale)
        t = t + self._on_device(op.shift)
        if op.noise is not None and items is not None:
            t = t + self._on_device(op.noise)[items.permute(2, 0, 1, 3)]
        k = t.to(torch.int64).clamp_(0, lut.numel() - 1)  # truncation toward zero, as numpy's astype
        return lut[k]

    def _sampled(self, sums: torch.Tensor, items: torch.Tensor | None, op: FusedConversion) -> torch.Tensor:
        sampler = op.sampler
        if self._sampler is None or self._sampler[0] is not sampler:
            mode, interval, nearby = sampler_tables(sampler)
            self._sampler = (sampler, self._put(mode), self._put(interval.view(np.int64)),
                             self._put(nearby.view(np.int64)), self._put(sampler.bounds))
        _, mode, interval, nearby, bounds = self._sampler
        J, width = self.spec.physical_cols, sampler.width
        row = sums.to(torch.int64) * J + torch.arange(J, device=self.device)
        u = items.permute(2, 0, 1, 3)
        low = 0xFFFFFFFF
        iv, nb = interval[row], nearby[row]
        m = mode[row].to(torch.int64)
        below = u < (iv & low)
        above = u > ((iv >> 32) & low)
        far = (below & (m >= 2) & ((nb & low) > u)) | (above & (((nb >> 32) & low) < u))
        codes = m - below.to(torch.int64) + above.to(torch.int64)
        if bool(far.any()):
            rows = row[far]
            table = bounds.reshape(-1, width)[rows]
            codes[far] = torch.searchsorted(table, u[far][:, None], right=True)[:, 0]
        return codes

    def _out(self, codes: torch.Tensor, raw: bool) -> np.ndarray:
        """Codes [Gs, n, P, J] -> MAC_RAW codes [n, P, Gs, J], or slice-weighted column sums [n, J] int64."""
        spec = self.spec
        if raw:
            return codes.permute(1, 2, 0, 3).to(torch.int32).cpu().numpy().astype(spec.code_dtype)
        shifts = torch.arange(spec.n_planes, device=self.device, dtype=torch.int64) * spec.input_slice_bits
        return (codes.sum(dim=0) << shifts[None, :, None]).sum(dim=1).cpu().numpy()

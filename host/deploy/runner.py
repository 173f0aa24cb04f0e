"""The network of a package on the chip, and the same network on the host (imports torch).

``build_model`` rebuilds the network from a package as ``cimlab evaluate`` rebuilds it from its checkpoint
(``cimlab.training.api.model_from_checkpoint``), checks that every CIM layer quantizes to the package's weights, and
gives each CIM layer the package's tile placement (``cimlab.training.macro.LayerMacro`` honours ``macro_row`` /
``macro_col``, so an error model with per-column tables sees the columns the chip uses).

``attach_chip`` then swaps each CIM layer's macro for a ``ChipMacro``: the layer runs its own forward pass (E-PACT
input quantization, im2col for convolutions, the digital recombination with scales, bounds and offsets, bias),
and only the integer MACs go to the chip, tile by tile, each tile's input codes in one windowed stream
(``Chip.mac``), pages switched by a ``cimlab.deploy.program.PageLoader``. Batch norm, activations and pooling are the
model's own torch modules on the host. So the chip path computes exactly what the host's ideal path computes, with
the chip's MAC outputs in place of the ideal ones: on an ideal macro the two agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.deploy.package import DeployPackage
from cimlab.deploy.program import PageLoader
from cimlab.driver import Chip
from cimlab.mapping import LayerMap
from cimlab.training.api import model_from_checkpoint
from cimlab.training.checkpoint import Checkpoint
from cimlab.training.layers import CIMLayer, cim_layers, reseed
from cimlab.training.macro import LayerMacro
from cimlab.training.transfer import ColumnDecoder, ColumnTrim, Transfer


def build_model(pkg: DeployPackage, transfer: Transfer | None = None) -> nn.Module:
    """The package's network on the host (eval mode), CIM layers at the package's placement with ``transfer``
    (the chip's columns, default: the ideal ADC; a placed schedule's logical columns see their chip columns).

    Raises:
        ArtifactError: the package's tensors do not rebuild its model, or a layer quantizes to other weights than
            the package holds.
    """
    ck_manifest = pkg.manifest["checkpoint"]["manifest"]
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in pkg.state.items()}
    ck = Checkpoint(tensors, ck_manifest, pkg.path if pkg.path is not None else Path("<package in memory>"))
    model = model_from_checkpoint(ck)
    layers = list(cim_layers(model))
    names = [n for n, _ in layers]
    if names != list(pkg.layers):
        raise ArtifactError(f"the package's model has CIM layers {names}, its manifest lists {list(pkg.layers)}")
    spec = pkg.spec
    transfer = placed_transfer(pkg, transfer or Transfer.ideal(spec))
    for name, layer in layers:
        if layer.spec != spec:
            raise ArtifactError(f"layer {name!r} is built for another MacroSpec than the package's")
        want = pkg.layers[name].weights
        got = programmed_weights(layer)
        if got.shape != want.shape or not np.array_equal(got, want):
            raise ArtifactError(f"layer {name!r} quantizes to other weights than package {str(pkg.path)!r} holds "
                                "(the package's tensors and weights disagree)")
        if any(t.paired != layer.paired for t in pkg.schedule.layer_map(name).tiles):
            raise ArtifactError(f"layer {name!r} is {layer.polarity}, but package {str(pkg.path)!r} places it "
                                f"{'off' if layer.paired else 'on'} column pairs")
        layer.macro = LayerMacro(pkg.schedule.layer_map(name), transfer,
                                 chunk_conversions=layer.macro.chunk_conversions)
    reseed(model, 0)
    model.eval()
    return model


def placed_transfer(pkg: DeployPackage, transfer: Transfer) -> Transfer:
    """``transfer`` (the chip's physical columns) as the package's layers see it: a placed schedule's logical
    columns behave as their chip columns."""
    if pkg.schedule.column_order is None:
        return transfer
    return transfer.permuted(pkg.schedule.physical_order())


def programmed_weights(layer: CIMLayer) -> np.ndarray:
    """The logical weights [K, M] (int64) a CIM layer programs: its quantized weights (signed for a layer on column
    pairs, which the tiles split)."""
    with torch.no_grad():
        q, _ = layer.quantized_weights()
        return torch.round(q).T.to(torch.int64).numpy()


class ChipMacro(LayerMacro):
    """A layer's macro whose MACs run on the chip (inference only; see the module docstring)."""

    def __init__(self, layer_map: LayerMap, runner: ChipRunner, name: str, weights: np.ndarray,
                 trim: ColumnTrim | ColumnDecoder | None = None) -> None:
        decoder = column_decoder(trim, layer_map.spec)
        super().__init__(layer_map, Transfer.ideal(layer_map.spec).decoded(decoder))
        self.runner = runner
        self.name = name
        self.weights = torch.from_numpy(np.asarray(weights, dtype=np.int64))
        self.decoder = decoder

    @property
    def fast_exact(self) -> bool:
        """Never: every MAC goes to the chip."""
        return False

    def reads_images(self, x: torch.Tensor) -> bool:
        """Never: the chip takes the im2col matrix."""
        return False

    def mac_values(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """MAC outputs [N, M] from the chip for input codes x [N, K]; q must be the weights the chip holds."""
        if q.shape != self.weights.shape or not torch.equal(torch.round(q).to(torch.int64), self.weights):
            raise ArtifactError(f"layer {self.name!r} asks for other weights than the chip was programmed with")
        return self.runner.layer_mac(self.name, self.layer_map, x, self.decoder)

    def backward_values(self, x: torch.Tensor, q: torch.Tensor,
                        grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Not available: the chip path is for inference."""
        raise ConfigError("the chip path has no gradients: train on the host (cimlab train)")


class ChipRunner:
    """Runs the MACs of the package's layers on a chip and counts what it sent.

    Attributes:
        chip: the chip.
        loader: switches pages.
        vectors: MAC vectors sent.
        calls: ``Chip.mac`` calls (one per tile per layer call).
        on_call: called after each ``Chip.mac`` call (a progress bar), or None.
    """

    def __init__(self, chip: Chip, pkg: DeployPackage, loader: PageLoader) -> None:
        self.chip = chip
        self.pkg = pkg
        self.loader = loader
        self.vectors = 0
        self.calls = 0
        self.on_call: Callable[[], None] | None = None

    def layer_mac(self, name: str, lm: LayerMap, x: torch.Tensor,
                  decoder: ColumnDecoder | None = None) -> torch.Tensor:
        """The layer's MAC outputs [N, M] (float64): each tile's rows driven on the chip, its columns read (a paired
        tile's two columns per output subtracted), tiles of one column range added. With a ``decoder`` the chip
        returns its raw codes (MAC_RAW) and the host recombines each physical column's decoded values
        (``cimlab.training.transfer.ColumnDecoder``: a trim's line, or a table)."""
        codes = torch.round(x).to(torch.int64).numpy()
        out = np.zeros((codes.shape[0], lm.n_cols), dtype=np.float64 if decoder is not None else np.int64)
        chip_cols = self.pkg.schedule.chip_columns()
        for t in sorted(lm.tiles, key=lambda t: t.page):
            self.loader.ensure(t.page)
            xt = codes[:, t.row0 : t.row1]
            cols = chip_cols[t.macro_col : t.macro_col + t.macro_cols]
            if decoder is None:
                y = self.chip.mac(xt, row_start=t.macro_row)[:, cols]
            else:
                y = self._decoded_mac(xt, t.macro_row, cols, decoder)
            out[:, t.col0 : t.col1] += t.join_pairs(y)
            self.vectors += codes.shape[0]
            self.calls += 1
            if self.on_call is not None:
                self.on_call()
        return torch.from_numpy(out).to(torch.float64)

    def _decoded_mac(self, x: np.ndarray, row_start: int, cols: np.ndarray, decoder: ColumnDecoder) -> np.ndarray:
        """One tile's outputs [n, len(cols)] from the raw codes of its chip columns ``cols``, each physical column's
        codes decoded, recombined as ``MacroSpec.recombine`` does."""
        spec = self.chip.spec
        raw = self.chip.mac_raw(x, row_start=row_start)  # [n, P, G, S, cols]
        j = np.arange(spec.n_slices)[:, None] * spec.cols + cols[None, :]  # [S, tile columns]
        decoded = decoder.table[j, raw[..., cols].astype(np.int64)]
        acc = np.einsum("npgkc,p,k->nc", decoded, spec.plane_weights(), spec.slice_weights())
        acc = acc * (spec.adc_full_scale / spec.adc_max)
        if spec.weight_offset:
            acc -= spec.weight_offset * x.sum(axis=1, keepdims=True)
        return acc


def column_decoder(step: ColumnTrim | ColumnDecoder | None, spec: MacroSpec) -> ColumnDecoder | None:
    """The per-column decoder of a deploy step: a trim's line decoder, a decoder as it is, or None."""
    if step is None or isinstance(step, ColumnDecoder):
        decoder = step
    else:
        decoder = step.decoder(spec)
    if decoder is not None and decoder.table.shape != (spec.physical_cols, spec.n_codes):
        raise ConfigError(f"the trim or decoder has {decoder.table.shape[0]} physical columns and "
                          f"{decoder.table.shape[1]} codes; this macro has {spec.physical_cols} and {spec.n_codes} "
                          f"({spec.describe()})")
    return decoder


def attach_chip(model: nn.Module, pkg: DeployPackage, chip: Chip, loader: PageLoader,
                trim: ColumnTrim | ColumnDecoder | None = None) -> ChipRunner:
    """Give every CIM layer of ``model`` (from ``build_model``) a ``ChipMacro`` (reading raw codes and decoding
    them per physical column when a trim or decoder is given); returns the runner."""
    runner = ChipRunner(chip, pkg, loader)
    for name, layer in cim_layers(model):
        layer.macro = ChipMacro(pkg.schedule.layer_map(name), runner, name, pkg.layers[name].weights, trim)
    return runner


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
            advance: Any = None) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for inputs ``x``, ``batch_size`` samples at a time; ``advance(n)`` after
    each batch (a progress bar)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    model.eval()
    outs = []
    for b0 in range(0, x.shape[0], batch_size):
        xb = x[b0 : b0 + batch_size]
        outs.append(model(xb))
        if advance is not None:
            advance(xb.shape[0])
    return torch.cat(outs)


__all__ = ["ChipMacro", "ChipRunner", "attach_chip", "build_model", "placed_transfer", "predict",
           "programmed_weights"]

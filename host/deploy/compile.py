"""``cimlab compile``: a trained checkpoint becomes a deployment package (imports torch).

The network is rebuilt from the checkpoint exactly as ``cimlab evaluate`` rebuilds it
(``cimlab.training.api.model_from_checkpoint``); each CIM layer's quantized weights, scales, E-PACT bounds and
digital offsets are read from the layer itself (``quantized_weights``, ``act``), so the package holds what training
computed with. The tiles of ``cimlab.mapping`` are placed by ``cimlab.deploy.schedule.plan``, each layer by its
polarity: on a unipolar (``unsigned``) macro a bipolar layer's tiles go on column pairs (``plan(paired=...)``), placed
and programmed as one unit, and a unipolar layer's on one array as magnitudes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.errors import ArtifactError
from cimlab.firmware_bridge.frame import PROTOCOL_VERSION
from cimlab.firmware_bridge.registers import REGMAP_VERSION
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.deploy.package import DeployPackage, LayerParams, build_pages
from cimlab.deploy.placement import place_on_chip
from cimlab.deploy.schedule import plan
from cimlab.training.api import model_from_checkpoint
from cimlab.training.checkpoint import load_checkpoint
from cimlab.training.layers import CIMConv1d, CIMConv2d, CIMLayer, CIMLinear, cim_layers
from cimlab.training.transfer import file_sha256


def layer_params(name: str, layer: CIMLayer) -> LayerParams:
    """The host-side numbers of one CIM layer, as it computes them (see ``cimlab.deploy.package``)."""
    with torch.no_grad():
        q, scale = layer.quantized_weights()  # q [M, K] as programmed, scale [M] (negative for negated layers)
        q = torch.round(q)
        weights = q.T.to(torch.int64).numpy()
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(q.shape[0])
        lo = float(layer.act.lo.detach())
        hi = float(layer.act.hi.detach())
        delta = float(layer.act.step())
    if isinstance(layer, CIMLinear):
        kind = "linear"
        geometry: dict[str, Any] = {"in_features": layer.in_features, "out_features": layer.out_features}
    elif isinstance(layer, CIMConv1d | CIMConv2d):
        kind = "conv1d" if isinstance(layer, CIMConv1d) else "conv2d"
        geometry = {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                    "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                    "pads": [list(p) for p in layer.pads], "dilation": list(layer.dilation)}
    else:
        raise ArtifactError(f"layer {name!r} is a {type(layer).__name__}, which deploy does not know")
    return LayerParams(
        name=name, kind=kind, weights=weights, scale=scale.detach().to(torch.float32).numpy().copy(),
        bias=bias.to(torch.float32).numpy().copy(), qsum=q.sum(dim=1).to(torch.int64).numpy(), lo=lo, hi=hi,
        delta=delta, polarity=layer.polarity, geometry=geometry,
    )


def compile_checkpoint(checkpoint: str | os.PathLike, *, spec: MacroSpec | None = None, spec_source: str = "",
                       hello: Any = None, pack: str = "rows", place_on: str | os.PathLike | None = None
                       ) -> DeployPackage:
    """Compile a ``quant`` or ``dnat`` checkpoint into a package (not yet saved: call ``save``).

    Args:
        checkpoint: the checkpoint file.
        spec: the target macro (from a chip or a twin profile); the checkpoint must be for it. None: the
            checkpoint's own MacroSpec.
        spec_source: how to name ``spec``'s origin in messages and in the manifest.
        hello: the chip's ``cimlab.driver.Hello`` when compiling against a connected chip (its protocol and
            register-map versions and chip id go into the manifest); None: this host's versions.
        pack: how tiles share macro loads: ``rows``, ``full`` or ``none`` (``cimlab.deploy.schedule``).
        place_on: an error model file of the target die (a short ``cimlab characterize``): its columns are placed
            where that die converts best (``cimlab.deploy.placement``); for a network trained on a population of
            dies. None: training's columns.

    Raises:
        ArtifactError: unreadable or corrupt checkpoint or error model, a float model, or one for another
            MacroSpec.
        ConfigError: ``place_on`` characterizes another MacroSpec.
    """
    ck = load_checkpoint(checkpoint, spec=spec, spec_source=spec_source or "the target")
    target = ck.spec
    if target is None:
        raise ArtifactError(f"checkpoint {str(checkpoint)!r} is a float model: it has no quantized weights to "
                            "program; train it with --mode quant or dnat first")
    model = model_from_checkpoint(ck)
    layers = {name: layer_params(name, layer) for name, layer in cim_layers(model)}
    if not layers:
        raise ArtifactError(f"checkpoint {str(checkpoint)!r} has no CIM layers")
    paired = {name for name, layer in cim_layers(model) if layer.paired}
    schedule = plan(target, [(n, lp.weights.shape[0], lp.weights.shape[1]) for n, lp in layers.items()], pack=pack,
                    paired=paired)
    if place_on is not None:
        schedule = place_on_chip(schedule, ErrorModel.load(place_on))
    pages = build_pages(target, schedule, {n: lp.weights for n, lp in layers.items()})
    state = {}
    for key, t in ck.tensors.items():
        try:
            state[key] = t.detach().cpu().contiguous().numpy().copy()
        except TypeError as err:  # a dtype numpy lacks (bfloat16)
            raise ArtifactError(f"checkpoint tensor {key!r} has dtype {t.dtype}, which the package cannot "
                                "hold") from err
    m = ck.manifest
    manifest = {
        "protocol_version": int(hello.protocol_version) if hello is not None else PROTOCOL_VERSION,
        "regmap_version": int(hello.regmap_version) if hello is not None else REGMAP_VERSION,
        "target": {"source": spec_source or f"checkpoint {str(checkpoint)!r}",
                   "chip_id": hello.chip_id if hello is not None else None},
        "task": m["task"], "model": m["model"], "mode": m["mode"], "quantizer": m.get("quantizer"),
        "quant": m.get("quant", "per-layer"),
        "checkpoint": {"path": str(Path(checkpoint)), "sha256": file_sha256(checkpoint),
                       "tensors_sha256": m["tensors_sha256"], "manifest": m},
        "error_model": m.get("error_model"),
        "placed_on": None if place_on is None else {"path": str(Path(place_on)), "sha256": file_sha256(place_on)},
    }
    return DeployPackage(manifest, target, schedule, layers, pages, state)


__all__ = ["compile_checkpoint", "layer_params"]

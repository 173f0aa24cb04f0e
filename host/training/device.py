"""Where training computes: ``--device cpu|cuda|cuda:N`` checked against the machine, and a model moved there whole.

A CIM layer's arithmetic lives partly outside its parameters: each layer's ``LayerMacro`` holds the transfer's
sampling tables (guide, slope), its tile plans and its random stream. ``to_device`` moves all of it, so on a GPU the
layers' torch path (``cimlab.training.macro``: sampling and gradient; the C kernels are for the CPU) runs there, and
the counter-based uniforms of the sampled codes are computed there from a seed per tile and call drawn on the device
(``stream="device"``: a torch Philox generator per layer) unless ``stream="pcg64"`` asks for the CPU's PCG64 stream's
seeds (the same codes as a CPU run, bit for bit).

The CIM layers count on float32 integer sums being exact (below 2**24): on a GPU, TF32 (on by default for cuDNN
convolutions) would round them, so ``to_device`` turns TF32 off for matmuls and convolutions.
"""

from __future__ import annotations

import torch
from torch import nn

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.training.layers import cim_layers


def cuda_missing_reason() -> str | None:
    """Why this process cannot use a CUDA GPU (None: it can)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU on this machine"
    return None


def resolve_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """The torch device for ``--device NAME`` (``cpu``, ``cuda`` or ``cuda:N``), checked against the machine.

    ``local_rank``: this process's rank on its node in a distributed run; ``cuda`` then means ``cuda:LOCAL_RANK``
    (one GPU per process, as torchrun arranges), and an explicit index is refused.

    Raises:
        ConfigError (code ``device``): an unknown device, no usable GPU, or an index the machine does not have.
    """
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {name!r} is not a device: give cpu, cuda or cuda:N", code="device") from err
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"--device {name!r}: training runs on cpu or cuda[:N], not {dev.type}", code="device")
    missing = cuda_missing_reason()
    if missing is not None:
        raise ConfigError(f"--device {name}: {missing}; train with --device cpu (the default)", code="device")
    if local_rank is not None:
        if dev.index is not None:
            raise ConfigError(f"--device {name}: in a distributed run each process takes cuda:LOCAL_RANK; give "
                              "--device cuda", code="device")
        dev = torch.device("cuda", local_rank)
    index = 0 if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {name}: GPU {index} asked for, this machine has {count}", code="device")
    return torch.device("cuda", index)


def exact_float32() -> None:
    """Full float32 precision in CUDA matmuls and convolutions (TF32 off): the CIM layers' integer sums in float32
    are exact only then."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def default_stream(device: torch.device) -> str:
    """The random stream a device draws its codes' uniforms from: ``pcg64`` on the CPU, ``device`` elsewhere."""
    return "pcg64" if device.type == "cpu" else "device"


def to_device(model: nn.Module, device: torch.device | str, *, stream: str | None = None) -> nn.Module:
    """Move ``model`` (parameters, buffers, and every CIM layer's tables, plans and corrections) to ``device``, in
    place; returns it. ``stream`` (``pcg64`` or ``device``; default ``default_stream``) is the kind of random stream
    each CIM layer makes at its next ``reseed`` (training and evaluation reseed at their start)."""
    device = torch.device(device)
    stream = stream or default_stream(device)
    model.to(device)
    for _, layer in cim_layers(model):
        layer.macro.to(device, stream=stream)
    if device.type == "cuda":
        exact_float32()
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


__all__ = ["cuda_missing_reason", "default_stream", "exact_float32", "model_device", "resolve_device", "to_device"]

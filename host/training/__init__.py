"""D-NAT: training networks through the measured MAC error model of a CIM macro (imports torch).

::

    transfer.py    Transfer: ideal / measured (per column or pooled) / gaussian ADC transfer as sampling tables;
                   ColumnDecoder, ColumnTrim: each physical column's codes decoded on the host (deploy step)
    macro.py       LayerMacro, macro_matmul: conversions (C kernels, or torch in chunks), codes drawn, decoded,
                   recombined; statistical gradient; ColumnCorrection (per-output deploy step)
    native.py      builds and loads the C kernels (cim_kernels.c)
    quant.py       InputQuantizer (E-PACT), weight levels by storage and polarity, UniformRanges (one weight and one
                   input range for every layer)
    layers.py      CIMLinear, CIMConv1d, CIMConv2d, convert (per-layer or uniform ranges, a polarity per layer),
                   calibrate, calibrate_columns, project_polarity, set_transfer, reseed
    models.py      digits_mlp, digits_cnn, har_cnn, resnet20, vgg8; build_model
    tasks.py       load_task: digits, har, cifar10 (offline)
    loop.py        fit (one chip or a population of chips), accuracy, accuracy_draws, time_steps
    device.py      resolve_device (--device cpu|cuda[:N]), to_device: the model, tables and kernels on a GPU
    distributed.py Replicas, launch: DistributedDataParallel (cimlab train --ddp N, or under torchrun)
    checkpoint.py  save_checkpoint, load_checkpoint (safetensors + JSON manifest)
    api.py         train_run, evaluate_run (behind ``cimlab train`` / ``cimlab evaluate``)

How layers are cut into macro tiles is ``cimlab.mapping`` (shared with deploy). Import this package only where torch
is wanted; ``cimlab info`` never does.
"""

from cimlab.training.layers import (
    CIMConv1d,
    CIMConv2d,
    CIMLayer,
    CIMLinear,
    calibrate,
    calibrate_columns,
    cim_layers,
    convert,
    project_polarity,
    reseed,
    set_learn,
    set_transfer,
)
from cimlab.training.macro import ColumnCorrection, LayerMacro, macro_matmul
from cimlab.training.quant import InputQuantizer, UniformRanges
from cimlab.training.transfer import ColumnDecoder, ColumnTrim, Transfer

__all__ = [
    "CIMConv1d",
    "CIMConv2d",
    "CIMLayer",
    "CIMLinear",
    "ColumnCorrection",
    "ColumnDecoder",
    "ColumnTrim",
    "InputQuantizer",
    "LayerMacro",
    "Transfer",
    "UniformRanges",
    "calibrate",
    "calibrate_columns",
    "cim_layers",
    "convert",
    "macro_matmul",
    "project_polarity",
    "reseed",
    "set_learn",
    "set_transfer",
]

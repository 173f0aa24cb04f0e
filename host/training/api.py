"""The train and evaluate workflows behind ``cimlab train`` / ``cimlab evaluate`` and the D-NAT study.

- ``float``: the plain torch model.
- ``quant``: the model on the macro with the *ideal* ADC transfer (the ideal quantized model, the paper's upper
  bound); started from a float checkpoint when one is given (``init``), with the E-PACT bounds calibrated.
- ``dnat``: the model on the macro with codes drawn from the measured error model and the statistical gradient;
  normally fine-tuned from a ``quant`` checkpoint.

The MacroSpec comes from the error model's meta, a chip (``link``), a twin profile, or the ``init`` checkpoint;
never from constants, and all given sources must agree.

On the macro a network is quantized ``per-layer`` or ``uniform`` (one weight and one input range for every layer,
``cimlab.training.quant``), and each layer has a polarity (``bipolar``, ``unipolar-pos``, ``unipolar-neg``), trained
by projected gradient descent; ``polarity="search"`` picks each layer's polarity with ``cimlab.polarity``'s
evolutionary search on the float model given as ``init`` before the quant training starts from the searched
candidate. Both go into the checkpoint's manifest, which compile reads to place the layers.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cimlab.training.layers import (
    calibrate,
    calibrate_columns,
    cim_layers,
    clear_columns,
    convert,
    model_polarity,
    model_quant,
    model_spec,
    set_learn,
    set_transfer,
)
from cimlab.training.loop import TrainConfig, accuracy, fit, progress_bar
from cimlab.training.models import DEFAULT_MODEL, build_model
from cimlab.training.quant import LEARN, QUANT_SCHEMES
from cimlab.training.resume import EpochCheckpoint, resume_path
from cimlab.training.tasks import TaskData, load_task
from cimlab.training.transfer import ColumnDecoder, Transfer, check_spec

if TYPE_CHECKING:
    from cimlab.training.distributed import Replicas

MODES = ("float", "quant", "dnat")
POLARITY_CHOICES = ("bipolar", "unipolar-pos", "unipolar-neg", "search")
"""``--polarity``: one polarity for every layer, or the evolutionary search per layer."""
CALIBRATION_SAMPLES = 512
"""Training samples used to calibrate the E-PACT bounds when a model is first put on the macro."""


def task_model_kwargs(data: TaskData) -> dict[str, Any]:
    """Model arguments that follow from the task's data (classes, input channels)."""
    kwargs: dict[str, Any] = {"n_classes": data.n_classes}
    shape = data.input_shape
    if data.name == "digits":
        return kwargs
    kwargs["in_channels"] = int(shape[0])
    return kwargs


@dataclass
class SpecSource:
    """A MacroSpec and where it came from."""

    spec: MacroSpec
    source: str


def resolve_spec(*, error_model: str | os.PathLike | None = None, link: str | None = None,
                 profile: str | None = None, init: Checkpoint | None = None,
                 timeout: float = 1.0) -> SpecSource | None:
    """The MacroSpec from every source given (error model meta, chip at ``link``, twin ``profile``, checkpoint);
    ArtifactError when two disagree, None when none is given."""
    found: list[SpecSource] = []
    if error_model is not None:
        from cimlab.firmware_bridge.errmodel import ErrorModel

        found.append(SpecSource(ErrorModel.load(error_model).spec, f"error model {str(error_model)!r}"))
    if link is not None:
        from cimlab.driver import Chip

        with Chip.open(link, timeout=timeout) as chip:
            found.append(SpecSource(chip.spec, f"the chip at {link}"))
    if profile is not None:
        # through the sim:// link, the one way host reaches the twin
        from urllib.parse import quote

        from cimlab.driver import Chip

        with Chip.open(f"sim://?profile={quote(str(profile), safe='')}", timeout=timeout) as chip:
            found.append(SpecSource(chip.spec, f"twin profile {profile!r}"))
    if init is not None and init.spec is not None:
        found.append(SpecSource(init.spec, f"checkpoint {str(init.path)!r}"))
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        check_spec(first.spec, other.spec, f"{other.source} (vs {first.source})")
    return first


def model_from_checkpoint(ck: Checkpoint, transfer: Transfer | None = None) -> nn.Module:
    """Rebuild the checkpoint's model (on the macro for quant/dnat, with ``transfer`` or the ideal one)."""
    info = ck.manifest["model"]
    if not isinstance(info, dict) or "name" not in info or not isinstance(info.get("kwargs", {}), dict):
        raise ArtifactError(f"checkpoint {str(ck.path)!r}: manifest 'model' must name the model and its kwargs")
    try:
        model = build_model(info["name"], **info.get("kwargs", {}))
    except (TypeError, ValueError, KeyError, ConfigError) as err:
        raise ArtifactError(f"checkpoint {str(ck.path)!r}: manifest field 'model' ({info['name']!r} with "
                            f"{info.get('kwargs')!r:.80}) does not build a model: {err}") from err
    spec = ck.spec
    if spec is not None:
        if transfer is not None:
            check_spec(spec, transfer.spec, "the error model")
        if spec.weight_storage == "unsigned" and ck.manifest.get("polarity") is None:
            raise ArtifactError(f"checkpoint {str(ck.path)!r} was trained for a unipolar macro with signed weights and "
                                "a digital zero point, which cimlab no longer programs (unipolar layers are stored as "
                                "magnitudes, bipolar ones on column pairs); train it again with --mode quant")
        try:
            convert(model, spec, transfer, learn=ck.manifest.get("quantizer") or "epact",
                    quant=ck.manifest.get("quant") or "per-layer", polarity=ck.manifest.get("polarity"))
        except ConfigError as err:
            raise ArtifactError(f"checkpoint {str(ck.path)!r}: {err}") from err
    try:
        model.load_state_dict(ck.tensors, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"checkpoint {str(ck.path)!r} does not fit model {info['name']!r}: {err}") from err
    model.eval()
    return model


def _calibration_batches(data: TaskData, batch: int = 128) -> list[torch.Tensor]:
    x = data.x_train[:CALIBRATION_SAMPLES]
    return [x[i : i + batch] for i in range(0, x.shape[0], batch)]


def prepare_model(data: TaskData, mode: str, *, model_name: str | None = None, spec: MacroSpec | None = None,
                  transfer: Transfer | None = None, learn: str = "epact", init: Checkpoint | None = None,
                  seed: int = 0, model_kwargs: dict[str, Any] | None = None, quant: str | None = None,
                  polarity: str | dict[str, str] | None = None,
                  start_state: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model to train in ``mode``: built fresh (seeded) or from ``init``, put on the macro for quant/dnat.

    ``model_kwargs`` add to the task's model arguments (e.g. ``{"width": 8}``) for a fresh model.
    ``quant`` (``per-layer`` by default) and ``polarity`` (one for every layer, or {layer: polarity}; default
    ``bipolar``) put a float model on the macro; a quant or dnat ``init`` keeps its own (giving others is an error).
    ``start_state``: a float state dict that replaces ``init``'s weights (the polarity search's candidate).
    Returns (model, {"name", "kwargs"}) for the manifest.
    """
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if learn not in LEARN:
        raise ConfigError(f"quantizer {learn!r} is not one of {', '.join(LEARN)}")
    if quant is not None and quant not in QUANT_SCHEMES:
        raise ConfigError(f"quantization {quant!r} is not one of {', '.join(QUANT_SCHEMES)}")
    if mode == "float" and (quant is not None or polarity is not None):
        raise ConfigError("a float model has no macro ranges or polarity: --quant and --polarity need --mode quant "
                          "or dnat")
    on_macro = {"quant": quant or "per-layer", "polarity": polarity}
    if mode != "float" and spec is None:
        raise ConfigError(f"mode {mode!r} needs the macro's MacroSpec: give --error-model, --link or --profile")
    if mode == "dnat" and (transfer is None or transfer.kind == "ideal"):
        raise ConfigError("mode 'dnat' needs a measured error model (--error-model FILE)")
    if init is not None:
        if init.task != data.name:
            raise ConfigError(f"checkpoint {str(init.path)!r} is for task {init.task!r}, not {data.name!r}")
        if model_name is not None and model_name != init.manifest["model"]["name"]:
            raise ConfigError(f"checkpoint {str(init.path)!r} holds model {init.manifest['model']['name']!r}, "
                              f"not {model_name!r}")
        if mode == "float" and init.spec is not None:
            raise ConfigError("a float model cannot start from a quant or dnat checkpoint")
        info = dict(init.manifest["model"])
        if init.spec is None:
            model = model_from_checkpoint(init)
            if start_state is not None:
                model.load_state_dict(start_state, strict=True)
            if mode != "float":
                assert spec is not None
                convert(model, spec, transfer, learn=learn, seed=seed, **on_macro)
                calibrate(model, _calibration_batches(data))
        else:
            model = model_from_checkpoint(init, transfer)
            _check_kept(init, model, quant, polarity)
            set_learn(model, learn)
        return model, info
    name = model_name or DEFAULT_MODEL[data.name]
    kwargs = {**task_model_kwargs(data), **(model_kwargs or {})}
    torch.manual_seed(seed)
    model = build_model(name, **kwargs)
    if mode != "float":
        assert spec is not None
        convert(model, spec, transfer, learn=learn, seed=seed, **on_macro)
        calibrate(model, _calibration_batches(data))
    return model, {"name": name, "kwargs": kwargs}


def _check_kept(init: Checkpoint, model: nn.Module, quant: str | None, polarity: str | dict[str, str] | None) -> None:
    """ConfigError when a quant/dnat ``init`` is asked for other ranges or polarities than it was trained with."""
    where = f"checkpoint {str(init.path)!r}"
    if quant is not None and quant != model_quant(model):
        raise ConfigError(f"{where} was trained with {model_quant(model)} ranges; it cannot continue as {quant}")
    if polarity is None:
        return
    have = model_polarity(model)
    want = dict.fromkeys(have, polarity) if isinstance(polarity, str) else {**have, **polarity}
    if want != have:
        raise ConfigError(f"{where} was trained with polarities {have}; it cannot continue with {want}")


def error_model_info(transfer: Transfer | None) -> dict[str, Any] | None:
    """The manifest's ``error_model`` entry."""
    if transfer is None or transfer.kind == "ideal":
        return None
    i = transfer.info
    return {"sha256": i.sha256, "source": i.source, "pooled": i.pooled, "kind": i.kind, "chip_id": i.chip_id}


def evaluate_model(model: nn.Module, data: TaskData, *, transfer: Transfer | None, draws: int,
                   seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Accuracy with ideal MACs and, given a measured transfer, under it (mean and std over ``draws``); with
    ``progress``, a bar over the evaluations on stderr."""
    spec = model_spec(model)
    out: dict[str, Any] = {}
    if spec is None:
        out["accuracy_float"] = accuracy(model, data.x_test, data.y_test, seed=seed)
        return out
    original = next(layer.transfer for _, layer in cim_layers(model))
    measured = transfer is not None and transfer.kind != "ideal"
    try:
        with progress_bar(progress, 1 + (draws if measured else 0), "evaluate") as advance:
            set_transfer(model, Transfer.ideal(spec))
            out["accuracy_ideal"] = accuracy(model, data.x_test, data.y_test, seed=seed)
            advance(1)
            if measured:
                set_transfer(model, transfer)
                accs = []
                for i in range(draws):
                    accs.append(accuracy(model, data.x_test, data.y_test, seed=seed + i))
                    advance(1, draw=i + 1)
                out["accuracy_errors"] = accs
                out["accuracy_errors_mean"] = statistics.fmean(accs)
                out["accuracy_errors_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
                out["draws"] = draws
    finally:
        set_transfer(model, original)
    return out


def train_run(task: str, mode: str, out: str | os.PathLike, *, model_name: str | None = None,
              error_model: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
              decode: Sequence[str | os.PathLike] = (), calibrate: int = 0, shuffle_columns: bool = False,
              link: str | None = None, profile: str | None = None,
              init: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
              cfg: TrainConfig | None = None, learn: str = "epact", pooled: bool = False, draws: int = 3,
              limit: int | None = None, transfer_kind: str = "measured", progress: bool = False,
              timeout: float = 1.0, resume: bool = False, quant: str | None = None, polarity: str | None = None,
              search: dict[str, Any] | None = None, device: str = "cpu", ddp: int | None = None) -> dict[str, Any]:
    """Train and save a checkpoint; returns the results (JSON-friendly).

    ``quant``: ``per-layer`` (default) or ``uniform`` ranges; ``polarity``: one of ``POLARITY_CHOICES`` (default
    ``bipolar``); ``search`` overrides ``search_polarity``'s options (generations, offspring, steps, cost_weight).

    ``error_model``: one file, or several: the error models of several chips of one design (a population; each
    batch trains through one of them, ``fit(population=...)``), reported on each. ``decode``: a short
    characterization of each of those chips, in the same order: their table decoders (``ColumnDecoder``), the
    deploy step's, in training. ``calibrate``: that many training images fit the deploy step's per-output
    corrections of every chip at the start of each epoch (``fit(calibration=...)``), and again before each chip's
    reported accuracy (with its batch norm measured there; the checkpoint keeps training's). ``shuffle_columns``:
    every chip's columns in a fresh placement each epoch (a population, for a network deployed with ``cimlab
    compile --place-on``).

    The training state is saved at the start of every epoch beside ``out`` (``resume_path(out)``); ``resume``
    continues a run from it bit-identically. The state is removed once the checkpoint is written.

    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (ConfigError where there is no such GPU). ``ddp``: train with that
    many local processes (``cimlab.training.distributed.launch``; returns rank 0's results). Run under torchrun,
    each process is one rank of the run (see ``cimlab.training.distributed``); rank 0 writes every file, and the
    other ranks return ``{"rank": r, "world_size": n}``.
    """
    cfg = cfg or TrainConfig()
    if ddp is not None and ddp > 1:
        from cimlab.training.distributed import launch

        run = {"task": task, "mode": mode, "out": str(out), "model_name": model_name,
               "error_model": [str(m) for m in _paths(error_model)], "decode": [str(d) for d in decode],
               "calibrate": calibrate, "shuffle_columns": shuffle_columns, "link": link, "profile": profile,
               "init": None if init is None else str(init), "data_dir": None if data_dir is None else str(data_dir),
               "cfg": cfg.as_dict(), "learn": learn, "pooled": pooled, "draws": draws, "limit": limit,
               "transfer_kind": transfer_kind, "progress": progress, "timeout": timeout, "resume": resume,
               "quant": quant, "polarity": polarity, "search": search}
        return launch(ddp, run, device=device)
    from cimlab.training.distributed import replicas_from_env

    with replicas_from_env(device) as replicas:
        return _train_run(task, mode, out, model_name=model_name, error_models=_paths(error_model),
                          decode=[str(d) for d in decode], calibrate=calibrate, shuffle_columns=shuffle_columns,
                          link=link,
                          profile=profile, init=init, data_dir=data_dir, cfg=cfg, learn=learn, pooled=pooled,
                          draws=draws, limit=limit, transfer_kind=transfer_kind, progress=progress, timeout=timeout,
                          resume=resume, quant=quant, polarity=polarity, search=search, replicas=replicas)


def _paths(error_model: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """``train_run``'s error model argument as a list of paths."""
    if error_model is None:
        return []
    if isinstance(error_model, str | os.PathLike):
        return [str(error_model)]
    return [str(m) for m in error_model]


def training_chips(error_models: Sequence[str], decode: Sequence[str], *, pooled: bool,
                   kind: str) -> list[Transfer]:
    """The chips a D-NAT run trains through: each error model's transfer, decoded by the matching short
    characterization's table when ``decode`` is given (one per error model).

    Raises:
        ConfigError: ``decode`` of another length, or files for different MacroSpecs.
        ArtifactError: an unreadable file.
    """
    if decode and len(decode) != len(error_models):
        raise ConfigError(f"--decode takes one short characterization per --error-model, in the same order: got "
                          f"{len(decode)} for {len(error_models)}")
    chips = [Transfer.load(m, pooled=pooled, kind=kind) for m in error_models]  # type: ignore[arg-type]
    for path, chip in zip(error_models[1:], chips[1:], strict=True):
        check_spec(chips[0].spec, chip.spec, f"error model {path!r} (vs {error_models[0]!r})")
    for i, path in enumerate(decode):
        decoder = ColumnDecoder.load(path)
        if decoder.table.shape != (chips[i].spec.physical_cols, chips[i].spec.n_codes):
            raise ConfigError(f"decoder {path!r} is for another macro than error model {error_models[i]!r}")
        chips[i] = chips[i].decoded(decoder)
    return chips


def evaluate_chips(model: nn.Module, data: TaskData, chips: Sequence[Transfer], *, draws: int, seed: int,
                   calibration: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Accuracy under each chip (mean and std over ``draws``), each on a copy of ``model`` with the deploy step
    fitted on that chip first when ``calibration`` is given."""
    out = []
    for chip in chips:
        m = copy.deepcopy(model)
        if calibration:
            clear_columns(m)
            set_transfer(m, chip)
            calibrate_columns(m, calibration)
        r = evaluate_model(m, data, transfer=chip, draws=draws, seed=seed)
        out.append({"error_model": chip.info.source, "draws": r["accuracy_errors"], "mean": r["accuracy_errors_mean"],
                    "std": r["accuracy_errors_std"]})
    return out


def _train_run(task: str, mode: str, out: str | os.PathLike, *, model_name: str | None,
               error_models: list[str], decode: list[str], calibrate: int, shuffle_columns: bool,
               link: str | None, profile: str | None,
               init: str | os.PathLike | None, data_dir: str | os.PathLike | None, cfg: TrainConfig, learn: str,
               pooled: bool, draws: int, limit: int | None, transfer_kind: str, progress: bool, timeout: float,
               resume: bool, quant: str | None, polarity: str | None, search: dict[str, Any] | None,
               replicas: Replicas | None) -> dict[str, Any]:
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if polarity is not None and polarity not in POLARITY_CHOICES:
        raise ConfigError(f"polarity {polarity!r} is not one of {', '.join(POLARITY_CHOICES)}")
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    if calibrate < 0:
        raise ConfigError(f"calibrate must be >= 0 images, got {calibrate}")
    if mode != "dnat" and (len(error_models) > 1 or decode or calibrate or shuffle_columns):
        raise ConfigError("several --error-model, --decode, --calibrate and --shuffle-columns train through chips: "
                          "they need --mode dnat")
    if shuffle_columns and len(error_models) < 2:
        raise ConfigError("--shuffle-columns places a population's columns afresh each epoch: give several "
                          "--error-model")
    init_ck = load_checkpoint(init) if init is not None else None
    src = resolve_spec(error_model=error_models[0] if error_models else None, link=link, profile=profile,
                       init=init_ck, timeout=timeout)
    spec = src.spec if src is not None else None
    if mode == "float" and (error_models or link or profile):
        raise ConfigError("mode 'float' takes no --error-model, --link or --profile")
    chips: list[Transfer] = []
    if mode == "dnat":
        if not error_models:
            raise ConfigError("mode 'dnat' needs --error-model FILE (the measured D-MAC-EM)")
        chips = training_chips(error_models, decode, pooled=pooled, kind=transfer_kind)
    transfer = chips[0] if chips else None
    data = load_task(task, data_dir, limit=limit)
    images = data.x_train[:calibrate]
    calibration = [images[i : i + 128] for i in range(0, images.shape[0], 128)]
    searched = None
    if polarity == "search":
        searched = _search(init_ck, mode, data, search or {}, cfg.seed)
    model, info = prepare_model(data, mode, model_name=model_name, spec=spec, transfer=transfer, learn=learn,
                                init=init_ck, seed=cfg.seed, quant=quant,
                                polarity=searched.assignment if searched else polarity,
                                start_state=searched.state if searched else None)
    on_macro = mode != "float"
    identity = {"task": task, "mode": mode, "model": info, "train": cfg.as_dict(), "learn": learn,
                "quant": model_quant(model) if on_macro else None,
                "polarity": model_polarity(model) if on_macro else None,
                "pooled": pooled, "limit": limit, "injection": transfer_kind, "spec": spec.to_dict() if spec else None,
                "init": init_ck.manifest.get("tensors_sha256") if init_ck else None,
                "error_model": error_model_info(transfer),
                "population": [error_model_info(c) for c in chips] if len(chips) > 1 else None,
                "decode": decode or None, "calibrate": calibrate, "shuffle_columns": shuffle_columns}
    if replicas is not None:
        identity["replicas"] = replicas.describe()
    writer = replicas is None or replicas.is_writer
    state = EpochCheckpoint(resume_path(out), identity, resume=resume)
    result = fit(model, data, cfg, progress=progress and writer, description=f"{mode} {task}", checkpoint=state,
                 replicas=replicas, population=chips if len(chips) > 1 else (), calibration=calibration,
                 shuffle_columns=shuffle_columns)
    if not writer:
        assert replicas is not None
        return {"rank": replicas.rank, "world_size": replicas.world_size}
    per_chip = len(chips) > 1 or bool(calibration)
    if per_chip:
        clear_columns(model)  # the corrections training left are the last chip's
    metrics = evaluate_model(model, data, transfer=None if per_chip else transfer, draws=draws, seed=cfg.seed)
    if per_chip:
        metrics["accuracy_chips"] = evaluate_chips(model, data, chips, draws=draws, seed=cfg.seed,
                                                   calibration=calibration)
        first = metrics["accuracy_chips"][0]
        metrics.update(accuracy_errors=first["draws"], accuracy_errors_mean=first["mean"],
                       accuracy_errors_std=first["std"], draws=draws)
    manifest = {
        "task": task, "model": info, "mode": mode, "spec": spec.to_dict() if spec else None,
        "quantizer": learn if mode != "float" else None, "error_model": error_model_info(transfer),
        "population": identity["population"],
        "quant": identity["quant"], "polarity": identity["polarity"],
        "polarity_search": searched.summary() if searched else None,
        "train": {**cfg.as_dict(), "init": str(init) if init else None, "limit": limit, "steps": result.steps,
                  **({"replicas": replicas.describe()} if replicas is not None else {})},
        "metrics": metrics,
    }
    path = save_checkpoint(out, model, manifest)
    state.finish()
    acc = metrics.get("accuracy_errors_mean", metrics.get("accuracy_ideal", metrics.get("accuracy_float")))
    return {
        "checkpoint": str(path), "task": task, "model": info["name"], "mode": mode,
        "spec": spec.describe() if spec else None, "spec_source": src.source if src else None,
        "quantizer": manifest["quantizer"], "error_model": manifest["error_model"], "quant": manifest["quant"],
        "polarity": manifest["polarity"], "polarity_search": manifest["polarity_search"],
        "epochs": cfg.epochs, "steps": result.steps, "seconds": result.seconds, "step_time_s": result.step_time_s,
        "accuracy": acc, **metrics, "history": result.history,
        **({"replicas": replicas.describe()} if replicas is not None else {}),
    }


def _search(init: Checkpoint | None, mode: str, data: TaskData, options: dict[str, Any], seed: int) -> Any:
    """The evolutionary polarity search on ``init``'s float model (``cimlab.polarity.search_polarity``)."""
    from cimlab.polarity import search_polarity

    if mode == "float":
        raise ConfigError("--polarity search places layers on the macro: it needs --mode quant or dnat")
    if init is None or init.spec is not None:
        raise ConfigError("--polarity search fine-tunes a float model: give it as --init (a --mode float checkpoint)")
    return search_polarity(model_from_checkpoint(init), data.x_train, data.y_train, seed=seed, **options)


def evaluate_run(checkpoint: str | os.PathLike, *, error_model: str | os.PathLike | None = None, draws: int = 5,
                 data_dir: str | os.PathLike | None = None, seed: int = 0, pooled: bool | None = None,
                 limit: int | None = None, transfer_kind: str = "measured", progress: bool = False) -> dict[str, Any]:
    """Accuracy of a checkpoint with ideal MACs and under an error model (mean +- std over ``draws``)."""
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    ck = load_checkpoint(checkpoint)
    transfer = None
    if error_model is not None:
        if ck.spec is None:
            raise ConfigError(f"checkpoint {str(checkpoint)!r} is a float model: it has no quantizers to run on "
                              "the macro; train it with --mode quant first")
        if pooled is None:
            em = ck.manifest.get("error_model") or {}
            pooled = bool(em.get("pooled", False))
        transfer = Transfer.load(error_model, pooled=pooled, kind=transfer_kind)  # type: ignore[arg-type]
        check_spec(ck.spec, transfer.spec, f"error model {str(error_model)!r}")
    data = load_task(ck.task, data_dir, limit=limit)
    model = model_from_checkpoint(ck)
    metrics = evaluate_model(model, data, transfer=transfer, draws=draws, seed=seed, progress=progress)
    out = {"checkpoint": str(checkpoint), "task": ck.task, "model": ck.manifest["model"]["name"], "mode": ck.mode,
           "spec": ck.spec.describe() if ck.spec else None, "test_samples": int(data.y_test.shape[0]), **metrics}
    if transfer is not None:
        out["error_model"] = str(error_model)
        out["naive"] = ck.mode == "quant"
    return out


def recovery(naive: float, dnat: float, quant: float) -> float | None:
    """``(dnat - naive) / (quant - naive)``; None when the error model costs the quant model nothing."""
    gap = quant - naive
    if not math.isfinite(gap) or gap <= 0:
        return None
    return (dnat - naive) / gap


__all__ = ["MODES", "POLARITY_CHOICES", "SpecSource", "evaluate_chips", "evaluate_model", "evaluate_run",
           "model_from_checkpoint", "prepare_model", "recovery", "resolve_spec", "train_run", "training_chips"]

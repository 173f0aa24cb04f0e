"""``cimlab train`` and ``cimlab evaluate``: D-NAT training through the measured MAC error model.

Registered into the ``cimlab`` group by ``cimlab.cli``; shares options and error reporting through
``cimlab.cli_common``. torch is imported inside the commands only, so ``cimlab info`` never loads it.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click
from click.core import ParameterSource
from rich.table import Table

from cimlab.cli_common import LINK_HELP, cim_errors, console, emit_json, err_console, json_option
from cimlab.firmware_bridge.errors import ConfigError

TASK_CHOICES = ("digits", "har", "cifar10")
MODE_CHOICES = ("float", "quant", "dnat")
LEARN_CHOICES = ("epact", "pact", "fixed")
MODEL_CHOICES = ("digits_mlp", "digits_cnn", "har_cnn", "resnet20", "vgg8")


MODELS_FOR_TASK = {
    "digits": ("digits_mlp", "digits_cnn"),
    "har": ("har_cnn",),
    "cifar10": ("resnet20", "vgg8"),
}
"""Which models take which task's inputs (8x8 digit images, 9-channel 1-D HAR windows, 32x32 RGB images)."""


def check_model_fits_task(task: str, model: str) -> None:
    """ConfigError naming the models that fit ``task`` when ``model`` does not."""
    fits = MODELS_FOR_TASK.get(task, ())
    if model not in fits:
        raise ConfigError(f"--model {model} does not take {task!r} inputs; for --task {task} use "
                          f"{' or '.join(fits)}")


def resume_command() -> str:
    """The command line that ran this command, with --resume (for the message after Ctrl-C)."""
    ctx = click.get_current_context()
    words = ["cimlab", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        if param.name in (None, "resume") or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if not isinstance(param, click.Option):
            words.append(str(value))
        elif param.is_flag:
            if value:
                words.append(max(param.opts, key=len))
            elif param.secondary_opts:
                words.append(param.secondary_opts[0])
        elif param.multiple:
            for v in value:
                words += [max(param.opts, key=len), str(v)]
        else:
            words += [max(param.opts, key=len), str(value)]
    return shlex.join([*words, "--resume"])


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100.0 * v:.2f} %"


@click.command("train")
@click.option("--task", type=click.Choice(TASK_CHOICES), required=True, help="What to learn.")
@click.option("--mode", type=click.Choice(MODE_CHOICES), required=True,
              help="float: plain model; quant: ideal quantized macro (upper bound); dnat: through the error "
                   "model.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@click.option("--error-model", "error_models", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Measured error model (dmacem.npz); gives the MacroSpec; needed for dnat. Repeat it for several "
                   "chips of one design (a population): each batch trains through one of them.")
@click.option("--decode", "decode", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A short characterization of each --error-model's chip, in the same order: its table decoder "
                   "(the deploy step's, bench --decode) in training. dnat only.")
@click.option("--calibrate", type=click.IntRange(min=1), default=None,
              help="Fit the deploy step's per-output corrections of every chip on N training images at the start "
                   "of each epoch, and before each chip's reported accuracy. dnat only.")
@click.option("--shuffle-columns", is_flag=True,
              help="Give every chip of a population a fresh placement of its columns each epoch: a network for the "
                   "design, to deploy with `cimlab compile --place-on` the target die.")
@click.option("--link", "link_url", help="Take the MacroSpec from the chip at this link. " + LINK_HELP)
@click.option("--profile", help="Take the MacroSpec from this twin profile (name or TOML file).")
@click.option("--model", "model_name", type=click.Choice(MODEL_CHOICES), help="Model (default: the task's).")
@click.option("--init", "init", type=click.Path(exists=True, dir_okay=False),
              help="Start from this checkpoint (float -> quant, quant -> dnat).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Dataset folder (har: UCI HAR Dataset; cifar10: cifar-10-batches-bin).")
@click.option("--epochs", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate (cosine decay).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--optimizer", type=click.Choice(("adam", "sgd")), default="adam", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds model, batches and sampled codes.")
@click.option("--quantizer", "learn", type=click.Choice(LEARN_CHOICES), default="epact", show_default=True,
              help="Input bounds: epact learns lower and upper, pact the upper only, fixed neither.")
@click.option("--quant", "quant", type=click.Choice(("per-layer", "uniform")), default=None,
              help="Weight and input ranges per layer (default), or one of each shared by every layer (uniform: one "
                   "ADC/DAC design for all layers; the shared weight range learns unless --quantizer fixed). "
                   "quant/dnat only.")
@click.option("--polarity", type=click.Choice(("bipolar", "unipolar-pos", "unipolar-neg", "search")), default=None,
              help="Weight signs of every layer (default bipolar), or search: an evolutionary search per layer on the "
                   "float model given as --init. On a unipolar macro unipolar layers take one array, bipolar ones "
                   "column pairs. quant/dnat only.")
@click.option("--pooled/--per-column", default=False, show_default=True,
              help="Error model pooled over columns, or one per physical column (a chip's gain and offset errors "
                   "are per column; a pooled model cannot learn them).")
@click.option("--draws", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Draws of the error model for the final accuracy.")
@click.option("--injection", type=click.Choice(("measured", "gaussian")), default="measured", show_default=True,
              help="Codes drawn from the measured table, or a Gaussian with its mean and sigma (comparison).")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N training and test samples.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after N optimizer steps.")
@click.option("--timeout", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
              help="Link timeout with --link, s.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its saved state (OUT.resume), bit-identically.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N: where the model, the error model's tables and the sampling kernels run.")
@click.option("--ddp", "ddp", type=click.IntRange(min=2),
              help="Train with N local processes (DistributedDataParallel; one GPU each with --device cuda). "
                   "Under torchrun, leave it out: each process is one rank.")
@json_option
@cim_errors
def train(task: str, mode: str, out: str, error_models: tuple[str, ...], decode: tuple[str, ...],
          calibrate: int | None, shuffle_columns: bool, link_url: str | None, profile: str | None,
          model_name: str | None, init: str | None, data_dir: str | None, epochs: int, batch_size: int, lr: float,
          weight_decay: float, optimizer: str, seed: int, learn: str, quant: str | None, polarity: str | None,
          pooled: bool, draws: int, injection: str,
          limit: int | None, max_steps: int | None, timeout: float, progress: bool, resume: bool, device: str,
          ddp: int | None, as_json: bool) -> None:
    """Train a model for the macro: float, quant (ideal quantized) or dnat (through the measured error model).

    The MacroSpec comes from --error-model, --link, --profile or --init (they must agree), never from constants.
    The training state is saved at the start of every epoch (OUT.resume): after Ctrl-C or a crash, run the same
    command with --resume. With --ddp N, or under torchrun, the global batch is split over the processes and only
    rank 0 writes and prints.
    """
    from cimlab.training.api import train_run
    from cimlab.training.loop import TrainConfig
    from cimlab.training.resume import resume_path

    if model_name is not None:
        check_model_fits_task(task, model_name)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                      seed=seed, max_steps=max_steps)
    try:
        res = train_run(task, mode, out, model_name=model_name, error_model=list(error_models), decode=decode,
                        calibrate=calibrate or 0, shuffle_columns=shuffle_columns, link=link_url,
                        profile=profile, init=init, data_dir=data_dir, cfg=cfg, learn=learn, pooled=pooled,
                        draws=draws, limit=limit, transfer_kind=injection,
                        progress=progress and sys.stderr.isatty(), timeout=timeout, resume=resume, quant=quant,
                        polarity=polarity, device=device, ddp=ddp)
    except KeyboardInterrupt:
        state = resume_path(out)
        if state.is_file():
            err_console.print(f"[yellow]interrupted[/]: the training state at the start of this epoch is saved in "
                              f"{state}. Resume with:\n  {resume_command()}", highlight=False, soft_wrap=True)
        raise
    if "checkpoint" not in res:
        return  # a rank other than 0 under torchrun: rank 0 reports
    t = Table(title=f"cimlab train: {task} / {res['model']} / {mode}", show_header=False)
    t.add_row("checkpoint", res["checkpoint"])
    t.add_row("macro", str(res["spec"] or "- (float)"))
    if res.get("spec_source"):
        t.add_row("spec from", res["spec_source"])
    if res.get("quant"):
        t.add_row("ranges", str(res["quant"]))
        pols = sorted(set(res["polarity"].values()))
        t.add_row("polarity", pols[0] if len(pols) == 1 else
                  ", ".join(f"{name}: {pol}" for name, pol in res["polarity"].items()))
    if res.get("polarity_search"):
        ps = res["polarity_search"]
        t.add_row("polarity search", f"{ps['evaluations']} candidates in {ps['seconds']:.1f} s, validation "
                  f"{_pct(ps['validation_accuracy'])}, {100 * ps['relative_columns']:.0f} % of bipolar columns")
    t.add_row("steps", f"{res['steps']} in {res['seconds']:.1f} s ({1e3 * res['step_time_s']:.1f} ms/step)")
    if "replicas" in res:
        r = res["replicas"]
        t.add_row("trained on", f"{r['world_size']} process(es), {r['device']}, {r['stream']} streams")
    if "accuracy_float" in res:
        t.add_row("test accuracy (float)", _pct(res["accuracy_float"]))
    if "accuracy_ideal" in res:
        t.add_row("test accuracy (ideal MACs)", _pct(res["accuracy_ideal"]))
    if "accuracy_chips" in res:
        for chip in res["accuracy_chips"]:
            t.add_row(f"test accuracy ({chip['error_model']}, {res['draws']} draws)",
                      f"{_pct(chip['mean'])} +- {100 * chip['std']:.2f}")
    elif "accuracy_errors_mean" in res:
        t.add_row(f"test accuracy (error model, {res['draws']} draws)",
                  f"{_pct(res['accuracy_errors_mean'])} +- {100 * res['accuracy_errors_std']:.2f}")
    console.print(t)
    emit_json(as_json, res)


@click.command("evaluate")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--error-model", type=click.Path(exists=True, dir_okay=False),
              help="Also evaluate with codes drawn from this error model (dmacem.npz).")
@click.option("--draws", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Independent draws of the error model (mean and std reported).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), help="Dataset folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first draw.")
@click.option("--pooled/--per-column", default=None,
              help="Error model pooled or per column (default: as trained).")
@click.option("--injection", type=click.Choice(("measured", "gaussian")), default="measured", show_default=True,
              help="Codes drawn from the measured table, or a Gaussian with its mean and sigma (comparison).")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N test samples.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@json_option
@cim_errors
def evaluate(checkpoint: str, error_model: str | None, draws: int, data_dir: str | None, seed: int,
             pooled: bool | None, injection: str, limit: int | None, progress: bool, as_json: bool) -> None:
    """Test accuracy of CHECKPOINT with ideal MACs and under an error model (a quant checkpoint there: "naive")."""
    from cimlab.training.api import evaluate_run

    res = evaluate_run(checkpoint, error_model=error_model, draws=draws, data_dir=data_dir, seed=seed,
                       pooled=pooled, limit=limit, transfer_kind=injection,
                       progress=progress and sys.stderr.isatty())
    t = Table(title=f"cimlab evaluate: {checkpoint}", show_header=False)
    t.add_row("task / model / mode", f"{res['task']} / {res['model']} / {res['mode']}")
    t.add_row("macro", str(res["spec"] or "- (float)"))
    if "accuracy_float" in res:
        t.add_row("test accuracy (float)", _pct(res["accuracy_float"]))
    if "accuracy_ideal" in res:
        t.add_row("test accuracy (ideal MACs)", _pct(res["accuracy_ideal"]))
    if "accuracy_errors_mean" in res:
        label = "naive" if res.get("naive") else res["mode"]
        t.add_row(f"test accuracy under errors ({label}, {draws} draws)",
                  f"{_pct(res['accuracy_errors_mean'])} +- {100 * res['accuracy_errors_std']:.2f}")
    console.print(t)
    emit_json(as_json, res)


__all__ = ["evaluate", "train"]

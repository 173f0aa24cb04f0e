"""D-NAT on many processes and GPUs: torch DistributedDataParallel around ``loop.fit``.

Two ways to start a run, one code path in each process (``api.train_run``)::

    cimlab train --ddp 2 ...                               # cimlab starts 2 local processes (launch)
    torchrun --nproc_per_node 2 -m cimlab train ...       # torchrun starts them, on one node or many

Each process is one ``Replicas``: its rank among ``world_size``, and its device (``cuda:LOCAL_RANK`` with
``--device cuda``, backend NCCL; the CPU otherwise, backend gloo). What DDP adds to training (``fit(...,
replicas=...)``):

- **Batches.** Every rank draws the same global batch from the seeded batch generator (augmentation included) and
  computes on its contiguous share (``shard``): the shares are disjoint and their union is the single-process
  batch. Each rank's loss is its share's mean times ``world_size * n_local / n``, so DDP's gradient average is the
  gradient of the global batch's mean loss also when the batch does not split evenly.
- **Batch norm** spans the global batch: torch's ``SyncBatchNorm`` on GPUs, ``CrossRankBatchNorm`` on the CPU
  (torch's runs only on GPUs).
- **Random streams.** The sampled codes' streams are per rank: at the start of every epoch each rank reseeds its CIM
  layers from ``epoch_seed(seed, rank, epoch)`` (layer ``i`` from that and ``i``, as ``layers.reseed``). So a run is
  reproducible for a given world size, ranks draw independent codes, and a resumed run needs no per-rank state.
- **Deploy-step calibration** (``calibration=``) is fitted on rank 0 and broadcast, so every rank trains through
  the same per-column corrections.
- **Evaluation between epochs** is split over the ranks (each its share of the test set, its own stream) and the
  counts added. **Checkpoints** (the per-epoch training state and the final checkpoint) are written by rank 0 only.

Only the stream of the sampled codes differs from one process on the same global batches; with an error model
whose codes do not depend on the draw (static gain and offset errors, no noise), or with the ideal ADC (``quant``),
the losses are those of one process up to float rounding (tests/training/test_distributed.py).

The launcher (``launch``) runs ``python -m cimlab.training.distributed SPEC`` once per rank: the ranks meet through
a file store in a private temporary folder (no listening port for the rendezvous) and gloo talks over the loopback
interface. A rank that fails stops the others; its cimlab error is raised again in the caller.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cimlab.firmware_bridge import errors as cim_errors
from cimlab.firmware_bridge.errors import CimError, CimTimeoutError, ConfigError, ShapeError
from cimlab.firmware_bridge.files import atomic_path
from cimlab.training.device import default_stream, resolve_device, to_device
from cimlab.training.layers import reseed
from cimlab.training.macro import ColumnCorrection

TIMEOUT_S = 600.0
"""How long a rank waits for the others in any one collective (start-up included), s."""
STOP_GRACE_S = 10.0
"""How long stopped ranks get to exit before they are killed, s."""
INIT_ENV = "CIMLAB_DDP_INIT"
"""The launcher's rendezvous (a ``file://`` store) for the ranks it starts; torchrun's ranks use ``env://``."""
PARENT_ENV = "CIMLAB_DDP_LAUNCHER"
"""The launcher's process id, given to the ranks it starts."""


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of rank ``rank``'s CIM streams in epoch ``epoch`` (0-based) of a run seeded ``seed``: 63 bits of
    ``numpy.random.SeedSequence([seed, rank, epoch])``."""
    ss = np.random.SeedSequence([int(seed) & (2**63 - 1), int(rank), int(epoch)])
    return int(ss.generate_state(1, np.uint64)[0] >> 1)


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` samples: shares are disjoint, cover ``0..n`` in rank order, and
    differ in size by at most one."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` added over every rank, differentiable (the gradient is added over the ranks too)."""
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD))


class CrossRankBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span every rank's share of the global batch: what torch's
    ``SyncBatchNorm`` does on GPUs, for the CPU (gloo), where torch's does not run. The per-channel sums travel in
    float64 (the mean first, then the variance about it) through differentiable all-reduces, so the gradient is
    that of batch norm over the global batch. Outside training, or without a process group, it is plain batch
    norm; its state dict is a ``BatchNorm*d``'s."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ShapeError(f"batch norm expects inputs [batch, channels, ...], got {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local = torch.cat([x.sum(dims, dtype=torch.float64),
                           torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)])
        total = _all_sum(local)
        count = total[-1].detach()
        mean = total[:-1] / count
        centred = x - mean.to(x.dtype).reshape(shape)
        var = _all_sum((centred * centred).sum(dims, dtype=torch.float64)) / count
        y = centred * torch.rsqrt(var + self.eps).to(x.dtype).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), count)
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / torch.clamp(count - 1, min=1)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Swap every ``BatchNorm*d`` of ``module`` (in place) for this class, sharing its parameters and
        buffers; returns the module (a new one when ``module`` itself is a batch norm)."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls | nn.SyncBatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            if module.track_running_stats:
                out.running_mean, out.running_var = module.running_mean, module.running_var
                out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
            return out
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module


@dataclass
class Replicas:
    """This process's part in a training run (see the module docstring).

    Attributes:
        device: where this rank computes.
        rank: this process's rank, 0 .. world_size - 1 (rank 0 writes every file).
        world_size: processes in the run.
        stream: the kind of random stream of the sampled codes (``pcg64`` or ``device``).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    stream: str = "pcg64"

    @property
    def distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """This rank writes checkpoints, training states and results."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What makes a run on these replicas reproducible (goes into the training state's identity)."""
        return {"world_size": self.world_size, "device": self.device.type, "stream": self.stream}

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this rank's device and, with more than one rank, make its batch norms span the global
        batch and wrap it in ``DistributedDataParallel`` (which starts every rank from rank 0's weights). Returns
        the module to train through; ``model`` itself stays the unwrapped network."""
        to_device(model, self.device, stream=self.stream)
        if not self.distributed:
            return model
        if self.device.type == "cuda":
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            converted = CrossRankBatchNorm.convert(model)
        if converted is not model:
            raise ConfigError("a model that is itself one batch norm layer cannot be trained distributed")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def local_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's share of a global batch, on its device, and the weight of its mean loss (see the module
        docstring)."""
        n = x.shape[0]
        part = shard(n, self.rank, self.world_size)
        xb, yb = x[part].to(self.device, non_blocking=True), y[part].to(self.device, non_blocking=True)
        return xb, yb, self.world_size * xb.shape[0] / n

    def min_batch(self) -> int:
        """The smallest global batch that gives every rank a sample."""
        return self.world_size

    def reseed(self, model: nn.Module, seed: int, epoch: int) -> None:
        """Restart this rank's CIM streams for ``epoch`` (``epoch_seed``)."""
        reseed(model, epoch_seed(seed, self.rank, epoch))

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value added over the ranks (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def broadcast_corrections(self, chips: list[dict[str, ColumnCorrection]]) -> list[dict[str, ColumnCorrection]]:
        """Rank 0's per-column corrections, on every rank (same layers and shapes on all)."""
        if not self.distributed:
            return chips
        out = []
        for chip in chips:
            fixed = {}
            for name in sorted(chip):
                both = torch.stack([chip[name].gain, chip[name].offset]).to(self._comm_device(), torch.float64)
                dist.broadcast(both, src=0)
                both = both.to(self.device)
                fixed[name] = ColumnCorrection(both[0].clone(), both[1].clone())
            out.append(fixed)
        return out

    def accuracy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> float:
        """Top-1 accuracy over the whole of (x, y): each rank evaluates its share with its own stream
        (``loop.accuracy`` seeded ``epoch_seed(seed, rank, 0)``; one process: ``seed`` as is), counts added."""
        from cimlab.training.loop import accuracy

        if not self.distributed:
            return accuracy(model, x, y, seed=seed)
        part = shard(x.shape[0], self.rank, self.world_size)
        n_local = part.stop - part.start
        correct = 0.0
        if n_local:
            correct = round(accuracy(model, x[part], y[part], seed=epoch_seed(seed, self.rank, 0)) * n_local)
        total_correct, total = self.sum([correct, n_local])
        return total_correct / total

    def _comm_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo CPU tensors
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def world_from_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's (or the launcher's) environment; (0, 0, 1) outside one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ConfigError(f"the distributed environment is malformed (RANK, LOCAL_RANK, WORLD_SIZE): {err}") from err
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"the distributed environment is inconsistent: RANK={rank}, WORLD_SIZE={world}")
    return rank, local, world


@contextmanager
def replicas_from_env(device: str = "cpu", *, stream: str | None = None,
                      timeout_s: float = TIMEOUT_S) -> Iterator[Replicas | None]:
    """This process's ``Replicas``: from the environment of torchrun (or ``launch``) when ``WORLD_SIZE`` > 1 (the
    process group is joined here and left on exit; an existing one is used as it is), one replica on ``device``
    otherwise, or None for one process on the CPU (plain training, unchanged).

    Raises:
        ConfigError: a device the machine lacks, or a distributed environment without a rendezvous.
        CimTimeoutError: the other ranks did not all arrive within ``timeout_s``.
    """
    rank, local_rank, world = world_from_env()
    dev = resolve_device(device, local_rank=local_rank if world > 1 else None)
    kind = stream or default_stream(dev)
    if world == 1:
        yield None if dev.type == "cpu" and kind == "pcg64" else Replicas(dev, stream=kind)
        return
    if dist.is_initialized():
        yield Replicas(dev, dist.get_rank(), dist.get_world_size(), kind)
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _join(rank, world, "nccl" if dev.type == "cuda" else "gloo", timeout_s)
    try:
        yield Replicas(dev, rank, world, kind)
    finally:
        dist.destroy_process_group()


def _join(rank: int, world: int, backend: str, timeout_s: float) -> None:
    init = os.environ.get(INIT_ENV, "env://")
    if init == "env://" and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise ConfigError(f"WORLD_SIZE={world} but no rendezvous: start the ranks with torchrun (which sets "
                          "MASTER_ADDR and MASTER_PORT) or with cimlab train --ddp N")
    try:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    except dist.DistStoreError as err:
        raise CimTimeoutError(f"rank {rank}: the other {world - 1} rank(s) did not all arrive within "
                              f"{timeout_s:.0f} s ({init}): {err}") from err
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"rank {rank}: cannot join the process group ({backend}, {init}): {err}") from err


# ---- the launcher ----------------------------------------------------------------------------------------------
def _loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux), None when there is none."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), None)


def _rank_env(tmp: Path, rank: int, nprocs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    env[INIT_ENV] = (tmp / "store").as_uri()
    env[PARENT_ENV] = str(os.getpid())
    lo = _loopback_interface()
    if lo is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", lo)  # gloo's pairs bind the loopback, not the machine's address
        env.setdefault("NCCL_SOCKET_IFNAME", lo)  # and NCCL's bootstrap
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
    return env


def launch(nprocs: int, run: dict[str, Any], *, device: str = "cpu") -> dict[str, Any]:
    """Train with ``nprocs`` local processes: ``api.train_run(**run)`` in each (``run`` must be JSON; its ``cfg``
    a ``TrainConfig`` as a dict). Returns rank 0's result. Ctrl-C stops every rank (the training state saved at the
    last epoch start stays, for ``--resume``).

    Raises:
        ConfigError: fewer than two processes, more than the GPUs with ``--device cuda``, or inside a run already.
        CimError: a rank failed (its cimlab error as it was raised there, else code ``rank_failed``).
    """
    if nprocs < 2:
        raise ConfigError(f"--ddp needs at least 2 processes, got {nprocs}")
    if world_from_env()[2] > 1:
        raise ConfigError("--ddp N starts its own processes; under torchrun leave --ddp out")
    dev = resolve_device(device)
    if dev.type == "cuda" and torch.cuda.device_count() < nprocs:
        raise ConfigError(f"--ddp {nprocs} --device cuda: one GPU per process, this machine has "
                          f"{torch.cuda.device_count()}", code="device")
    with tempfile.TemporaryDirectory(prefix="cimlab-ddp-") as name:
        tmp = Path(name)
        spec = tmp / "run.json"
        spec.write_text(json.dumps({"run": run, "device": device}))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with _sigterm_interrupts():
                for rank in range(nprocs):
                    procs.append(_start_rank(tmp, spec, rank, nprocs))
                failed = _wait(procs)
        finally:
            _stop(procs)
        if failed:
            raise _rank_error(tmp, failed)
        return json.loads((tmp / "result.json").read_text())


def _start_rank(tmp: Path, spec: Path, rank: int, nprocs: int) -> subprocess.Popen[bytes]:
    """One rank: rank 0 writes to the caller's stdout and stderr, the others' stderr goes to ``rank<r>.log``."""
    with open(tmp / f"rank{rank}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "cimlab.training.distributed", str(spec)],
                                env=_rank_env(tmp, rank, nprocs), stdin=subprocess.DEVNULL,
                                stdout=None if rank == 0 else subprocess.DEVNULL, stderr=None if rank == 0 else log)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the ranks run, SIGTERM to the launcher stops them as Ctrl-C does (in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _wait(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """Wait until every rank has exited 0 (returns []) or one has failed (returns the failed ranks)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed or all(c == 0 for c in codes):
            return failed
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop every rank still running: SIGTERM, then SIGKILL after ``STOP_GRACE_S``; all reaped."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _rank_error(tmp: Path, failed: list[int]) -> CimError:
    """The error to raise for failed ranks: a cimlab error one of them reported, else the first one's log."""
    for rank in failed:
        path = tmp / f"error{rank}.json"
        if path.is_file():
            info = json.loads(path.read_text())
            cls = getattr(cim_errors, info["type"], None)
            if isinstance(cls, type) and issubclass(cls, CimError):
                err = cls(f"rank {rank}: {info['message']}")
                err.code = info["code"]
                return err
    rank = failed[0]
    log = tmp / f"rank{rank}.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
    detail = ("; " + " | ".join(tail)) if tail else " (its output is above)"
    return CimError(f"rank {rank} of the distributed run failed{detail}", code="rank_failed")


def _die_with_launcher() -> None:
    """On Linux, have the kernel stop this rank (SIGTERM) when the launcher dies, even by SIGKILL."""
    parent = os.environ.get(PARENT_ENV)
    if not sys.platform.startswith("linux") or parent is None:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if str(os.getppid()) != parent:  # it died before the request was made
        sys.exit(1)


def _worker(spec_path: str) -> int:
    """One rank started by ``launch``: run ``train_run`` from the spec; rank 0 writes the result."""
    from cimlab.training.api import train_run
    from cimlab.training.loop import TrainConfig

    _die_with_launcher()
    spec_file = Path(spec_path)
    spec = json.loads(spec_file.read_text())
    rank = world_from_env()[0]
    run = dict(spec["run"])
    run["cfg"] = TrainConfig(**run["cfg"])
    try:
        result = train_run(**run, device=spec["device"])
    except KeyboardInterrupt:
        return 130
    except CimError as err:  # the launcher raises it again in the caller
        error = {"type": type(err).__name__, "code": err.code, "message": str(err)}
        (spec_file.parent / f"error{rank}.json").write_text(json.dumps(error))
        return 1
    if rank == 0:
        with atomic_path(spec_file.parent / "result.json") as tmp:
            tmp.write_text(json.dumps(result))
    return 0


__all__ = ["CrossRankBatchNorm", "Replicas", "epoch_seed", "launch", "replicas_from_env", "shard", "world_from_env"]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))

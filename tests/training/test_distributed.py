"""D-NAT on many processes: two gloo ranks on the loopback train as one process does on the same global batches,
each rank draws its own reproducible codes, and the whole D-NAT step stays on the device it is given.

What "the same losses as one process" can mean: the ranks' sampled codes come from their own streams, so with a
noisy error model a 2-rank run and a 1-process run draw different codes (and so differ by the draws' noise). The
comparison therefore uses a *static* measured error model (per-column gain and offset, no read noise): every
(column, level) has one code, so the codes do not depend on the draws, while the whole measured-table path still
runs (uniforms drawn per rank, the fused guide-table kernel, the statistical gradient through the smoothed
transfer). With it the two runs must agree to float rounding: per-epoch losses within a relative 1e-5, train and
test accuracies exactly, final weights within 1e-4 (Adam divides by the root of tiny second moments, which
amplifies rounding; a bias that feeds batch norm, whose gradient is rounding only, within the 6 steps' lr). A wrong batch split, an unweighted uneven share, per-rank batch norm or unsynchronised
corrections each move the losses by far more (checked by hand when this test was written).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from training_helpers import SMALL_LOSSY, SMALL_ODD, SMALL_TWOS, noisy_model

from cimlab.cli import cli
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.training import ColumnCorrection, calibrate, convert
from cimlab.training.device import resolve_device, to_device
from cimlab.training.distributed import Replicas, epoch_seed, shard
from cimlab.training.layers import cim_layers, reseed
from cimlab.training.transfer import TorchStream, Transfer


@pytest.fixture(scope="module")
def static_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("em") / "static.npz"
    noisy_model(MacroSpec(), seed=0, draws=8, noise=0.0, offset=0.4, gain=0.05).save(path)
    return path


def train(out: Path, error_model: Path, *extra: str) -> dict:
    # 64 samples in global batches of 27, 27 and 10: shares of 13/14, 13/14 and 5/5 (uneven splits weighted)
    args = ["train", "--task", "digits", "--mode", "dnat", "--error-model", str(error_model), "--model",
            "digits_mlp", "--limit", "64", "--epochs", "2", "--batch-size", "27", "--draws", "1", "--no-progress",
            "--json", "--out", str(out), *extra]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.slow
def test_two_gloo_ranks_train_as_one_process_on_the_same_global_batches(tmp_path: Path, static_model: Path) -> None:
    one = train(tmp_path / "one" / "net.ckpt", static_model)
    two = train(tmp_path / "two" / "net.ckpt", static_model, "--ddp", "2")
    assert two["replicas"] == {"world_size": 2, "device": "cpu", "stream": "pcg64"}
    assert one["steps"] == two["steps"] == 6
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["train_accuracy"] == a["train_accuracy"]
        assert b["test_accuracy"] == a["test_accuracy"]  # test set split over the ranks, counts added
    assert two["history"][1]["loss"] < two["history"][0]["loss"]  # it trained
    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one" / "net.ckpt"), load_file(tmp_path / "two" / "net.ckpt")
    assert w1.keys() == w2.keys()
    # the first layer's bias feeds batch norm: its gradient is 0 but for rounding, which Adam scales up to steps
    # of up to lr (1e-3) either way; the batch norm's running mean follows it. Those two agree within 6 steps' lr.
    drifting = {"1.bias", "2.running_mean"}
    for name in w1.keys() - drifting:
        assert torch.allclose(w1[name].double(), w2[name].double(), rtol=1e-4, atol=1e-4), name
    for name in drifting:
        assert (w1[name].double() - w2[name].double()).abs().max() <= 6e-3, name
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["net.ckpt"]  # rank 0 wrote; state removed


def test_shares_cover_the_global_batch_and_their_weighted_losses_give_its_gradient() -> None:
    for n in (1, 2, 7, 64):
        for world in (1, 2, 3):
            parts = [shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    x, y = torch.randn(7, 5), torch.randint(3, (7,))
    reference = torch.autograd.grad(F.cross_entropy(net(x), y), net.weight)[0]
    grads = []
    for rank in range(2):
        xb, yb, weight = Replicas(torch.device("cpu"), rank, 2).local_batch(x, y)
        grads.append(torch.autograd.grad(F.cross_entropy(net(xb), yb) * weight, net.weight)[0])
    # what DDP does with them: the average over the ranks
    torch.testing.assert_close((grads[0] + grads[1]) / 2, reference, rtol=1e-6, atol=1e-7)


def small_dnat_model(transfer: Transfer, spec: MacroSpec = SMALL_LOSSY) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 9), torch.nn.BatchNorm1d(9), torch.nn.ReLU(),
                                torch.nn.Linear(9, 4))
    convert(model, spec, transfer)
    calibrate(model, [torch.randn(32, 50)])
    return model


def test_each_rank_draws_its_own_codes_reproducibly_per_epoch() -> None:
    transfer = Transfer.from_model(noisy_model(SMALL_LOSSY, seed=1), pooled=False)
    model = small_dnat_model(transfer).eval()
    x = torch.randn(16, 50)

    def outputs(rank: int, epoch: int) -> torch.Tensor:
        Replicas(torch.device("cpu"), rank, 2).reseed(model, seed=5, epoch=epoch)
        with torch.no_grad():
            return model(x)

    first = outputs(0, 0)
    assert torch.equal(outputs(0, 0), first)  # reproducible
    assert not torch.equal(outputs(1, 0), first)  # rank 1 draws other codes
    assert not torch.equal(outputs(0, 1), first)  # and every epoch new ones
    # the documented derivation: layer i of rank r in epoch e from SeedSequence([SeedSequence([seed, r, e]), i])
    seed = int(np.random.SeedSequence([5, 1, 0]).generate_state(1, np.uint64)[0] >> 1)
    assert epoch_seed(5, 1, 0) == seed
    Replicas(torch.device("cpu"), 1, 2).reseed(model, seed=5, epoch=0)
    layer0 = next(layer for _, layer in cim_layers(model))
    first_layer_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1, np.uint64)[0] >> 1)
    assert np.array_equal(layer0.macro.rng.bit_generator.random_raw(3),
                          np.random.Generator(np.random.PCG64(first_layer_seed)).bit_generator.random_raw(3))


def test_device_streams_are_reproducible_and_resume_from_their_saved_state() -> None:
    from cimlab.training.transfer import set_stream_state, stream_state

    transfer = Transfer.from_model(noisy_model(SMALL_LOSSY, seed=1), pooled=False)
    model = to_device(small_dnat_model(transfer), "cpu", stream="device").eval()
    layers = [layer for _, layer in cim_layers(model)]
    x = torch.randn(16, 50)
    with torch.no_grad():
        reseed(model, 9)
        assert all(isinstance(layer.macro.rng, TorchStream) for layer in layers)
        first = model(x)
        reseed(model, 9)
        assert torch.equal(model(x), first)  # reproducible from the seed
        states = json.loads(json.dumps([stream_state(layer.macro.rng) for layer in layers]))  # as a state file
        after = model(x)
        assert not torch.equal(after, first)  # the streams moved on
        for layer, state in zip(layers, states, strict=True):
            set_stream_state(layer.macro.rng, state)
        assert torch.equal(model(x), after)  # and continue where they were saved
    with pytest.raises(ValueError, match="another kind"):
        set_stream_state(np.random.default_rng(0), states[0])


@pytest.mark.parametrize("case", ["measured", "trimmed+corrected", "gaussian", "ideal-lossy", "conv-unsigned",
                                  "conv-ideal-exact"])
def test_a_dnat_step_on_a_device_keeps_every_tensor_there(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward on the ``meta`` device (shapes only): any table, plan, random number or temporary
    left on the CPU raises, as it would on a GPU."""
    spec = {"conv-unsigned": SMALL_ODD, "conv-ideal-exact": SMALL_TWOS}.get(case, SMALL_LOSSY)
    em = noisy_model(spec, seed=2)
    kind = "gaussian" if case == "gaussian" else "measured"
    ideal = case in ("ideal-lossy", "conv-ideal-exact")  # the second: a plain convolution (the exact shortcut)
    transfer = Transfer.ideal(spec) if ideal else Transfer.from_model(em, pooled=False, kind=kind)
    if case == "trimmed+corrected":
        from cimlab.training import ColumnTrim

        transfer = transfer.trimmed(ColumnTrim.from_model(em))
    if case.startswith("conv"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 5, 3, padding=1), torch.nn.BatchNorm2d(5), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(5 * 16, 3))
        convert(model, spec, transfer)
        calibrate(model, [torch.randn(8, 2, 4, 4)])
        x = torch.randn(6, 2, 4, 4)
    else:
        model = small_dnat_model(transfer)
        x = torch.randn(16, 50)
    if case == "trimmed+corrected":
        first = next(layer for _, layer in cim_layers(model))
        first.macro.set_correction(ColumnCorrection(torch.full((9,), 1.1, dtype=torch.float64),
                                                    torch.full((9,), 0.5, dtype=torch.float64)))

    def no_generator(self: TorchStream, seed: int, device: torch.device | str) -> None:
        self.device, self.generator = torch.device(device), None  # the meta device has none: torch's default

    monkeypatch.setattr(TorchStream, "__init__", no_generator)
    to_device(model, "meta")
    model.train()
    for _, layer in cim_layers(model):
        layer.macro.reseed(0)
        tables = [getattr(layer.macro.transfer, name) for name in Transfer.TABLES]
        assert all(t.device.type == "meta" for t in tables if t is not None)  # value_table: None when undecoded
    assert all(layer.macro.fast_exact == (case == "conv-ideal-exact") for _, layer in cim_layers(model))
    out = model(x.to("meta"))
    out.square().mean().backward()
    assert out.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


def test_cuda_where_there_is_none_is_a_typed_error(tmp_path: Path, static_model: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="--device cuda: .*CUDA") as err:
        resolve_device("cuda")
    assert err.value.code == "device"
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        resolve_device("meta")
    res = CliRunner().invoke(cli, ["train", "--task", "digits", "--mode", "dnat", "--error-model", str(static_model),
                                   "--limit", "8", "--epochs", "1", "--out", str(tmp_path / "x.ckpt"),
                                   "--device", "cuda"])
    assert res.exit_code != 0
    assert "error (device)" in res.output and "--device cuda" in res.output
    assert not (tmp_path / "x.ckpt").exists() and not list(tmp_path.iterdir())


# ---- on a GPU (skipped where there is none; never run on the machines this was written on) ----------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def plain_dnat_model(transfer: Transfer) -> torch.nn.Module:
    # no batch norm: cuDNN's and the CPU's float rounding then cannot move an activation across a code boundary
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))
    convert(model, SMALL_LOSSY, transfer)
    calibrate(model, [torch.randn(32, 50)])
    return model.train()


@needs_cuda
def test_on_a_gpu_the_pcg64_stream_reads_the_cpu_codes_and_gives_its_gradients() -> None:
    transfer = Transfer.from_model(noisy_model(SMALL_LOSSY, seed=1), pooled=False)
    cpu, gpu = plain_dnat_model(transfer), to_device(plain_dnat_model(transfer), "cuda", stream="pcg64")
    assert all(layer.macro.transfer.guide.is_cuda for _, layer in cim_layers(gpu))
    reseed(cpu, 3)
    reseed(gpu, 3)
    x = torch.randn(16, 50)
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-5, msg=name)


@needs_cuda
def test_on_a_gpu_the_device_stream_is_reproducible() -> None:
    transfer = Transfer.from_model(noisy_model(SMALL_LOSSY, seed=1), pooled=False)
    model = to_device(plain_dnat_model(transfer), "cuda").eval()
    x = torch.randn(16, 50, device="cuda")
    with torch.no_grad():
        reseed(model, 4)
        first = model(x)
        reseed(model, 4)
        assert torch.equal(model(x), first)
        assert not torch.equal(model(x), first)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_nccl_ranks_train_as_one_gpu_process(tmp_path: Path, static_model: Path) -> None:
    one = train(tmp_path / "one" / "net.ckpt", static_model, "--device", "cuda")
    two = train(tmp_path / "two" / "net.ckpt", static_model, "--device", "cuda", "--ddp", "2")
    assert two["replicas"] == {"world_size": 2, "device": "cuda", "stream": "device"}
    assert one["steps"] == two["steps"] == 6
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["train_accuracy"] == a["train_accuracy"]


@pytest.mark.slow
def test_a_failing_rank_raises_its_error_in_the_caller_and_leaves_nothing_running(tmp_path: Path) -> None:
    from cimlab.firmware_bridge.errors import ArtifactError
    from cimlab.training.api import train_run

    bad = tmp_path / "dmacem.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ArtifactError, match=r"^rank [01]: .*dmacem\.npz"):
        train_run("digits", "dnat", tmp_path / "net.ckpt", error_model=bad, ddp=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dmacem.npz"]
    # the autouse leak check then finds no rank process left

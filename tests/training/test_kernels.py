"""The C kernels and the torch path compute the same layer: forward bit for bit, backward to float32 rounding; on
every storage (differential digits included) and on paired tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import SMALL_DIFF, SMALL_LOSSY, SMALL_ODD, SMALL_TWOS, noisy_model

from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import map_layer, map_paired_layer
from cimlab.training import native
from cimlab.training.macro import ImageRows, LayerMacro, macro_matmul
from cimlab.training.transfer import ColumnDecoder, Transfer


def run(spec: MacroSpec, tr: Transfer, backend: str, seed: int, *, paired: bool = False) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    k, m = 2 * spec.rows + 3, spec.cols + 3  # several tiles, the last ones partial
    x = torch.tensor(rng.integers(0, spec.input_max + 1, (11, k)), dtype=torch.float32, requires_grad=True)
    low = -spec.weight_max if paired else spec.weight_min  # a paired layer holds both signs on a unipolar macro
    q = torch.tensor(rng.integers(low, spec.weight_max + 1, (k, m)), dtype=torch.float32, requires_grad=True)
    lm = (map_paired_layer if paired else map_layer)(spec, k, m)
    assert all(t.paired == paired for t in lm.tiles)
    macro = LayerMacro(lm, tr, backend=backend, chunk_conversions=500)
    macro.reseed(seed)
    y = macro_matmul(x, q, macro)
    y.backward(torch.tensor(rng.standard_normal((11, m)), dtype=torch.float32))
    assert macro.stats.backend == backend
    return y.detach(), x.grad, q.grad


@pytest.mark.parametrize("noise", [0.3, 0.7], ids=["packed", "wide"])
@pytest.mark.parametrize("decoded", [False, True], ids=["raw", "decoded"])
@pytest.mark.parametrize(("spec", "paired"), [(SMALL_TWOS, False), (SMALL_ODD, False), (SMALL_LOSSY, False),
                                             (SMALL_DIFF, False), (SMALL_ODD, True)],
                         ids=["twos", "unsigned-odd", "offset-clip", "differential", "paired"])
def test_c_kernels_equal_the_torch_path(spec: MacroSpec, paired: bool, decoded: bool, noise: float) -> None:
    """Every table layout (packed with few buckets: register look-ups where the CPU has them; many buckets or the
    search layout: plain look-ups), levels within and past 32, column counts that are and are not multiples of 4."""
    model = noisy_model(spec, seed=2, noise=noise)
    tr = Transfer.from_model(model, pooled=False)
    if decoded:
        tr = tr.decoded(ColumnDecoder.from_model(noisy_model(spec, seed=3, noise=0.7, draws=16)))
    y_c, gx_c, gq_c = run(spec, tr, "c", seed=5, paired=paired)
    y_t, gx_t, gq_t = run(spec, tr, "torch", seed=5, paired=paired)
    if decoded:
        assert torch.allclose(y_c, y_t, rtol=0, atol=1e-9)  # float sums in another order
    else:
        assert torch.equal(y_c, y_t)
    assert gx_c.abs().max() > 0 and gq_c.abs().max() > 0
    assert torch.allclose(gx_c, gx_t, rtol=1e-5, atol=1e-4 * float(gx_t.abs().max()))
    assert torch.allclose(gq_c, gq_t, rtol=1e-5, atol=1e-4 * float(gq_t.abs().max()))


def test_the_portable_kernels_equal_the_torch_path(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """Built without AVX-512 (plain C look-ups and sums), the kernels still compute the torch path's numbers."""
    monkeypatch.setenv("CIMLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CIMLAB_KERNEL_FLAGS", "-march=x86-64")
    monkeypatch.setenv("CIMLAB_KERNELS", "c")
    native.reset()
    try:
        spec = SMALL_TWOS
        model = noisy_model(spec, seed=2, noise=0.7)
        for tr in (Transfer.from_model(model, pooled=False),
                   Transfer.from_model(model).decoded(ColumnDecoder.from_model(model))):
            y_c, gx_c, gq_c = run(spec, tr, "c", seed=6)
            y_t, gx_t, gq_t = run(spec, tr, "torch", seed=6)
            assert torch.allclose(y_c, y_t, rtol=0, atol=1e-9)
            assert torch.allclose(gx_c, gx_t, rtol=1e-5, atol=1e-4 * float(gx_t.abs().max()))
            assert torch.allclose(gq_c, gq_t, rtol=1e-5, atol=1e-4 * float(gq_t.abs().max()))
    finally:
        monkeypatch.undo()
        native.reset()


def test_kernels_can_be_turned_off_and_are_built_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("CIMLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CIMLAB_KERNELS", "torch")
    native.reset()
    try:
        assert native.kernels() is None
        layer = LayerMacro(map_layer(SMALL_TWOS, 9, 3), Transfer.ideal(SMALL_TWOS, shortcut=False), backend="c")
        with pytest.raises(ConfigError, match="C kernels are not available"):
            layer.mac_values(torch.zeros(2, 9), torch.zeros(9, 3))
        monkeypatch.setenv("CIMLAB_KERNELS", "c")
        native.reset()
        first = native.kernels()
        assert first is not None and first.path.parent == tmp_path / "kernels"
        built = first.path.stat().st_mtime_ns
        native.reset()
        assert native.kernels().path == first.path and first.path.stat().st_mtime_ns == built  # cached
        monkeypatch.setenv("CIMLAB_KERNELS", "fast")
        native.reset()
        with pytest.raises(ConfigError, match="CIMLAB_KERNELS"):
            native.kernels()
    finally:
        monkeypatch.undo()
        native.reset()


@pytest.mark.parametrize(("kernel", "stride", "dilation"), [((3, 3), (1, 1), (1, 1)), ((2, 3), (2, 1), (1, 2))],
                         ids=["3x3", "strided-dilated"])
@pytest.mark.parametrize(("spec", "paired"), [(SMALL_TWOS, False), (SMALL_ODD, True)], ids=["twos", "paired"])
def test_images_read_in_place_equal_their_unfolded_matrix(spec: MacroSpec, paired: bool, kernel: tuple[int, int],
                                                          stride: tuple[int, int], dilation: tuple[int, int]) -> None:
    """The C kernels reading a convolution's images in place (``ImageRows``) give the torch path's outputs on the
    unfolded matrix (``torch.nn.functional.unfold``), and its input gradient folded back (``fold``) into the
    images: the same codes, the same uniforms."""
    rng = np.random.default_rng(7)
    images = ImageRows(3, 5, 9, 8, kernel, stride, dilation)
    k, m = images.n_rows, spec.cols + 3
    x = torch.tensor(rng.integers(0, spec.input_max + 1, images.shape), dtype=torch.float32, requires_grad=True)
    low = -spec.weight_max if paired else spec.weight_min
    q0 = torch.tensor(rng.integers(low, spec.weight_max + 1, (k, m)), dtype=torch.float32)
    g = torch.tensor(rng.standard_normal((images.n_vectors, m)), dtype=torch.float32)
    tr = Transfer.from_model(noisy_model(spec, seed=2, noise=0.3), pooled=False)
    lm = (map_paired_layer if paired else map_layer)(spec, k, m)
    results = {}
    for backend in ("c", "torch"):
        macro = LayerMacro(lm, tr, backend=backend, chunk_conversions=500)
        macro.reseed(3)
        q = q0.clone().requires_grad_(True)
        xi = x.detach().clone().requires_grad_(True)
        if backend == "c":
            assert macro.reads_images(xi)
            y = macro_matmul(xi, q, macro, images)
        else:
            assert not macro.reads_images(xi)
            y = macro_matmul(images.unfold(xi), q, macro)
        y.backward(g)
        results[backend] = (y.detach(), xi.grad, q.grad)
    (y_c, gx_c, gq_c), (y_t, gx_t, gq_t) = results["c"], results["torch"]
    assert torch.equal(y_c, y_t)
    assert gx_c.shape == images.shape and gx_c.abs().max() > 0
    assert torch.allclose(gx_c, gx_t, rtol=1e-5, atol=1e-4 * float(gx_t.abs().max()))
    assert torch.allclose(gq_c, gq_t, rtol=1e-5, atol=1e-4 * float(gq_t.abs().max()))
    with pytest.raises(ShapeError, match="images"):
        macro_matmul(x[:, :, 1:], q0, LayerMacro(lm, tr, backend="c"), images)

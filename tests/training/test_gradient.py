"""The statistical gradient: the backward pass equals the derivative of the smoothed expected transfer.

A numpy reference computes the expected MAC output
``F = sum g * (adc_lsb * sum_{p,g,k} pw sw m~(s) - offset sum x)`` of continuous input slices and weight
digits, and central finite differences of F along the straight-through directions (an input code change spread
evenly over its slices, a weight change over its digits with the sign of their place value) must equal the
gradients the layer's backward pass returns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import SMALL_DIFF, SMALL_LOSSY, SMALL_ODD, SMALL_TWOS, ideal_model, noisy_model

from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import map_layer
from cimlab.training.macro import LayerMacro, macro_matmul
from cimlab.training.transfer import Transfer

EPS = 1e-4


def expected_output(macro: LayerMacro, planes: np.ndarray, digits: np.ndarray, x: np.ndarray,
                    g: np.ndarray) -> float:
    """F for continuous slices planes [N, P, K], digits [K, S, M] and codes x [N, K] (offset term)."""
    spec = macro.spec
    tr = macro.transfer
    R = spec.rows_per_conversion
    pw, sw = spec.plane_weights().astype(float), spec.slice_weights().astype(float)
    total = 0.0
    for t in macro.layer_map.tiles:
        g0, g1 = t.group_span(spec)
        rows = np.zeros(((g1 - g0) * R,), dtype=bool)
        off = t.row_offset(spec)
        pl = np.zeros((planes.shape[0], spec.n_planes, (g1 - g0) * R))
        pl[:, :, off : off + t.n_rows] = planes[:, :, t.row0 : t.row1]
        dg = np.zeros(((g1 - g0) * R, spec.n_slices, t.n_cols))
        dg[off : off + t.n_rows] = digits[t.row0 : t.row1, :, t.col0 : t.col1]
        del rows
        levels = np.einsum("npgr,grkm->npgkm", pl.reshape(pl.shape[0], spec.n_planes, g1 - g0, R),
                           dg.reshape(g1 - g0, R, spec.n_slices, t.n_cols))
        cols = t.physical_columns(spec)
        m = tr.expected(levels, cols)  # of the decoded values, when the transfer has a decoder
        out = spec.adc_lsb * np.einsum("npgkm,p,k->nm", m, pw, sw)
        out -= spec.weight_offset * x[:, t.row0 : t.row1].sum(axis=1, keepdims=True)
        total += float((g[:, t.col0 : t.col1] * out).sum())
    return total


def stored_digits(spec: MacroSpec, q: np.ndarray) -> np.ndarray:
    return spec.weights_to_slices(q).astype(float)  # [K, S, M]


def check_gradients(spec: MacroSpec, transfer: Transfer, k: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    macro = LayerMacro(map_layer(spec, k, m), transfer, chunk_conversions=257)  # many chunks
    n = 3
    x = rng.integers(0, spec.input_max + 1, (n, k))
    x[rng.random((n, k)) < 0.4] = 0  # sparse inputs keep many levels inside the ADC range
    q = rng.integers(spec.weight_min, spec.weight_max + 1, (k, m))
    g = rng.standard_normal((n, m))
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    qt = torch.tensor(q, dtype=torch.float32, requires_grad=True)
    macro.reseed(0)
    y = macro_matmul(xt, qt, macro)
    y.backward(torch.tensor(g, dtype=torch.float32))
    gx, gq = xt.grad.double().numpy(), qt.grad.double().numpy()
    assert np.abs(gx).max() > 0 and np.abs(gq).max() > 0

    planes = spec.inputs_to_planes(x).astype(float)  # [N, P, K]
    digits = stored_digits(spec, q)
    pw, sw = spec.plane_weights().astype(float), spec.slice_weights().astype(float)
    for n0, r0 in [(0, 0), (1, k // 2), (2, k - 1), (int(rng.integers(n)), int(rng.integers(k)))]:
        def f(e: float) -> float:
            p2 = planes.copy()
            p2[n0, :, r0] += e / pw.sum()
            x2 = x.astype(float).copy()
            x2[n0, r0] += e
            return expected_output(macro, p2, digits, x2, g)
        fd = (f(EPS) - f(-EPS)) / (2 * EPS)
        assert gx[n0, r0] == pytest.approx(fd, rel=1e-3, abs=1e-3), (n0, r0)
    for r0, m0 in [(0, 0), (k - 1, m - 1), (int(rng.integers(k)), int(rng.integers(m)))]:
        def f(e: float) -> float:
            d2 = digits.copy()
            d2[r0, :, m0] += np.sign(sw) * e / np.abs(sw).sum()
            return expected_output(macro, planes, d2, x.astype(float), g)
        fd = (f(EPS) - f(-EPS)) / (2 * EPS)
        assert gq[r0, m0] == pytest.approx(fd, rel=1e-3, abs=1e-3), (r0, m0)


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "per-column"])
@pytest.mark.parametrize("spec", [SMALL_TWOS, SMALL_ODD, SMALL_LOSSY, SMALL_DIFF],
                         ids=["twos", "unsigned-odd", "offset-clip", "differential-clip"])
def test_backward_equals_finite_differences_of_the_expected_transfer(spec: MacroSpec, pooled: bool) -> None:
    model = noisy_model(spec, seed=spec.rows, observed=0.8)
    transfer = Transfer.from_model(model, pooled=pooled)
    check_gradients(spec, transfer, k=spec.rows + 7, m=spec.cols + 3, seed=1)


def test_backward_of_the_ideal_clipping_transfer_matches_finite_differences() -> None:
    check_gradients(SMALL_ODD, Transfer.ideal(SMALL_ODD), k=30, m=7, seed=2)


def test_ideal_lossless_transfer_gives_the_plain_straight_through_gradients() -> None:
    """With slope 1 everywhere the spreading rules reduce to dL/dx = g W^T and dL/dW = x^T g."""
    spec = SMALL_TWOS
    rng = np.random.default_rng(3)
    macro = LayerMacro(map_layer(spec, 45, 11), Transfer.from_model(ideal_model(spec)), chunk_conversions=1000)
    x = torch.tensor(rng.integers(0, 3, (4, 45)), dtype=torch.float32, requires_grad=True)  # levels stay unclipped
    q = torch.tensor(rng.integers(-8, 8, (45, 11)), dtype=torch.float32, requires_grad=True)
    g = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    macro_matmul(x, q, macro).backward(g)
    assert torch.allclose(x.grad, g @ q.detach().T, atol=1e-4)
    assert torch.allclose(q.grad, x.detach().T @ g, atol=1e-4)


@pytest.mark.parametrize("spec", [SMALL_TWOS, SMALL_ODD], ids=["lsb1", "lsb12/7"])
def test_slope_table_is_the_derivative_of_the_smoothed_transfer(spec: MacroSpec) -> None:
    tr = Transfer.from_model(noisy_model(spec, seed=5), pooled=False)
    levels = np.arange(spec.n_levels, dtype=float)
    for j in (0, spec.physical_cols - 1):
        fd = (tr.expected(levels + EPS, j) - tr.expected(levels - EPS, j)) / (2 * EPS)
        idx = torch.tensor(np.full(1, j), dtype=torch.int32)
        slope = tr.slope(torch.tensor(levels[:, None], dtype=torch.float32), idx).numpy()[:, 0]
        assert np.allclose(slope, fd, atol=1e-6)


def test_smoothing_makes_a_coarse_adc_staircase_differentiable() -> None:
    """adc_lsb = 4 levels: the raw staircase is flat between steps, the smoothed slope is 1/4 inside the range."""
    spec = MacroSpec(rows=32, cols=4, weight_storage="offset", cell_bits=2, input_slice_bits=2,
                     rows_per_conversion=32, adc_bits=6, adc_full_scale=252)
    tr = Transfer.ideal(spec)
    levels = torch.arange(8, 240, dtype=torch.float32)[:, None]
    slope = tr.slope(levels, torch.zeros(1, dtype=torch.int32))
    assert torch.allclose(slope, torch.full_like(slope, 0.25))
    top = torch.tensor([[260.0]])
    assert tr.slope(top, torch.zeros(1, dtype=torch.int32)).item() == 0.0  # clipped


@pytest.mark.parametrize("spec", [SMALL_TWOS, SMALL_LOSSY], ids=["twos", "offset-clip"])
def test_backward_of_a_trimmed_chip_equals_finite_differences_of_its_trimmed_expected_transfer(spec: MacroSpec) -> None:
    from cimlab.training.transfer import ColumnTrim

    rng = np.random.default_rng(4)
    J = spec.physical_cols
    trim = ColumnTrim(rng.normal(0.0, 0.5, J), rng.uniform(0.8, 1.25, J))
    raw = Transfer.from_model(noisy_model(spec, seed=6), pooled=False)
    transfer = raw.trimmed(trim)
    levels = np.linspace(-2.0, spec.s_max + 2.0, 57)
    for j in (0, J // 2, J - 1):  # a line decoder moves the expected transfer by the same line
        want = (raw.expected(levels, j) - trim.offset[j]) * trim.scale[j]
        assert np.allclose(transfer.expected(levels, j), want)
    check_gradients(spec, transfer, k=spec.rows + 5, m=spec.cols + 2, seed=3)


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "per-column"])
def test_backward_through_a_table_decoder_equals_finite_differences_of_the_decoded_expected_transfer(
        pooled: bool) -> None:
    from cimlab.training.transfer import ColumnDecoder

    spec = SMALL_TWOS
    model = noisy_model(spec, seed=11, noise=0.8)
    decoder = ColumnDecoder.from_model(noisy_model(spec, seed=12, noise=0.8, draws=16))  # a short characterization
    transfer = Transfer.from_model(model, pooled=pooled).decoded(decoder)
    probs = transfer.probs[0 if pooled else 3]  # [L, C]: the decoded mean is the code distribution's
    assert np.allclose(transfer.mean[3], probs @ decoder.table[3])
    check_gradients(spec, transfer, k=spec.rows + 5, m=spec.cols + 2, seed=4)

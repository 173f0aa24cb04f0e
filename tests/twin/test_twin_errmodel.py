"""The error-model file format (cimlab.firmware_bridge.errmodel): round trip, validation, fallback rule, sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cimlab.firmware_bridge.errmodel import FORMAT, CodeSampler, ErrorModel, count_conversions, counts_sha256
from cimlab.firmware_bridge.files import text_sha256
from cimlab.firmware_bridge.errors import ArtifactError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec

SPEC = MacroSpec(rows=32, cols=3, rows_per_conversion=8)


def _model(seed: int = 0, n: int = 4000) -> ErrorModel:
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, SPEC.s_max + 1, (n, SPEC.physical_cols))
    codes = np.clip(levels + rng.integers(-1, 2, levels.shape), 0, SPEC.adc_max)
    return ErrorModel.from_conversions(SPEC, levels, codes, chip_id="chip-7",
                                       conditions={"vdd_mv": 800, "temp_c": 25.0},
                                       provenance={"tool": "test"})


def test_save_load_round_trip_is_atomic(tmp_path: Path) -> None:
    model = _model()
    path = model.save(tmp_path / "m.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # no temporary left behind
    back = ErrorModel.load(path)
    assert back.spec == SPEC
    np.testing.assert_array_equal(back.counts, model.counts)
    assert back.counts.dtype == np.int64
    assert (back.chip_id, back.conditions, back.provenance) == ("chip-7", {"vdd_mv": 800, "temp_c": 25.0},
                                                                 {"tool": "test"})
    # readable with plain numpy, no pickle
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].item())
    assert meta["format"] == FORMAT and meta["spec"] == SPEC.to_dict()


def test_counting_accepts_mac_raw_layout() -> None:
    rng = np.random.default_rng(1)
    levels = rng.integers(0, SPEC.s_max + 1, (5, *SPEC.raw_shape))
    codes = np.minimum(levels, SPEC.adc_max)
    counts = count_conversions(SPEC, levels, codes)
    assert counts.shape == (SPEC.physical_cols, SPEC.n_levels, SPEC.n_codes)
    assert counts.sum() == levels.size
    # column j = k * cols + c
    k, c = 2, 1
    j = k * SPEC.cols + c
    expected = np.bincount(levels[..., k, c].ravel(), minlength=SPEC.n_levels)
    np.testing.assert_array_equal(counts[j].sum(axis=1), expected)
    with pytest.raises(ShapeError, match="span"):
        count_conversions(SPEC, levels + SPEC.s_max, codes)
    with pytest.raises(ShapeError, match="last axes"):
        count_conversions(SPEC, levels[..., :2], codes[..., :2])


def _write(path: Path, **arrays: object) -> Path:
    """An .npz whose meta (when it is text) carries a correct meta_sha256 and counts_sha256, so each case reaches
    the check it is about."""
    meta = arrays.get("meta")
    if isinstance(meta, np.ndarray) and meta.dtype.kind == "U" and meta.shape == ():
        text = str(meta.item())
        try:
            obj = json.loads(text)
            counts = arrays.get("counts")
            if isinstance(obj, dict) and isinstance(counts, np.ndarray) and counts.dtype.kind in "iu":
                obj.setdefault("counts_sha256", counts_sha256(counts))
                text = json.dumps(obj)
        except json.JSONDecodeError:
            pass
        arrays = {**arrays, "meta": np.array(text), "meta_sha256": np.array(text_sha256(text))}
    np.savez(path, **arrays)
    return path


def _meta(**changes: object) -> np.ndarray:
    meta = {"format": FORMAT, "version": 2, "spec": SPEC.to_dict(), "conditions": {}, "chip_id": "x",
            "provenance": {}}
    meta.update(changes)
    return np.array(json.dumps(meta))


GOOD = np.zeros((SPEC.physical_cols, SPEC.n_levels, SPEC.n_codes), dtype=np.int64)


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"meta": _meta()}, ["missing array 'counts'"]),
        ({"counts": GOOD}, ["missing array 'meta'"]),
        ({"counts": GOOD.astype(np.float64), "meta": _meta()}, ["integer", "float64"]),
        ({"counts": GOOD[:, :5], "meta": _meta()}, ["shape", "(12, 9, 32)"]),
        ({"counts": GOOD - 1, "meta": _meta()}, ["negative"]),
        ({"counts": GOOD, "meta": np.array("{not json")}, ["JSON"]),
        ({"counts": GOOD, "meta": _meta(format="other")}, ["format"]),
        ({"counts": GOOD, "meta": _meta(version=99)}, ["version"]),
        ({"counts": GOOD, "meta": _meta(spec={"rows": 0})}, ["MacroSpec", "rows"]),
        ({"counts": GOOD, "meta": _meta(conditions=[1])}, ["conditions"]),
        ({"counts": GOOD, "meta": np.array([1, 2])}, ["0-d text"]),
        ({"counts": np.array([object()], dtype=object), "meta": _meta()}, ["holds objects"]),
        ({"counts": GOOD, "meta": _meta(counts_sha256="0" * 64)}, ["counts_sha256"]),
        ({"counts": GOOD, "meta": _meta(), "meta_sha256": np.array("0" * 64)}, ["meta_sha256"]),
    ],
)
def test_invalid_files_raise_artifact_errors(tmp_path: Path, arrays: dict[str, object], words: list[str]) -> None:
    if "meta_sha256" in arrays:  # the stored hash is what is wrong: write it as given
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)
    else:
        path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ArtifactError) as info:
        ErrorModel.load(path)
    for word in words:
        assert word in str(info.value)
    assert "bad.npz" in str(info.value)


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path: Path) -> None:
    huge = np.zeros((SPEC.physical_cols * 64, SPEC.n_levels, SPEC.n_codes * 64), dtype=np.int64)  # 75 MB, 80 kB zip
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, counts=huge, meta=_meta(), meta_sha256=np.array(text_sha256(str(_meta().item()))))
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ArtifactError, match=r"array 'counts' declares [\d,]+ bytes, more than the"):
        ErrorModel.load(path)


def test_a_text_file_is_not_a_model_and_gets_no_pickle_advice(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("counts,meta\n1,2\n", encoding="utf-8")
    with pytest.raises(ArtifactError, match="not a readable .npz") as info:
        ErrorModel.load(path)
    assert "allow_pickle" not in str(info.value)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such file"):
        ErrorModel.load(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(ArtifactError, match="not a readable"):
        ErrorModel.load(junk)


def test_fallback_rule() -> None:
    counts = GOOD.copy()
    counts[0, 3, 5] = 10  # column 0 saw level 3 read as code 5
    counts[1, 3, 4] = 30  # column 1 saw it as code 4
    model = ErrorModel(SPEC, counts)
    p = model.probabilities()
    np.testing.assert_allclose(p[0, 3, 5], 1.0)  # observed rows are kept as measured
    np.testing.assert_allclose(p[2, 3, [4, 5]], [0.75, 0.25])  # unobserved column: pooled over columns
    ideal = SPEC.ideal_codes(np.arange(SPEC.n_levels))
    for s in (0, 7):  # level nobody saw: the ideal code
        assert p[2, s, ideal[s]] == 1.0
    assert model.observed.sum() == 2


def test_merge_adds_counts() -> None:
    a, b = _model(1), _model(2)
    np.testing.assert_array_equal(a.merge(b).counts, a.counts + b.counts)


def test_merge_refuses_another_macro() -> None:
    other = ErrorModel.empty(SPEC.replace(cols=4))
    with pytest.raises(ArtifactError, match="different MacroSpecs"):
        _model(1).merge(other)


def test_sampler_names_a_bad_table() -> None:
    with pytest.raises(ShapeError, match=r"expected \[columns 12"):
        CodeSampler(SPEC, np.ones((3, SPEC.n_levels, SPEC.n_codes), dtype=np.int64))
    counts = np.ones((SPEC.physical_cols, SPEC.n_levels, SPEC.n_codes), dtype=np.int64)
    counts[5, 2] = 0
    with pytest.raises(ShapeError, match="column 5, level 2 has no counts"):
        CodeSampler(SPEC, counts)


def test_sampler_scalar_equals_vectorised_and_matches_probabilities() -> None:
    model = _model(3, n=20000)
    sampler = model.sampler()
    rng = np.random.default_rng(4)
    levels = rng.integers(0, SPEC.s_max + 1, (300, SPEC.physical_cols))
    bits = rng.integers(0, 2**32, levels.shape, dtype=np.uint32)
    codes = sampler.sample_bits(levels, bits)
    for i in range(0, 300, 37):
        for j in range(SPEC.physical_cols):
            assert codes[i, j] == sampler.sample_one(int(levels[i, j]), j, int(bits[i, j]))
    # distribution of one row: 200k draws against its probabilities
    n = 200_000
    lv = np.full((n, SPEC.physical_cols), 4)
    drawn = sampler.sample(lv, np.random.default_rng(5))
    p = model.probabilities()[5, 4]
    freq = np.bincount(drawn[:, 5], minlength=SPEC.n_codes) / n
    assert np.all(freq[p == 0] == 0)
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_sampler_draws_the_same_codes_for_a_transposed_levels_array() -> None:
    sampler = _model(3, n=20000).sampler()
    rng = np.random.default_rng(6)
    levels = rng.integers(0, SPEC.s_max + 1, (SPEC.physical_cols, 500)).T  # F-ordered, as ideal_levels gives
    bits = rng.integers(0, 2**32, levels.shape, dtype=np.uint32)
    codes = sampler.sample_bits(levels, bits)
    assert np.array_equal(codes, sampler.sample_bits(np.ascontiguousarray(levels), bits))
    assert not np.array_equal(codes, sampler.mode[levels * SPEC.physical_cols + np.arange(SPEC.physical_cols)])


def test_sampler_extremes_of_the_uniform() -> None:
    counts = GOOD.copy()
    counts[:, :, 0] = 1
    counts[:, :, SPEC.adc_max] = 1
    sampler = CodeSampler(SPEC, counts)
    levels = np.zeros((2, SPEC.physical_cols), dtype=np.int64)
    bits = np.array([[0] * SPEC.physical_cols, [2**32 - 1] * SPEC.physical_cols], dtype=np.uint32)
    codes = sampler.sample_bits(levels, bits)
    assert (codes[0] == 0).all() and (codes[1] == SPEC.adc_max).all()
    with pytest.raises(ShapeError):
        sampler.sample_bits(levels + SPEC.s_max + 1, bits)


def test_rows_with_huge_totals_are_rescaled() -> None:
    counts = GOOD.copy()
    counts[:, :, 1] = 3 * 2**40
    counts[:, :, 2] = 2**40
    sampler = CodeSampler(SPEC, counts)
    drawn = sampler.sample(np.full((40000, SPEC.physical_cols), 2), np.random.default_rng(0))
    assert set(np.unique(drawn)) == {1, 2}
    assert abs(np.mean(drawn == 1) - 0.75) < 0.01

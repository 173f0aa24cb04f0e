"""The measurement store: atomic batches, foreign and unreadable files, no silent overwrite."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cimlab.characterize.store import STORE_NAME, BatchRecord, Condition, MeasurementStore
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError

SHAPE = (4, 3, 5)
META = {"plan_digest": "abc", "spec": {"rows": 1}}
REC = BatchRecord(vectors=2, conversions=10_000, wall_s=0.01, mac_s=0.005, chip_cycles=100, chip_energy_fj=5)


def make(tmp_path: Path, name: str = "run") -> MeasurementStore:
    return MeasurementStore.create(tmp_path / name, META, [Condition("vdd700mV", 700), Condition("vdd800mV", 800)])


def test_batches_add_counts_and_are_marked_done(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, SHAPE)
    b = rng.integers(0, 3, SHAPE)
    with make(tmp_path) as store:
        store.commit_batch(0, 0, a, REC)
        store.commit_batch(0, 3, b, REC)
        store.commit_batch(1, 0, b, REC)
        assert store.done_batches(0) == {0, 3} and store.done_batches(1) == {0}
        np.testing.assert_array_equal(store.counts(0, SHAPE), a + b)
        np.testing.assert_array_equal(store.counts(1, SHAPE), b)
        assert [c.label for c in store.conditions()] == ["vdd700mV", "vdd800mV"]
        assert store.meta["plan_digest"] == "abc" and store.meta["format"] == "cimlab.measurements"
        assert store.batch_records(0)[1]["batch"] == 3
        assert store.consolidate(0, SHAPE) == int(np.count_nonzero(a + b))
    # readable with plain sqlite, the transfer view included
    with sqlite3.connect(tmp_path / "run" / STORE_NAME) as conn:
        total = conn.execute("SELECT SUM(n) FROM counts WHERE cond_id = 0").fetchone()[0]
        view = conn.execute("SELECT SUM(n) FROM transfer WHERE cond_id = 0").fetchone()[0]
    conn.close()
    assert total == view == int((a + b).sum())


def test_a_batch_cannot_be_counted_twice_and_a_failed_commit_leaves_nothing(tmp_path: Path) -> None:
    ones = np.ones(SHAPE, dtype=np.int64)
    with make(tmp_path) as store:
        store.commit_batch(0, 1, ones, REC)
        with pytest.raises(ArtifactError, match="batch 1 of condition 0 is already"):
            store.commit_batch(0, 1, ones, REC)
        np.testing.assert_array_equal(store.counts(0, SHAPE), ones)
        with pytest.raises(ArtifactError, match="FOREIGN KEY"):
            store.commit_batch(5, 0, ones, REC)  # no condition 5: the foreign key fails inside the transaction
        assert store.done_batches(5) == set()
        np.testing.assert_array_equal(store.counts(0, SHAPE), ones)


def test_tallies_must_fit_the_batch(tmp_path: Path) -> None:
    with make(tmp_path) as store:
        too_many = np.zeros(SHAPE, dtype=np.int64)
        too_many[1, 2, 3] = REC.conversions + 1
        with pytest.raises(ConfigError, match="do not fit its 10000 conversions"):
            store.commit_batch(0, 0, too_many, REC)
        with pytest.raises(ConfigError, match="do not fit"):
            store.commit_batch(0, 0, -np.ones(SHAPE, dtype=np.int64), REC)
        assert store.done_batches(0) == set()


def test_existing_store_or_files_are_never_overwritten(tmp_path: Path) -> None:
    make(tmp_path).close()
    make(tmp_path).close()  # a store without a measured batch (a refused run's) holds nothing: it is replaced
    with make(tmp_path) as store:
        store.commit_batch(0, 0, np.zeros((1, 1, 1), np.int64), REC)
    with pytest.raises(ArtifactError, match="already holds a measurement store; pass --resume"):
        make(tmp_path)
    with MeasurementStore.open(tmp_path / "run") as store:
        assert store.done_batches(0) == {0}
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match=r"not empty \(notes.txt\)"):
        make(tmp_path, "other")
    assert (other / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        make(tmp_path, "afile")
    with pytest.raises(ConfigError, match="unique labels"):
        MeasurementStore.create(tmp_path / "dup", META, [Condition("a"), Condition("a")])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_foreign_and_unreadable_stores_are_refused_without_modification(tmp_path: Path) -> None:
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(ArtifactError, match="holds no measurement store"):
        MeasurementStore.open(missing)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / STORE_NAME).write_bytes(b"this is not sqlite at all" * 100)
    before = digest(garbage / STORE_NAME)
    with pytest.raises(ArtifactError, match="not a readable SQLite database"):
        MeasurementStore.open(garbage)
    assert digest(garbage / STORE_NAME) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    conn = sqlite3.connect(foreign / STORE_NAME)
    conn.execute("CREATE TABLE results (x INTEGER)")
    conn.commit()
    conn.close()
    before = digest(foreign / STORE_NAME)
    with pytest.raises(ArtifactError, match=r"not a cimlab measurement store \(missing tables"):
        MeasurementStore.open(foreign)
    assert digest(foreign / STORE_NAME) == before
    assert not (foreign / (STORE_NAME + "-wal")).exists()


def test_other_format_or_version_is_refused(tmp_path: Path) -> None:
    make(tmp_path).close()
    path = tmp_path / "run" / STORE_NAME
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ArtifactError, match="format version 99; this cimlab reads 1"):
        MeasurementStore.open(tmp_path / "run")
    conn = sqlite3.connect(path)
    conn.execute("""UPDATE meta SET value = '"someone.else"' WHERE key = 'format'""")
    conn.commit()
    conn.close()
    with pytest.raises(ArtifactError, match="format 'someone.else'"):
        MeasurementStore.open(tmp_path / "run")


def test_an_edited_meta_value_is_refused(tmp_path: Path) -> None:
    make(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "run" / STORE_NAME)
    conn.execute("""UPDATE meta SET value = '"2020-01-01T00:00:00.000+00:00"' WHERE key = 'created_at'""")
    conn.commit()
    conn.close()
    with pytest.raises(ArtifactError, match="do not match meta.meta_sha256"):
        MeasurementStore.open(tmp_path / "run")


def test_tallies_outside_the_shape_are_an_artifact_error(tmp_path: Path) -> None:
    with make(tmp_path) as store:
        store.commit_batch(0, 0, np.ones((6, 3, 5), dtype=np.int64), REC)
        with pytest.raises(ArtifactError, match="batch 0 of condition 0 has tallies outside the MacroSpec"):
            store.counts(0, SHAPE)

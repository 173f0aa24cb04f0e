"""The measurement store: one SQLite file in the sweep's folder, appended batch by batch, crash-safe.

``DIR/measurements.sqlite`` (WAL journal) holds::

    meta(key, value)              JSON values: format, format_version, created_at, software_version, hello (chip
                                  identity), spec (MacroSpec), plan (+ plan_digest), seed, conditions, link,
                                  instrument, counts_layout, meta_sha256 (SHA-256 of the other rows: an
                                  edited or damaged meta is refused at open, as are values of the wrong type)
    conditions(cond_id, label, vdd_mv, temp_c, spec_json)       one row per supply/temperature condition
    batches(cond_id, batch, finished_at, vectors, conversions, wall_s, mac_s, chip_cycles, chip_energy_fj,
            supply_v, supply_a_mean, supply_samples, supply_energy_j, cells, hits)
                                  one row per finished batch (s, fJ, V, A, J) with its exact tallies: ``cells``
                                  and ``hits`` are little-endian int64 arrays (numpy ``frombuffer(blob, "<i8")``);
                                  cell ``(j * n_levels + s) * n_codes + code`` was hit ``hits`` times
    counts(cond_id, j, s, code, n)  the same tallies summed over batches, one row per (column, level, code):
                                  written when a condition completes (derived; the batch rows are the record)
    events(t, kind, detail)       created / start / resume / condition / interrupted / finished, UTC times
    transfer (view)               mean code and count per (cond_id, j, s), from ``counts``

A batch is one INSERT of one row, its own transaction: a process killed at any moment (kill -9 included) leaves
either the whole batch or none of it, and a resumed sweep redoes exactly the batches without a row. One row per
batch also keeps the cost of crash-safe writing constant per batch, whatever the number of cells it touched.
Read it with ``sqlite3 DIR/measurements.sqlite 'select * from transfer'`` (after the sweep) or with numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError

STORE_NAME = "measurements.sqlite"
FORMAT = "cimlab.measurements"
FORMAT_VERSION = 1
BUSY_TIMEOUT_S = 10.0
"""How long a statement waits for a lock held by another connection (a reader) before failing, seconds."""

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE conditions (
    cond_id INTEGER PRIMARY KEY, label TEXT NOT NULL UNIQUE, vdd_mv INTEGER, temp_c REAL, spec_json TEXT NOT NULL);
CREATE TABLE batches (
    cond_id INTEGER NOT NULL REFERENCES conditions(cond_id), batch INTEGER NOT NULL, finished_at TEXT NOT NULL,
    vectors INTEGER NOT NULL, conversions INTEGER NOT NULL, wall_s REAL NOT NULL, mac_s REAL NOT NULL,
    chip_cycles INTEGER NOT NULL, chip_energy_fj INTEGER NOT NULL,
    supply_v REAL, supply_a_mean REAL, supply_samples INTEGER, supply_energy_j REAL,
    cells BLOB NOT NULL, hits BLOB NOT NULL,
    PRIMARY KEY (cond_id, batch));
CREATE TABLE counts (
    cond_id INTEGER NOT NULL, j INTEGER NOT NULL, s INTEGER NOT NULL, code INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (cond_id, j, s, code)) WITHOUT ROWID;
CREATE TABLE events (t TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE VIEW transfer AS
    SELECT cond_id, j, s, CAST(SUM(n * code) AS REAL) / SUM(n) AS mean_code, SUM(n) AS n
    FROM counts GROUP BY cond_id, j, s;
"""

COUNTS_LAYOUT = (
    "batches.cells and batches.hits: little-endian unsigned arrays of equal length; cell (j * n_levels + s) * "
    "n_codes + code was hit hits times in that batch; cells are uint32 when J * n_levels * n_codes <= 2**32 (else "
    "uint64), hits are uint32 when the batch's conversions < 2**32 (else uint64)"
)


def _cell_dtype(n_cells: int) -> np.dtype:
    return np.dtype("<u4") if n_cells <= 2**32 else np.dtype("<u8")


def _hit_dtype(conversions: int) -> np.dtype:
    return np.dtype("<u4") if conversions < 2**32 else np.dtype("<u8")


F = TypeVar("F", bound=Callable[..., Any])


def _read_errors(method: F) -> F:
    """A store read whose SQLite or JSON failure (a damaged file) becomes an ArtifactError naming the store."""

    @wraps(method)
    def wrapper(self: MeasurementStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as err:
            raise ArtifactError(f"{self.path}: the store is damaged ({method.__name__}): {err}") from err
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ArtifactError(f"{self.path}: a meta value is not JSON ({method.__name__}): {err}") from err
        except (TypeError, ValueError) as err:
            if isinstance(err, ArtifactError | ConfigError):
                raise
            raise ArtifactError(f"{self.path}: a value has the wrong type ({method.__name__}): {err}") from err

    return wrapper  # type: ignore[return-value]


def utc_now() -> str:
    """ISO-8601 UTC timestamp with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Condition:
    """One measurement condition.

    Attributes:
        label: unique name, e.g. ``vdd800mV`` or ``nominal``.
        vdd_mv: supply setpoint, mV (None: left as the chip is).
    """

    label: str
    vdd_mv: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


@dataclass(frozen=True)
class BatchRecord:
    """What one finished batch cost and measured (one ``batches`` row)."""

    vectors: int
    conversions: int
    wall_s: float
    """Whole batch: weights, MACs, tallies (s)."""
    mac_s: float
    """The MAC_RAW call alone (s); the supply energy covers this window."""
    chip_cycles: int
    chip_energy_fj: int
    supply_v: float | None = None
    supply_a_mean: float | None = None
    supply_samples: int | None = None
    supply_energy_j: float | None = None


class MeasurementStore:
    """A sweep's store (see the module docstring). Use ``create`` or ``open``, then ``close`` (or ``with``)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    # ---- opening ------------------------------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed batch survives the process being killed; a power cut may lose the
            # last commits, never half of one (a lost batch is simply redone on resume)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    def create(
        cls, folder: str | os.PathLike, meta: Mapping[str, Any], conditions: list[Condition]
    ) -> MeasurementStore:
        """Make a new store in ``folder`` (created if missing). The folder must not hold other files, nor a store
        with measurements; a store without a single committed batch (left by a run refused before it measured, or
        killed right after it started) holds nothing to lose and is replaced."""
        d = Path(folder)
        path = d / STORE_NAME
        if path.exists():
            if _committed_batches(path) > 0:
                raise ArtifactError(
                    f"{d} already holds a measurement store; pass --resume to continue it, or choose another --out"
                )
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        if d.exists():
            if not d.is_dir():
                raise ArtifactError(f"--out {d} exists and is not a folder")
            # a leftover of a creation that was killed is ours and incomplete: it does not count
            others = sorted(p.name for p in d.iterdir() if not p.name.startswith(STORE_NAME + ".creating"))
            if others:
                raise ArtifactError(
                    f"--out {d} is not empty ({', '.join(others[:5])}); "
                    "refusing to write a store beside other files"
                )
        labels = [c.label for c in conditions]
        if len(set(labels)) != len(labels) or not labels:
            raise ConfigError(f"conditions need unique labels, got {labels}")
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (STORE_NAME + ".creating")
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        conn = cls._connect(tmp)
        try:
            conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
            with _transaction(conn):
                rows = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_at": utc_now(),
                        "counts_layout": COUNTS_LAYOUT, **meta}
                texts = {k: json.dumps(v) for k, v in rows.items()}
                texts[META_HASH_KEY] = json.dumps(meta_digest(texts))
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(texts.items()))
                conn.executemany(
                    "INSERT INTO conditions (cond_id, label, vdd_mv, temp_c, spec_json) VALUES (?, ?, ?, NULL, ?)",
                    [(i, c.label, c.vdd_mv, json.dumps(c.to_dict())) for i, c in enumerate(conditions)],
                )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        # the store appears under its name only once complete
        for suffix in ("-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        os.replace(tmp, path)
        store = cls.open(d)
        store.log("created", f"plan {meta.get('plan_digest', '?')}")
        return store

    @classmethod
    def open(cls, folder: str | os.PathLike) -> MeasurementStore:
        """Open an existing store; ArtifactError when it is missing, unreadable, foreign or of a newer format.

        The file is checked through a read-only connection first, so a foreign database is never modified.
        """
        d = Path(folder)
        path = d / STORE_NAME
        if not path.is_file():
            raise ArtifactError(f"{d} holds no measurement store ({STORE_NAME} not found)")
        check_store_file(path)
        try:
            conn = cls._connect(path)
        except sqlite3.Error as err:
            raise ArtifactError(f"{path} cannot be opened for writing: {err}") from err
        return cls(path, conn)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- metadata -----------------------------------------------------------------------------------------------
    @property
    @_read_errors
    def meta(self) -> dict[str, Any]:
        """All meta values, parsed."""
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def set_meta(self, key: str, value: Any) -> None:
        """Insert or replace one meta value (and the meta's hash)."""
        with _transaction(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))
            texts = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
            self.conn.execute("UPDATE meta SET value = ? WHERE key = ?",
                              (json.dumps(meta_digest(texts)), META_HASH_KEY))

    @_read_errors
    def conditions(self) -> list[Condition]:
        """The conditions, in cond_id order."""
        rows = self.conn.execute("SELECT label, vdd_mv FROM conditions ORDER BY cond_id").fetchall()
        return [Condition(label, vdd) for label, vdd in rows]

    def set_condition_state(self, cond_id: int, vdd_mv: int | None, temp_c: float | None) -> None:
        """Record the supply and temperature the chip reported for a condition."""
        with _transaction(self.conn):
            self.conn.execute(
                "UPDATE conditions SET vdd_mv = ?, temp_c = ? WHERE cond_id = ?", (vdd_mv, temp_c, cond_id)
            )

    @_read_errors
    def condition_state(self, cond_id: int) -> dict[str, Any]:
        """The chip-reported vdd_mv and temp_c of a condition (None until measured)."""
        row = self.conn.execute("SELECT vdd_mv, temp_c FROM conditions WHERE cond_id = ?", (cond_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no condition {cond_id} in {self.path}")
        return {"vdd_mv": row[0], "temp_c": row[1]}

    def log(self, kind: str, detail: str = "") -> None:
        """Append an event."""
        with _transaction(self.conn):
            self.conn.execute("INSERT INTO events (t, kind, detail) VALUES (?, ?, ?)", (utc_now(), kind, detail))

    @_read_errors
    def events(self) -> list[tuple[str, str, str]]:
        """(time, kind, detail) in order."""
        return self.conn.execute("SELECT t, kind, detail FROM events ORDER BY rowid").fetchall()

    # ---- batches ------------------------------------------------------------------------------------------------
    @_read_errors
    def done_batches(self, cond_id: int) -> set[int]:
        """Batches of a condition already committed."""
        return {r[0] for r in self.conn.execute("SELECT batch FROM batches WHERE cond_id = ?", (cond_id,))}

    def commit_batch(self, cond_id: int, batch: int, counts: np.ndarray, record: BatchRecord) -> None:
        """Record one batch: its row and its tallies (counts [J, L, C]) in one INSERT, one transaction.

        ArtifactError if the batch is already in the store (it would be counted twice).
        """
        flat = np.asarray(counts).reshape(-1)
        cells = np.flatnonzero(flat)
        hits = flat[cells]
        r = record
        if hits.size and (int(hits.min()) < 0 or int(hits.sum()) > r.conversions):
            raise ConfigError(f"batch {batch}: its tallies do not fit its {r.conversions} conversions")
        cells = cells.astype(_cell_dtype(flat.size))
        hits = hits.astype(_hit_dtype(r.conversions))
        try:
            with _transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO batches (cond_id, batch, finished_at, vectors, conversions, wall_s, mac_s, "
                    "chip_cycles, chip_energy_fj, supply_v, supply_a_mean, supply_samples, supply_energy_j, "
                    "cells, hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cond_id, batch, utc_now(), r.vectors, r.conversions, r.wall_s, r.mac_s, r.chip_cycles,
                     r.chip_energy_fj, r.supply_v, r.supply_a_mean, r.supply_samples, r.supply_energy_j,
                     cells.tobytes(), hits.tobytes()),
                )
        except sqlite3.IntegrityError as err:
            if "UNIQUE" in str(err):
                raise ArtifactError(f"batch {batch} of condition {cond_id} is already in {self.path}") from err
            raise ArtifactError(
                f"cannot record batch {batch} of condition {cond_id} in {self.path}: {err}"
            ) from err

    @_read_errors
    def batch_records(self, cond_id: int) -> list[dict[str, Any]]:
        """The ``batches`` rows of a condition (without the tallies), as dicts, in batch order."""
        cur = self.conn.execute(
            "SELECT cond_id, batch, finished_at, vectors, conversions, wall_s, mac_s, chip_cycles, "
            "chip_energy_fj, supply_v, supply_a_mean, supply_samples, supply_energy_j "
            "FROM batches WHERE cond_id = ? ORDER BY batch",
            (cond_id,),
        )
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    @_read_errors
    def counts(self, cond_id: int, shape: tuple[int, int, int]) -> np.ndarray:
        """A condition's tallies summed over its batches: dense int64 of ``shape`` = (J, n_levels, n_codes)."""
        size = int(np.prod(shape))
        out = np.zeros(size, dtype=np.int64)
        cdt = _cell_dtype(size)
        cur = self.conn.execute(
            "SELECT batch, conversions, cells, hits FROM batches WHERE cond_id = ?", (cond_id,)
        )
        for batch, conversions, cells_blob, hits_blob in cur:
            hdt = _hit_dtype(conversions)
            if len(cells_blob) % cdt.itemsize or len(hits_blob) // hdt.itemsize != len(cells_blob) // cdt.itemsize:
                raise ArtifactError(f"{self.path}: batch {batch} of condition {cond_id} has malformed tallies")
            cells = np.frombuffer(cells_blob, dtype=cdt).astype(np.int64)
            hits = np.frombuffer(hits_blob, dtype=hdt).astype(np.int64)
            if cells.size and (cells.max() >= size or hits.sum() > conversions):
                raise ArtifactError(
                    f"{self.path}: batch {batch} of condition {cond_id} has tallies outside the MacroSpec's "
                    f"[J, L, C] = {shape}"
                )
            np.add.at(out, cells, hits)
        return out.reshape(shape)

    def consolidate(self, cond_id: int, shape: tuple[int, int, int]) -> int:
        """Rewrite the ``counts`` rows of a condition from its batches (one transaction); return the rows."""
        counts = self.counts(cond_id, shape)
        jj, ss, cc = np.nonzero(counts)
        rows = zip([cond_id] * jj.size, jj.tolist(), ss.tolist(), cc.tolist(), counts[jj, ss, cc].tolist(),
                   strict=True)
        with _transaction(self.conn):
            self.conn.execute("DELETE FROM counts WHERE cond_id = ?", (cond_id,))
            self.conn.executemany("INSERT INTO counts (cond_id, j, s, code, n) VALUES (?, ?, ?, ?, ?)", rows)
        return int(jj.size)


def _committed_batches(path: Path) -> int:
    """Batches in an existing store file; a file that is no readable store counts as holding measurements (it is
    someone's, never to be replaced)."""
    try:
        check_store_file(path)
        ro = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            return int(ro.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        finally:
            ro.close()
    except (ArtifactError, sqlite3.Error):
        return 1


def check_store_file(path: Path) -> None:
    """ArtifactError unless ``path`` is a readable cimlab measurement store of this format version."""
    try:
        ro = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as err:
        raise ArtifactError(f"{path} is not a readable SQLite database: {err}") from err
    try:
        tables = {r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        missing = {"meta", "conditions", "batches", "counts", "events"} - tables
        if missing:
            raise ArtifactError(f"{path} is not a cimlab measurement store (missing tables {sorted(missing)})")
        meta = dict(ro.execute("SELECT key, value FROM meta").fetchall())
        fmt = json.loads(meta.get("format", "null"))
        version = json.loads(meta.get("format_version", "null"))
        stored_hash = json.loads(meta.get(META_HASH_KEY, "null"))
        digest = meta_digest(meta)
    except sqlite3.Error as err:
        raise ArtifactError(f"{path} is not a readable SQLite database: {err}") from err
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise ArtifactError(f"{path}: meta values are not JSON text: {err}") from err
    finally:
        ro.close()
    if fmt != FORMAT:
        raise ArtifactError(f"{path} is not a cimlab measurement store (format {fmt!r}, expected {FORMAT!r})")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has store format version {version!r}; this cimlab reads {FORMAT_VERSION}")
    if stored_hash != digest:
        raise ArtifactError(f"{path}: the meta values do not match meta.{META_HASH_KEY} (an edited or damaged store)")
    check_meta_types(path, meta)


META_HASH_KEY = "meta_sha256"
"""The meta row holding the SHA-256 of every other meta row: the store's manifest is covered by its hash."""


def meta_digest(texts: dict[str, str]) -> str:
    """SHA-256 over the meta rows (key and JSON text) other than ``META_HASH_KEY``, in key order."""
    rows = sorted((k, v) for k, v in texts.items() if k != META_HASH_KEY)
    return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()


META_TYPES: dict[str, type | tuple[type, ...]] = {
    "hello": dict, "spec": dict, "plan": dict, "plan_digest": str, "conditions": list, "instrument": (dict, type(None)),
}
"""Meta values the sweep reads, and their JSON types (others are free)."""


def check_meta_types(path: Path, raw: dict[str, str]) -> None:
    """ArtifactError naming a meta value the sweep reads that is not JSON of its type."""
    for key, typ in META_TYPES.items():
        if key not in raw:
            continue
        try:
            value = json.loads(raw[key])
        except (json.JSONDecodeError, TypeError, RecursionError) as err:
            raise ArtifactError(f"{path}: meta value {key!r} is not JSON: {err}") from err
        if not isinstance(value, typ):
            raise ArtifactError(f"{path}: meta value {key!r} must be a JSON {getattr(typ, '__name__', 'object')}, "
                                f"got {value!r:.60}")
    plan = json.loads(raw.get("plan", "{}"))
    if not isinstance(plan.get("options", {}), dict):
        raise ArtifactError(f"{path}: meta value 'plan.options' must be a JSON object")


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (KeyboardInterrupt included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STORE_NAME",
    "BatchRecord",
    "Condition",
    "MeasurementStore",
    "utc_now",
]

"""Malformed files get typed errors, and no bombs: every loader (error model, checkpoint, package, profile, store)
is fed FILES_PER_FORMAT mutated copies of a valid file. Every load must either succeed or raise a cimlab error
(``CimError``), take under a second, and allocate (tracemalloc peak) under PEAK_BYTES. A load that takes longer
is timed again, up to SLOW_RETRIES times, and its fastest time counts: the suite shares its cores, and a single
1.08 s load among 1,000 that each take 0.1 s alone failed a CI run.

Mutations are seeded and of two kinds: bytes (flips, truncation, insertion, zeroed runs, a repeated chunk) and
structure (a manifest field deleted or given another type, its hash recomputed so the load gets past the hash
check and meets the field checks; array headers with other shapes or dtypes; a zip member that declares far more
than it holds).
"""

from __future__ import annotations

import io
import json
import random
import sqlite3
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cimlab.firmware_bridge.errors import CimError
from cimlab.firmware_bridge.files import text_sha256

FILES_PER_FORMAT = 1000
PEAK_BYTES = 64 << 20
MAX_LOAD_S = 1.0
SLOW_RETRIES = 2  # a load over MAX_LOAD_S is timed again: a bomb is slow every time, a busy machine only sometimes
WEIRD_VALUES: list[Any] = [None, True, -1, 0, 2**63, 1e308, float("nan"), "", "x" * 300, [], [1, "a"], {}, {"a": 1}]

pytestmark = pytest.mark.soak


# ---- mutations ------------------------------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del b[rng.randrange(len(b)):]
    elif kind == 2:
        at = rng.randrange(len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 3:
        at = rng.randrange(len(b))
        b[at : at + rng.randint(1, 512)] = bytes(min(512, len(b) - at))
    else:
        at = rng.randrange(len(b))
        b[at:at] = b[at : at + rng.randint(1, 4096)]
    return bytes(b)


def mutate_json(obj: Any, rng: random.Random) -> Any:
    """A copy of ``obj`` with one nested field deleted, or replaced by a value of another type."""
    obj = json.loads(json.dumps(obj))
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            paths.append((node, key))
            walk(value)

    walk(obj)
    if not paths:
        return rng.choice(WEIRD_VALUES)
    parent, key = rng.choice(paths)
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[key]
    else:
        parent[key] = rng.choice(WEIRD_VALUES)
    return obj


def npz_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def npz_bytes(members: dict[str, bytes], compress: bool = False) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, body in members.items():
            z.writestr(name, body)
    return out.getvalue()


def npy(arr: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, arr, allow_pickle=False)
    return f.getvalue()


_BOMBS: dict[tuple[int, str], bytes] = {}


def mutate_npz(data: bytes, rng: random.Random, manifest: str, hash_name: str) -> bytes:
    """Structure mutations of a cimlab .npz whose JSON manifest is member ``manifest``."""
    members = npz_members(data)
    kind = rng.randrange(4)
    if kind == 0:  # a manifest field changed, the hash made to match
        text = str(np.load(io.BytesIO(members[f"{manifest}.npy"])).item())
        new = json.dumps(mutate_json(json.loads(text), rng))
        members[f"{manifest}.npy"] = npy(np.array(new))
        members[f"{hash_name}.npy"] = npy(np.array(text_sha256(new)))
        return npz_bytes(members)
    name = rng.choice([n for n in members if n not in (f"{manifest}.npy", f"{hash_name}.npy")])
    if kind == 1:  # an array of another shape or dtype
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
        dtype = rng.choice([np.int64, np.float32, np.uint8, np.complex64, "U3", np.bool_])
        members[name] = npy(np.zeros(shape, dtype=dtype))
        return npz_bytes(members)
    if kind == 2:  # a bomb: one member that decompresses far beyond what it should hold (16 MiB from 16 kB)
        key = (hash(data), name)
        if key not in _BOMBS:
            members[name] = npy(np.zeros(1 << 24, dtype=np.uint8))
            _BOMBS[key] = npz_bytes(members, compress=True)
        return _BOMBS[key]
    members[name] = mutate_bytes(members[name], rng)  # a damaged .npy header or body
    return npz_bytes(members)


# ---- the harness ----------------------------------------------------------------------------------------------------
def timed_load(load: Callable[[Path], Any], path: Path) -> tuple[str, float]:
    """("loaded" | "refused" | the untyped error, seconds the load took)."""
    t0 = time.perf_counter()
    try:
        load(path)
        outcome = "loaded"
    except CimError:
        outcome = "refused"
    except Exception as err:  # noqa: BLE001 - the point of the test
        outcome = f"{type(err).__name__}: {str(err)[:160]}"
    return outcome, time.perf_counter() - t0


def fuzz(tmp_path: Path, name: str, good: bytes, mutate: Callable[[bytes, random.Random], bytes],
         load: Callable[[Path], Any], suffix: str) -> None:
    rng = random.Random(f"cimlab-fuzz-{name}")
    untyped: list[str] = []
    slow: list[str] = []
    heavy: list[str] = []
    outcomes = {"loaded": 0, "refused": 0}
    tracemalloc.start()
    try:
        for i in range(FILES_PER_FORMAT):
            data = mutate(good, rng) if rng.random() < 0.5 else mutate_bytes(good, rng)
            path = tmp_path / f"{name}-{i}{suffix}"
            path.write_bytes(data)
            tracemalloc.reset_peak()
            outcome, dt = timed_load(load, path)
            peak = tracemalloc.get_traced_memory()[1]
            for _ in range(SLOW_RETRIES):
                if dt <= MAX_LOAD_S:
                    break
                dt = min(dt, timed_load(load, path)[1])
            if outcome in outcomes:
                outcomes[outcome] += 1
            else:
                untyped.append(f"#{i}: {outcome}")
            if dt > MAX_LOAD_S:
                slow.append(f"#{i}: {dt:.2f} s")
            if peak > PEAK_BYTES:
                heavy.append(f"#{i}: {peak / 2**20:.0f} MiB")
            path.unlink(missing_ok=True)
    finally:
        tracemalloc.stop()
    assert not untyped, f"{len(untyped)} of {FILES_PER_FORMAT} {name} files raised untyped errors: {untyped[:8]}"
    assert not slow, f"{name} loads over {MAX_LOAD_S} s: {slow[:8]}"
    assert not heavy, f"{name} loads allocating over {PEAK_BYTES >> 20} MiB: {heavy[:8]}"
    assert outcomes["refused"] > FILES_PER_FORMAT // 2, outcomes  # the mutations did reach the checks


# ---- the formats ----------------------------------------------------------------------------------------------------
SMALL = {"rows": 32, "cols": 8, "rows_per_conversion": 8}


def test_error_models(tmp_path: Path) -> None:
    from cimlab.firmware_bridge.errmodel import ErrorModel
    from cimlab.firmware_bridge.spec import MacroSpec

    spec = MacroSpec().replace(**SMALL)
    model = ErrorModel.empty(spec, chip_id="fuzz", conditions={"vdd_mv": 800})
    model.counts[:, :, 3] = 5
    good = model.save(tmp_path / "good.npz").read_bytes()
    fuzz(tmp_path, "errmodel", good, lambda d, r: mutate_npz(d, r, "meta", "meta_sha256"), ErrorModel.load,
         ".npz")


def test_checkpoints(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cimlab.training.checkpoint import load_checkpoint, save_checkpoint
    from cimlab.training.models import build_model

    path = save_checkpoint(tmp_path / "good.safetensors", build_model("digits_mlp"),
                           {"task": "digits", "model": {"name": "digits_mlp", "kwargs": {}}, "mode": "float"})
    good = path.read_bytes()

    def mutate(data: bytes, rng: random.Random) -> bytes:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        meta = header["__metadata__"]
        if rng.random() < 0.5:  # the manifest changed, its hash made to match
            text = json.dumps(mutate_json(json.loads(meta["cimlab.manifest"]), rng))
            meta["cimlab.manifest"], meta["cimlab.manifest_sha256"] = text, text_sha256(text)
        else:  # the tensor table changed (dtypes, shapes, offsets)
            header = mutate_json(header, rng)
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + data[8 + n :]

    fuzz(tmp_path, "checkpoint", good, mutate, load_checkpoint, ".safetensors")


def test_packages(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cimlab.deploy.compile import compile_checkpoint
    from cimlab.deploy.package import DeployPackage
    from cimlab.firmware_bridge.spec import MacroSpec
    from cimlab.training.api import prepare_model
    from cimlab.training.checkpoint import save_checkpoint
    from cimlab.training.tasks import load_task

    spec = MacroSpec().replace(rows=64)
    net, info = prepare_model(load_task("digits", limit=64), "quant", model_name="digits_mlp", spec=spec)
    ck = save_checkpoint(tmp_path / "q.safetensors", net, {"task": "digits", "model": info, "mode": "quant",
                                                           "spec": spec.to_dict(), "quantizer": "epact"})
    good = compile_checkpoint(ck, spec=spec).save(tmp_path / "good.npz").read_bytes()
    fuzz(tmp_path, "package", good, lambda d, r: mutate_npz(d, r, "manifest", "manifest_sha256"),
         DeployPackage.load, ".npz")


def test_profiles(tmp_path: Path) -> None:
    from cimlab.chip_sim.profiles import load_profile

    good = load_profile("default").to_toml().encode()

    def mutate(data: bytes, rng: random.Random) -> bytes:
        import tomllib

        import tomli_w

        doc = mutate_json(tomllib.loads(data.decode()), rng)
        if not isinstance(doc, dict):
            return repr(doc).encode()
        clean = json.loads(json.dumps(doc), parse_constant=lambda _c: 0)
        strip = (lambda v: {k: strip(x) for k, x in v.items() if x is not None} if isinstance(v, dict)
                 else [strip(x) for x in v if x is not None] if isinstance(v, list) else v)
        return tomli_w.dumps(strip(clean)).encode()

    fuzz(tmp_path, "profile", good, mutate, load_profile, ".toml")


def test_measurement_stores(tmp_path: Path) -> None:
    from cimlab.characterize import (
        MeasurementStore,
        Plan,
        PlanOptions,
        SweepRunner,
        conditions_from_vdd,
        model_for_condition,
        store_meta,
    )
    from cimlab.characterize.store import META_HASH_KEY, meta_digest
    from cimlab.driver import Chip

    url = "sim://?profile=ideal&rows=16&cols=8&rows_per_conversion=8"
    with Chip.open(url) as chip:
        plan = Plan(chip.spec, PlanOptions(repeats=1))
        conds = conditions_from_vdd(None)
        with MeasurementStore.create(tmp_path / "good", store_meta(chip, plan, conds, url, None), conds) as store:
            SweepRunner(chip, store, plan).run(finalize=False)
    good = (tmp_path / "good" / "measurements.sqlite").read_bytes()

    def mutate(data: bytes, rng: random.Random) -> bytes:
        scratch = tmp_path / "scratch.sqlite"
        scratch.write_bytes(data)
        conn = sqlite3.connect(scratch)
        try:
            kind = rng.randrange(3)
            if kind == 0:  # a meta value that is not JSON, or JSON of another shape
                key = rng.choice([r[0] for r in conn.execute("SELECT key FROM meta")])
                value = rng.choice(["{not json", json.dumps(rng.choice(WEIRD_VALUES), allow_nan=True),
                                    json.dumps(mutate_json(json.loads(conn.execute(
                                        "SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]), rng))])
                conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
                if rng.random() < 0.8:  # the hash made to match, so the value meets the type checks
                    texts = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                    conn.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(meta_digest(texts)),
                                                                             META_HASH_KEY))
            elif kind == 1:  # tallies of other lengths or values
                blob = bytes(rng.randrange(256) for _ in range(rng.choice([0, 3, 8, 64])))
                conn.execute(f"UPDATE batches SET {rng.choice(['cells', 'hits'])} = ?", (blob,))
            else:  # a table gone or a column of another type
                conn.execute(rng.choice(["DROP TABLE conditions", "UPDATE batches SET conversions = 'many'",
                                         "UPDATE conditions SET vdd_mv = 'x'", "DELETE FROM meta"]))
            conn.commit()
        finally:
            conn.close()
        return scratch.read_bytes()

    def load(path: Path) -> None:
        folder = tmp_path / "load"
        folder.mkdir(exist_ok=True)
        for stale in folder.iterdir():
            stale.unlink()
        path.replace(folder / "measurements.sqlite")
        with MeasurementStore.open(folder) as store:
            for ci in range(len(store.conditions())):
                model_for_condition(store, ci)

    fuzz(tmp_path, "store", good, mutate, load, ".sqlite")

"""A board farm on Ray: one actor per board, pinned to the host that owns the board's port.

Each board is a Ray actor (``BoardWorker``) placed by a custom resource ``board:NAME`` that only the host wired to
that board offers::

    ray start --head --resources '{"board:chip7": 1}'                       # the host with chip7 on /dev/ttyUSB0
    ray start --address HEAD:6379 --resources '{"board:chip8": 1}'          # another host, chip8

The driver (``cimlab farm characterize --ray auto --board chip7=/dev/ttyUSB0 --board chip8=...``) sends each actor
its sweep and sees futures, never sockets. An actor runs the library behind ``cimlab characterize``
(``cimlab.characterize``: Plan, MeasurementStore, SweepRunner) into its own crash-safe store, ``OUT/NAME/`` on the
board's host (the same path on every host, or a shared folder), so a farm killed at any moment, or a host lost,
resumes where it stopped with ``--resume``. Finished boards send their error model back as ``.npz`` bytes; the
driver writes ``OUT/models/NAME.npz`` for each chip and ``OUT/models/merged.npz`` (counts added, chips of one
MacroSpec). Progress is read from each store's committed batches, so the display shows what is safely measured.

Only plain data (str, int, float, dict, bytes) crosses between the driver and the actors. Ray is imported only
here, inside functions; it comes with the ``cimlab[farm]`` extra.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cimlab.firmware_bridge.errors import BackendUnavailable, CimError, ConfigError, DeviceError

if TYPE_CHECKING:
    from rich.console import Console

RESOURCE_PREFIX = "board:"
MODELS_DIR = "models"
MERGED_NAME = "merged.npz"
POLL_S = 0.25
"""How often the driver asks the actors for their progress, seconds."""
CALL_TIMEOUT_S = 30.0
"""Deadline of a progress or stop call to an actor, seconds."""
START_TIMEOUT_S = 120.0
"""Deadline for every actor to be placed and to answer its first call, seconds."""


@dataclass(frozen=True)
class Board:
    """One board of the farm.

    Attributes:
        name: the board's name (also its Ray resource ``board:NAME`` and its store folder ``OUT/NAME``).
        url: its link URL, as seen from the host that owns it.
    """

    name: str
    url: str

    @property
    def resource(self) -> str:
        """The Ray custom resource that pins the board's actor to its host."""
        return RESOURCE_PREFIX + self.name

    @classmethod
    def parse(cls, text: str) -> Board:
        """``NAME=URL`` -> Board; ConfigError naming what is wrong."""
        name, sep, url = text.partition("=")
        name = name.strip()
        if not sep or not name or not url.strip():
            raise ConfigError(f"--board expects NAME=URL, got {text!r}")
        if not all(ch.isalnum() or ch in "-_." for ch in name):
            raise ConfigError(f"--board name {name!r} may hold letters, digits, '-', '_' and '.' only")
        return cls(name, url.strip())


def parse_boards(texts: Sequence[str]) -> list[Board]:
    """``NAME=URL`` strings -> boards; ConfigError on none, or on a name given twice."""
    boards = [Board.parse(t) for t in texts]
    if not boards:
        raise ConfigError("give at least one --board NAME=URL")
    names = [b.name for b in boards]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--board names must be unique; given twice: {', '.join(twice)}")
    return boards


# ---- the actor -------------------------------------------------------------------------------------------------
class BoardWorker:
    """What runs on a board's host, as a Ray actor (threaded: progress and stop are answered during a sweep).

    Args:
        name: the board's name.
        url: its link URL.
        timeout: the driver's resend timeout, seconds.
    """

    def __init__(self, name: str, url: str, timeout: float = 1.0) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self._stop = threading.Event()
        self._folder: Path | None = None
        self._total = 0

    def host(self) -> str:
        """The host name this actor runs on."""
        import socket

        return socket.gethostname()

    def stop(self) -> None:
        """Ask the running sweep to stop after its current batch."""
        self._stop.set()

    def progress(self) -> dict[str, int]:
        """Batches committed to the store so far, and the plan's total (0 before the sweep has started)."""
        folder = self._folder
        if folder is None:
            return {"done": 0, "total": self._total}
        return {"done": committed_batches(folder), "total": self._total}

    def characterize(self, folder: str, options: dict[str, Any], vdd: list[float] | None,
                     resume: bool) -> dict[str, Any]:
        """Sweep the board into the store in ``folder`` (created, or continued with ``resume``).

        Returns the sweep's figures and, when the plan is complete, ``model``: the error model as ``.npz`` bytes.
        """
        from cimlab.characterize import (
            STORE_NAME,
            MeasurementStore,
            Plan,
            PlanOptions,
            SweepRunner,
            check_resume,
            conditions_from_vdd,
            store_meta,
        )
        from cimlab.driver import Chip

        target = Path(folder)
        self._stop.clear()
        with Chip.open(self.url, timeout=self.timeout) as chip:
            if resume and (target / STORE_NAME).is_file():
                store = MeasurementStore.open(target)
                plan_options, conds = check_resume(store, chip, None, None)
                plan = Plan(chip.spec, plan_options)
            else:
                plan = Plan(chip.spec, PlanOptions.from_dict(options))
                conds = conditions_from_vdd(vdd)
                store = MeasurementStore.create(target, store_meta(chip, plan, conds, self.url, None), conds)
            with store:
                self._total = plan.n_batches * len(conds)
                self._folder = target
                result = SweepRunner(chip, store, plan, should_stop=self._stop.is_set).run()
            chip_id = chip.hello.chip_id
        out: dict[str, Any] = {
            "board": self.name, "chip_id": chip_id, "host": self.host(), "store": str(target),
            "complete": result.complete, "interrupted": result.interrupted, "batches_done": result.batches_done,
            "batches_total": result.batches_total, "batches_run": result.batches_run,
            "conversions_run": result.conversions_run, "wall_s": result.wall_s, "model": None,
        }
        if result.complete:
            out["model"] = result.models[0].read_bytes()
        return out

    def bench(self, package: bytes, options: dict[str, Any], error_model: bytes | None) -> dict[str, Any]:
        """Run a deployment package's network on the board (``cimlab bench``'s library) and return its figures."""
        from cimlab.deploy.bench import bench_package, public
        from cimlab.deploy.package import DeployPackage
        from cimlab.driver import Chip
        from cimlab.training.tasks import load_task

        with tempfile.TemporaryDirectory(prefix="cimlab-farm-") as tmp:
            pkg_path = Path(tmp) / "package.npz"
            pkg_path.write_bytes(package)
            model_path = None
            if error_model is not None:
                model_path = Path(tmp) / "dmacem.npz"
                model_path.write_bytes(error_model)
            pkg = DeployPackage.load(pkg_path)
            data = load_task(pkg.task, options.get("data_dir"), limit=options.get("limit"))
            with Chip.open(self.url, timeout=self.timeout) as chip:
                result = bench_package(pkg, chip, data.x_test, data.y_test, batch_size=options["batch_size"],
                                       draws=options["draws"], error_model=model_path, pooled=options["pooled"],
                                       seed=options["seed"], progress=False)
        return {"board": self.name, "host": self.host(), **public(result)}


def committed_batches(folder: Path) -> int:
    """Rows in a store's ``batches`` table (0 while the store does not exist yet), through a read-only connection."""
    from cimlab.characterize import STORE_NAME

    path = folder / STORE_NAME
    if not path.is_file():
        return 0
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=CALL_TIMEOUT_S)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


# ---- the driver -------------------------------------------------------------------------------------------
def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise BackendUnavailable("the farm needs Ray: pip install 'cimlab[farm]'") from err
    return ray


@contextmanager
def ray_session(address: str, boards: Sequence[Board]) -> Iterator[Any]:
    """Connect to Ray for the farm: ``auto`` or an address joins a running cluster; ``local`` starts one on this
    machine offering every board's resource. A session already initialised in this process (tests) is used as
    it is. Shut down on exit only if started here."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address == "local":
        ray.init(resources={b.resource: 1 for b in boards}, include_dashboard=False, logging_level="WARNING")
    else:
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise BackendUnavailable(f"cannot join the Ray cluster at {address!r}: {err}") from err
    try:
        yield ray
    finally:
        ray.shutdown()


def check_resources(ray: Any, boards: Sequence[Board]) -> None:
    """ConfigError naming every board whose resource no node of the cluster offers (its actor would wait forever)."""
    offered = ray.cluster_resources()
    missing = [b for b in boards if offered.get(b.resource, 0) < 1]
    if missing:
        names = ", ".join(b.name for b in missing)
        example = ", ".join(f'"{b.resource}": 1' for b in missing)
        raise ConfigError(
            f"no Ray node offers the resource of board(s) {names}: start each board's host with "
            f"ray start --resources '{{{example}}}' (or use --ray local for boards on this machine)"
        )


def start_workers(ray: Any, boards: Sequence[Board], timeout: float) -> dict[str, Any]:
    """One actor per board, pinned by its resource; waits (with a deadline) until each answers."""
    cls = ray.remote(BoardWorker)
    actors = {
        b.name: cls.options(resources={b.resource: 1}, num_cpus=0, max_concurrency=4).remote(b.name, b.url, timeout)
        for b in boards
    }
    refs = {name: a.host.remote() for name, a in actors.items()}
    try:
        ray.get(list(refs.values()), timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as err:
        for a in actors.values():
            ray.kill(a)
        raise DeviceError(f"the board actors did not start within {START_TIMEOUT_S:g} s") from err
    return actors


@dataclass
class BoardOutcome:
    """What one board did: its result dict (see ``BoardWorker``) or the error that stopped it."""

    board: Board
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class FarmResult:
    """A farm run: per-board outcomes and the models written."""

    outcomes: list[BoardOutcome] = field(default_factory=list)
    models: dict[str, Path] = field(default_factory=dict)
    merged: Path | None = None
    merge_note: str | None = None
    wall_s: float = 0.0

    @property
    def complete(self) -> bool:
        """True when every board finished its plan."""
        return all(o.result is not None and o.result["complete"] for o in self.outcomes)


ProgressFn = Callable[[str, int, int, str], None]
"""``(board name, batches done, batches total, state)``; state is running / done / stopped / failed."""


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[-1] if first else ''}"


def gather(ray: Any, actors: dict[str, Any], refs: dict[str, Any], boards: Sequence[Board],
           progress: ProgressFn, should_stop: Callable[[], bool]) -> list[BoardOutcome]:
    """Wait for every board's task, polling progress; a board whose actor or task failed is reported, the others
    go on. ``should_stop`` True asks every actor to stop after its current batch."""
    by_ref = {ref: name for name, ref in refs.items()}
    outcomes = {b.name: BoardOutcome(b) for b in boards}
    pending = list(refs.values())
    stop_sent = False
    while pending:
        if should_stop() and not stop_sent:
            for name in by_ref.values():
                actors[name].stop.remote()
            stop_sent = True
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        for ref in ready:
            name = by_ref[ref]
            try:
                result = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except (ray.exceptions.RayError, CimError) as err:
                outcomes[name].error = _cause(err)
                progress(name, 0, 0, "failed")
                continue
            outcomes[name].result = result
            state = "done" if result.get("complete", True) else "stopped"
            progress(name, result.get("batches_done", 1), result.get("batches_total", 1), state)
        for ref in pending:
            name = by_ref[ref]
            try:
                p = ray.get(actors[name].progress.remote(), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayError:
                continue  # the task's own result reports what happened
            progress(name, p["done"], p["total"], "running")
    return [outcomes[b.name] for b in boards]


def write_farm_models(out: Path, outcomes: Sequence[BoardOutcome], result: FarmResult) -> None:
    """``OUT/models/NAME.npz`` for each finished board and ``OUT/models/merged.npz`` when they share a MacroSpec.

    The merged model is the design's population (every chip id recorded), so chips are mixed on purpose.
    """
    from cimlab.errmodel import MacErrorModel
    from cimlab.firmware_bridge.errors import ArtifactError
    from cimlab.firmware_bridge.files import atomic_path

    folder = out / MODELS_DIR
    models = []
    for o in outcomes:
        if o.result is None or o.result.get("model") is None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{o.board.name}.npz"
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(o.result["model"])
        models.append(MacErrorModel.load(path))
        result.models[o.board.name] = path
    if len(models) < 2:
        return
    try:
        merged = MacErrorModel.merge(models, allow_mixed_chips=True)
    except ArtifactError as err:
        result.merge_note = f"no merged model: {err}"
        return
    result.merged = merged.save(folder / MERGED_NAME)


def characterize_farm(boards: Sequence[Board], out: str | os.PathLike, *, ray_address: str = "auto",
                      options: dict[str, Any] | None = None, vdd: list[float] | None = None, resume: bool = False,
                      timeout: float = 1.0, progress: ProgressFn | None = None,
                      should_stop: Callable[[], bool] = lambda: False) -> FarmResult:
    """Characterize every board at once, one Ray actor each (see the module docstring).

    Args:
        boards: the boards (``parse_boards``).
        out: the farm's folder; board NAME's store is ``OUT/NAME`` on its host, the models ``OUT/models``.
        ray_address: ``auto``, a cluster address, or ``local``.
        options: ``PlanOptions`` fields (repeats, levels, columns, row_mode, batch_vectors, seed); ignored for a
            store that is resumed (its own plan is used).
        vdd: supply conditions, volts (written to the chips' VDD_MV).
        resume: continue the stores that exist (boards without one start).
        timeout: the driver's resend timeout, seconds.
        progress: called with each board's progress.
        should_stop: polled; True stops every board after its current batch.
    """
    from cimlab.characterize import PlanOptions

    opts = PlanOptions.from_dict(options or {}).to_dict()
    root = Path(out).resolve()
    report = progress or (lambda *_: None)
    t0 = time.perf_counter()
    result = FarmResult()
    with ray_session(ray_address, boards) as ray:
        check_resources(ray, boards)
        actors = start_workers(ray, boards, timeout)
        try:
            refs = {b.name: actors[b.name].characterize.remote(str(root / b.name), opts, vdd, resume)
                    for b in boards}
            result.outcomes = gather(ray, actors, refs, boards, report, should_stop)
        finally:
            for a in actors.values():
                ray.kill(a)
    write_farm_models(root, result.outcomes, result)
    result.wall_s = time.perf_counter() - t0
    return result


def bench_farm(boards: Sequence[Board], package: str | os.PathLike, *, ray_address: str = "auto",
               options: dict[str, Any], error_model: str | os.PathLike | None = None, timeout: float = 1.0,
               progress: ProgressFn | None = None) -> list[BoardOutcome]:
    """Benchmark a deployment package on every board at once (``cimlab bench``'s library on each board's host).

    ``options``: batch_size, draws, pooled, seed, limit, data_dir (see ``cimlab bench``).
    """
    pkg_bytes = Path(package).read_bytes()
    model_bytes = Path(error_model).read_bytes() if error_model is not None else None
    report = progress or (lambda *_: None)
    with ray_session(ray_address, boards) as ray:
        check_resources(ray, boards)
        actors = start_workers(ray, boards, timeout)
        try:
            refs = {b.name: actors[b.name].bench.remote(pkg_bytes, options, model_bytes) for b in boards}
            outcomes = gather(ray, actors, refs, boards, report, lambda: False)
        finally:
            for a in actors.values():
                ray.kill(a)
    for o in outcomes:
        if o.result is not None:
            o.result["package"] = str(package)  # not the actor's temporary copy
    return outcomes


class FarmProgress:
    """One rich progress display for the whole farm: a bar per board and one for the farm."""

    def __init__(self, console: Console, boards: Sequence[Board], what: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=console)
        self.tasks = {b.name: self.bar.add_task(b.name, total=None, state="starting") for b in boards}
        self.farm = self.bar.add_task(f"farm ({what})", total=None, state="")
        self.seen: dict[str, tuple[int, int]] = {}

    def __call__(self, name: str, done: int, total: int, state: str) -> None:
        if state == "failed":
            self.bar.update(self.tasks[name], state="[red]failed")
            return
        if total:
            self.seen[name] = (done, total)
            self.bar.update(self.tasks[name], completed=done, total=total, state=state)
        else:
            self.bar.update(self.tasks[name], state=state)
        d = sum(v[0] for v in self.seen.values())
        t = sum(v[1] for v in self.seen.values())
        self.bar.update(self.farm, completed=d, total=t or None, state=f"{len(self.seen)}/{len(self.tasks)} boards")

    def __enter__(self) -> FarmProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


__all__ = [
    "Board",
    "BoardOutcome",
    "BoardWorker",
    "FarmProgress",
    "FarmResult",
    "bench_farm",
    "characterize_farm",
    "check_resources",
    "committed_batches",
    "parse_boards",
    "ray_session",
    "write_farm_models",
]

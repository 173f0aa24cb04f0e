"""pytest plugin: run your own hardware tests on the twin in CI and, unchanged, on a board at the bench.

Installed with cimlab (entry point ``pytest11: cimlab``); importing it adds nothing but options, a marker and
fixtures. cimlab itself is imported only when a test asks for a fixture.

Options (also ``cimlab_link`` in the ini file)::

    --cimlab-link URL          the chip under test (default sim://, the twin in-process); any link URL
    --cimlab-timeout S         seconds without progress before a request is resent (default 1.0)
    --cimlab-error-model PATH  the error model the ``error_model`` fixture loads (.npz or a characterize folder);
                               without it, a quick characterization of the chip under test
    --cimlab-quick-repeats N   conversions per (column, level) of that quick characterization (default 8)

Marker ``@pytest.mark.cimlab(profile="default", needs="board")``:

- ``profile``: the twin profile the test runs on when ``--cimlab-link`` is a ``sim://`` twin (a board is what it
  is: read ``chip.spec``, never assume the profile's geometry);
- ``needs="board"`` skips the test when the chip under test is a twin (a ``sim://`` link, or a served twin,
  which identifies itself with ``bitstream_id == "twin"`` in HELLO); ``needs="twin"`` runs the test only on a
  ``sim://`` twin, whose profile the marker sets (a served twin's profile is whatever it was started with).

Fixtures:

- ``chip``: an open ``cimlab.Chip`` on the chip under test, reset (registers, counters and weights) before each
  test; one connection per URL for the whole session.
- ``twin_server``: a twin served by ``cimlab sim serve`` in a subprocess, on a pty (default) or TCP
  (``@pytest.mark.parametrize("twin_server", ["tcp"], indirect=True)``); yields its link URL and stops it after.
- ``error_model``: a ``cimlab.errmodel.MacErrorModel``: ``--cimlab-error-model`` or, without it, one quick
  characterization per chip and session (through ``cimlab.characterize``, the library behind
  ``cimlab characterize``).
- ``cimlab_link``: the chip under test's URL for this test (the marker's profile applied).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import pytest

if TYPE_CHECKING:
    from cimlab.driver import Chip
    from cimlab.errmodel import MacErrorModel

NEEDS = ("board", "twin")
TWIN_BITSTREAM_ID = "twin"
"""What a twin reports as ``bitstream_id`` in HELLO (``cimlab.chip_sim.controller``)."""
DEFAULT_QUICK_REPEATS = 8
MARKER_HELP = (
    "cimlab(profile=None, needs=None): profile = twin profile when --cimlab-link is sim://; "
    "needs='board' skips on a twin, needs='twin' runs only on a sim:// twin"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cimlab", "cimlab: tests on a CIM chip or its twin")
    group.addoption("--cimlab-link", default=None, metavar="URL",
                    help="Chip under test (default: ini cimlab_link, else sim://, the twin).")
    group.addoption("--cimlab-timeout", type=float, default=1.0, metavar="S",
                    help="Seconds without progress before a request is resent (default 1.0).")
    group.addoption("--cimlab-error-model", default=None, metavar="PATH",
                    help="Error model for the error_model fixture (.npz or characterize folder); "
                         "default: a quick characterization of the chip under test.")
    group.addoption("--cimlab-quick-repeats", type=int, default=DEFAULT_QUICK_REPEATS, metavar="N",
                    help=f"Repeats of that quick characterization (default {DEFAULT_QUICK_REPEATS}).")
    parser.addini("cimlab_link", "Default --cimlab-link", default="sim://")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)


# ---- what a test asks for -----------------------------------------------------------------------------------
def _marker(node: pytest.Item | pytest.FixtureRequest) -> dict[str, Any]:
    """The nearest ``cimlab`` marker's keyword arguments, checked."""
    item = node.node if isinstance(node, pytest.FixtureRequest) else node
    mark = item.get_closest_marker("cimlab")
    if mark is None:
        return {}
    if mark.args:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.cimlab takes keyword arguments only, "
                                f"got {mark.args!r}")
    unknown = sorted(set(mark.kwargs) - {"profile", "needs"})
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.cimlab has no argument(s) {', '.join(unknown)}; "
                                "known: profile, needs")
    needs = mark.kwargs.get("needs")
    if needs is not None and needs not in NEEDS:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.cimlab(needs={needs!r}): needs is one of "
                                f"{', '.join(NEEDS)}")
    return dict(mark.kwargs)


def _is_sim(url: str) -> bool:
    return url.lower().startswith("sim://")


def with_profile(url: str, profile: str | None) -> str:
    """``sim://...`` with its ``profile`` query key set to ``profile`` (other URLs, and None, unchanged)."""
    if profile is None or not _is_sim(url):
        return url
    base, sep, fragment = url.partition("#")
    _, _, query = base.partition("?")
    params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "profile"]
    out = "sim://?" + urlencode([("profile", profile), *params])
    return out + (sep + fragment if sep else "")


def _base_link(config: pytest.Config) -> str:
    return config.getoption("--cimlab-link") or config.getini("cimlab_link") or "sim://"


# ---- one connection per URL for the session ----------------------------------------------------------------
class ChipPool:
    """Open chips by URL, kept for the session (a board's port is opened once); closed at the end."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.chips: dict[str, Chip] = {}
        self.models: dict[str, MacErrorModel] = {}

    def get(self, url: str) -> Chip:
        """The open chip at ``url`` (opened and identified on first use)."""
        chip = self.chips.get(url)
        if chip is None:
            from cimlab.driver import Chip

            chip = Chip.open(url, timeout=self.timeout)
            self.chips[url] = chip
        return chip

    def reset(self, url: str) -> Chip:
        """The chip at ``url`` after RESET with its weights cleared; a chip whose link broke is reopened once."""
        from cimlab.firmware_bridge.errors import CimError

        chip = self.get(url)
        try:
            chip.reset(clear_weights=True)
        except CimError:
            self.drop(url)
            chip = self.get(url)
            chip.reset(clear_weights=True)
        return chip

    def is_twin(self, url: str) -> bool:
        """True for a ``sim://`` link or a chip whose HELLO says it is a twin."""
        return _is_sim(url) or self.get(url).hello.bitstream_id == TWIN_BITSTREAM_ID

    def drop(self, url: str) -> None:
        """Close and forget the chip at ``url``."""
        chip = self.chips.pop(url, None)
        if chip is not None:
            chip.close()

    def close(self) -> None:
        """Close every chip."""
        for url in list(self.chips):
            self.drop(url)


_POOL_KEY = pytest.StashKey[ChipPool]()


def _pool(config: pytest.Config) -> ChipPool:
    pool = config.stash.get(_POOL_KEY, None)
    if pool is None:
        pool = ChipPool(config.getoption("--cimlab-timeout"))
        config.stash[_POOL_KEY] = pool
    return pool


def pytest_runtest_setup(item: pytest.Item) -> None:
    needs = _marker(item).get("needs")
    if needs is None:
        return
    url = with_profile(_base_link(item.config), _marker(item).get("profile"))
    if needs == "twin" and not _is_sim(url):
        pytest.skip(f"needs the sim:// twin; the chip under test is {url}")
    if needs == "board" and _pool(item.config).is_twin(url):
        pytest.skip(f"needs a board; the chip under test ({url}) is a twin")


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(_POOL_KEY, None)
    if pool is not None:
        pool.close()
        del config.stash[_POOL_KEY]


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture
def cimlab_link(request: pytest.FixtureRequest) -> str:
    """The chip under test's link URL for this test (``--cimlab-link`` with the marker's profile applied)."""
    return with_profile(_base_link(request.config), _marker(request).get("profile"))


@pytest.fixture
def chip(request: pytest.FixtureRequest, cimlab_link: str) -> Chip:
    """An open Chip on the chip under test, reset (registers, counters, weights) before the test."""
    return _pool(request.config).reset(cimlab_link)


@pytest.fixture
def twin_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A twin served in a subprocess (pty by default; indirect parameter ``"tcp"`` for TCP); yields its URL."""
    from cimlab.twinproc import TwinProcess

    where = getattr(request, "param", "pty")
    if where not in ("pty", "tcp"):
        raise pytest.UsageError(f"twin_server serves on 'pty' or 'tcp', not {where!r}")
    profile = _marker(request).get("profile") or "default"
    with TwinProcess(pty=where == "pty", profile=profile) as url:
        yield url


@pytest.fixture
def error_model(request: pytest.FixtureRequest, cimlab_link: str, tmp_path_factory: pytest.TempPathFactory
                ) -> MacErrorModel:
    """The measured error model: ``--cimlab-error-model`` or one quick characterization of the chip under test."""
    config = request.config
    pool = _pool(config)
    path = config.getoption("--cimlab-error-model")
    key = f"file:{path}" if path else cimlab_link
    if key not in pool.models:
        if path:
            pool.models[key] = load_error_model(Path(path))
        else:
            folder = tmp_path_factory.mktemp("cimlab-characterize")
            pool.models[key] = quick_characterization(pool, cimlab_link, folder,
                                                      config.getoption("--cimlab-quick-repeats"))
    return pool.models[key]


def load_error_model(path: Path) -> MacErrorModel:
    """A model from a ``.npz`` file or a characterize folder's ``dmacem.npz``."""
    from cimlab.characterize import MODEL_NAME
    from cimlab.errmodel import MacErrorModel

    return MacErrorModel.load(path / MODEL_NAME if path.is_dir() else path)


def quick_characterization(pool: ChipPool, url: str, folder: Path, repeats: int) -> MacErrorModel:
    """Characterize the chip at ``url`` into ``folder`` (every column and level, ``repeats`` each); the chip is
    reset afterwards."""
    from cimlab.characterize import (
        MeasurementStore,
        Plan,
        PlanOptions,
        SweepRunner,
        conditions_from_vdd,
        store_meta,
    )
    from cimlab.errmodel import MacErrorModel

    chip = pool.reset(url)
    plan = Plan(chip.spec, PlanOptions(repeats=repeats))
    conds = conditions_from_vdd(None)
    with MeasurementStore.create(folder, store_meta(chip, plan, conds, url, None), conds) as store:
        result = SweepRunner(chip, store, plan).run()
    pool.reset(url)
    return MacErrorModel.load(result.models[0])

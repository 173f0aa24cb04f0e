"""The device end on a PYNQ board: the manifest checks, pynq:// in-process, ``cimlab board serve`` over TCP, and
the board-side code's Python 3.10 / no-host-code rules. The fabric here is a register-level fake (board_fakes);
tests/rtl runs the same controller against the RTL."""

from __future__ import annotations

import ast
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from board_fakes import FakeFabric, FakeMMIO
from cimlab.driver import Chip
from cimlab.firmware_bridge.board import FabricController, PynqBus
from cimlab.firmware_bridge.errors import (
    ArtifactError,
    BackendUnavailable,
    ConfigError,
    DeviceError,
    VersionMismatch,
)
from cimlab.firmware_bridge.messages import Status
from cimlab.firmware_bridge.overlay import BITSTREAMS_DIR, check_overlay, load_manifest, open_board
from cimlab.firmware_bridge.registers import REGMAP_VERSION, SEQ_WRITE_WEIGHTS
from cimlab.links import open_link
from board_fakes import SPEC, write_manifest

REPO = Path(__file__).resolve().parents[2]


def test_pynq_link_serves_the_overlay_in_process(board) -> None:
    folder, fake, fabric = board
    with Chip(open_link(f"pynq://cimlab_ctrl?dir={folder}"), timeout=2.0) as chip:
        hello = chip.identify()
        assert hello.spec == SPEC  # read from the fabric's geometry registers
        assert hello.chip_id == "pynq-cimlab_ctrl" and hello.bitstream_id == "cimlab_ctrl-1234abcd"
        assert fake.loaded == [str(folder / "cimlab_ctrl.bit")]
        assert chip.write_reg("SCRATCH", 0xA5A5_0001) == 0xA5A5_0001
        w = np.random.default_rng(0).integers(SPEC.weight_min, SPEC.weight_max + 1, (SPEC.rows, SPEC.cols))
        chip.write_weights(w)
        np.testing.assert_array_equal(chip.read_weights(), w)
        with pytest.raises(DeviceError) as err:
            chip.write_reg("VDD_MV", 1200)  # above the fabric's G_VDD_MAX_MV
        assert err.value.status == Status.BAD_ARGUMENT
    assert SEQ_WRITE_WEIGHTS in fabric.starts


def test_a_fabric_of_another_build_is_refused(board) -> None:
    folder, _, _ = board
    write_manifest(folder, build_id=7)
    with pytest.raises(ArtifactError, match="BUILD_ID 0x1234abcd.*0x00000007"):
        open_board("cimlab_ctrl", folder)


def test_a_bus_without_a_cimlab_fabric_is_refused() -> None:
    class Empty:
        array = np.zeros(16, np.uint32)

        def read(self, offset: int) -> int:
            return 0

    with pytest.raises(ArtifactError, match="no cimlab controller"):
        FabricController(PynqBus(Empty()))


def test_waiting_for_a_run_has_a_deadline() -> None:
    bus = PynqBus(FakeMMIO(FakeFabric(SPEC)), poll_s=0.01)
    t0 = time.monotonic()
    assert bus.wait_irq(0.1) is False  # nothing started: neither done nor refused
    assert 0.1 <= time.monotonic() - t0 < 0.5


def test_without_pynq_the_board_is_unavailable(monkeypatch: pytest.MonkeyPatch, board) -> None:
    folder, _, _ = board
    monkeypatch.setitem(sys.modules, "pynq", None)  # import pynq raises ImportError
    with pytest.raises(BackendUnavailable, match=r"cimlab\[board\]"):
        open_link(f"pynq://cimlab_ctrl?dir={folder}")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("pynq://", ["pynq://OVERLAY"]),
        ("pynq://x/y", ["pynq://OVERLAY"]),
        ("pynq://cimlab_ctrl?dma=axi_dma_0", ["unknown option", "dma"]),
    ],
)
def test_bad_pynq_urls(url: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        open_link(url)
    for word in words:
        assert word in str(info.value)


# ---- the manifest ----------------------------------------------------------------------------------------
def test_the_repository_manifest_lists_the_reference_overlay() -> None:
    entry = load_manifest(BITSTREAMS_DIR)["cimlab_ctrl"]
    assert entry.regmap_version == REGMAP_VERSION and entry.ctrl == "cimlab_ctrl_0" and entry.profile == "default"
    if (BITSTREAMS_DIR / entry.file).is_file():  # a built overlay was added: it must check out
        assert check_overlay("cimlab_ctrl")[1] == BITSTREAMS_DIR / entry.file
    else:
        with pytest.raises(ArtifactError, match=r"missing.*README"):
            check_overlay("cimlab_ctrl")


def test_an_unknown_overlay_lists_the_known_ones(tmp_path: Path) -> None:
    write_manifest(tmp_path)
    with pytest.raises(ConfigError, match=r"'other'.*known: cimlab_ctrl"):
        check_overlay("other", tmp_path)


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"regmap_version": REGMAP_VERSION + 1}, VersionMismatch, "register map version"),
        ({"sha256": "0" * 64}, ArtifactError, "SHA-256"),
        ({"hwh_sha256": "0" * 64}, ArtifactError, "cimlab_ctrl.hwh has SHA-256"),
        ({"file": "gone.bit"}, ArtifactError, "gone.bit is missing"),
        ({"file": "../escape.bit"}, ArtifactError, "plain file name"),
        ({"sha256": "xyz"}, ArtifactError, "64 lower-case hex"),
        ({"interfaces": {}}, ArtifactError, "ctrl"),
        ({"build_id": 2**40}, ArtifactError, "build_id"),
        ({"profile": 3}, ArtifactError, "profile"),
    ],
)
def test_manifest_problems_are_named(tmp_path: Path, changes: dict, error: type, words: str) -> None:
    (tmp_path / "cimlab_ctrl.bit").write_bytes(b"bit")
    (tmp_path / "cimlab_ctrl.hwh").write_text("<hwh/>")
    write_manifest(tmp_path, **changes)
    with pytest.raises(error, match=words):
        check_overlay("cimlab_ctrl", tmp_path)


# ---- cimlab board serve ----------------------------------------------------------------------------------
def test_board_serve_puts_the_device_end_on_tcp(board) -> None:
    folder, _, _ = board
    program = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from board_fakes import FakeFabric, make_fake_pynq\n"
        "from cimlab.firmware_bridge.spec import MacroSpec\n"
        "sys.modules['pynq'] = make_fake_pynq(FakeFabric(MacroSpec(rows=24, cols=5, rows_per_conversion=8)))\n"
        "from cimlab.cli import main\n"
        "sys.argv = ['cimlab', 'board', 'serve', '--tcp', '127.0.0.1:0', '--dir', sys.argv[2],\n"
        "            '--chip-id', 'b1']\n"
        "main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", program, str(Path(__file__).parent), str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert select.select([proc.stdout], [], [], 30)[0], proc.stderr.read1() if proc.poll() else "no output"
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("tcp://127.0.0.1:")
        with Chip.open(url, timeout=2.0) as chip:
            assert chip.hello.chip_id == "b1" and chip.spec == SPEC
            assert chip.read_reg("SCRATCH") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_board_serve_needs_one_port() -> None:
    from cimlab.cli import cli
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["board", "serve"])
    assert result.exit_code == 2 and "exactly one of --tcp" in result.output


# ---- the board-side code's rules ---------------------------------------------------------------------------
BOARD_MODULES = sorted((REPO / "firmware_bridge").glob("*.py"))


@pytest.mark.parametrize("path", BOARD_MODULES, ids=lambda p: p.name)
def test_board_side_code_is_python_3_10_and_imports_no_host_code(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 10))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    forbidden = {"tomllib", "torch", "typing.Self"}
    assert not imported & forbidden, imported & forbidden
    outside = {m for m in imported if m.startswith("cimlab.") and not m.startswith("cimlab.firmware_bridge")}
    assert not outside, f"{path.name} imports {outside}"

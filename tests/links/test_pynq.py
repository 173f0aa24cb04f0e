"""pynq://: manifest checks, and the DMA link against a fake ``pynq`` module whose DMA feeds a Bridge."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.errors import (
    ArtifactError,
    BackendUnavailable,
    CimTimeoutError,
    ConfigError,
    LinkError,
    VersionMismatch,
)
from cimlab.firmware_bridge.frame import OVERHEAD, PROTOCOL_VERSION, REPLY_FLAG, encode_frame
from cimlab.firmware_bridge.messages import Opcode
from cimlab.firmware_bridge.registers import REGMAP_VERSION
from cimlab.links import open_link
from cimlab.links.pynq_board import BITSTREAMS_DIR, PynqLink, check_overlay, load_manifest, sha256_file
from links_fakes import FakeController, frames_in, make_fake_pynq, ping_traffic, read_exactly

MAX_PAYLOAD = 4096


def _write_manifest(folder: Path, **changes: object) -> dict:
    entry = {
        "name": "cimlab_ctrl",
        "file": "cimlab_ctrl.bit",
        "sha256": None,
        "hwh": "cimlab_ctrl.hwh",
        "hwh_sha256": None,
        "protocol_version": PROTOCOL_VERSION,
        "regmap_version": REGMAP_VERSION,
        "max_payload": MAX_PAYLOAD,
        "interfaces": {"dma": "axi_dma_0"},
    }
    entry.update(changes)
    (folder / "manifest.json").write_text(json.dumps({"manifest_version": 1, "overlays": [entry]}))
    return entry


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A bitstreams folder with a (fake) built overlay, and a fake pynq whose DMA feeds a Bridge."""
    (tmp_path / "cimlab_ctrl.bit").write_bytes(b"\x00bitstream\xff" * 100)
    (tmp_path / "cimlab_ctrl.hwh").write_text("<hwh/>")
    _write_manifest(
        tmp_path,
        sha256=sha256_file(tmp_path / "cimlab_ctrl.bit"),
        hwh_sha256=sha256_file(tmp_path / "cimlab_ctrl.hwh"),
    )
    bridge = Bridge(FakeController(), max_payload=MAX_PAYLOAD)
    fake = make_fake_pynq(bridge)
    monkeypatch.setitem(sys.modules, "pynq", fake)
    return tmp_path, fake


def test_hello_through_the_dma(board):
    folder, fake = board
    with open_link(f"pynq://cimlab_ctrl?dir={folder}") as link:
        assert isinstance(link, PynqLink)
        assert fake.loaded == [str(folder / "cimlab_ctrl.bit")]
        assert [len(b) for b in fake.buffers] == [MAX_PAYLOAD + OVERHEAD] * 2
        link.write(encode_frame(Opcode.HELLO, 9, m.Hello(MAX_PAYLOAD).encode()))
        (reply,) = frames_in(read_exactly(link, 1, 1.0) + link.read(1 << 16, 0.05))
        assert reply.opcode == Opcode.HELLO | REPLY_FLAG and reply.seq == 9
        assert m.Identity.decode(reply.payload).max_payload == MAX_PAYLOAD
    assert all(b.freed for b in fake.buffers)


def test_big_writes_are_split_into_buffer_sized_transfers(board):
    folder, fake = board
    req, rep, payloads = ping_traffic(64 * 1024, MAX_PAYLOAD)
    with open_link(f"pynq://cimlab_ctrl?dir={folder}") as link:
        link.write(req)
        got = read_exactly(link, len(rep), 5.0)
    assert [f.payload for f in frames_in(got)] == payloads
    sends = [n for kind, n in fake.dma.log if kind == "send"]
    assert sum(sends) == len(req) and max(sends) <= MAX_PAYLOAD + OVERHEAD


def test_small_reads_take_a_packet_in_pieces(board):
    folder, _ = board
    with open_link(f"pynq://cimlab_ctrl?dir={folder}") as link:
        req, rep, _ = ping_traffic(100, 100)
        link.write(req)
        pieces = []
        while sum(map(len, pieces)) < len(rep):
            piece = link.read(10, 1.0)
            assert 1 <= len(piece) <= 10
            pieces.append(piece)
        assert b"".join(pieces) == rep


def test_read_times_out_empty(board):
    folder, _ = board
    with open_link(f"pynq://cimlab_ctrl?dir={folder}") as link:
        t0 = time.monotonic()
        assert link.read(100, 0.1) == b""
        assert 0.1 <= time.monotonic() - t0 <= 0.35


def test_stuck_send_is_a_timeout(board):
    folder, fake = board
    fake.dma.sendchannel.stuck = True
    with open_link(f"pynq://cimlab_ctrl?dir={folder}", timeout=0.2) as link:
        t0 = time.monotonic()
        with pytest.raises(CimTimeoutError, match="not taking data"):
            link.write(b"x" * 100)
        assert time.monotonic() - t0 <= 0.2 + 0.25


def test_dma_error_is_a_link_error(board):
    folder, fake = board
    with open_link(f"pynq://cimlab_ctrl?dir={folder}") as link:
        fake.dma.packets.append(b"z" * (MAX_PAYLOAD + OVERHEAD + 1))  # longer than the receive buffer
        with pytest.raises(LinkError, match="receive"):
            link.read(10, 0.5)


def test_close_stops_the_receive_and_is_idempotent(board):
    folder, fake = board
    link = open_link(f"pynq://cimlab_ctrl?dir={folder}")
    link.close()
    link.close()
    assert fake.dma.recvchannel.stopped
    with pytest.raises(LinkError, match="closed"):
        link.read(1, 0.1)


def test_unknown_dma_name(board):
    folder, _ = board
    with pytest.raises(ArtifactError, match=r"axi_dma_7.*axi_dma_0"):
        open_link(f"pynq://cimlab_ctrl?dir={folder}&dma=axi_dma_7")


def test_without_pynq_the_backend_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynq", None)  # import pynq raises ImportError
    with pytest.raises(BackendUnavailable, match=r"cimlab\[board\]"):
        open_link("pynq://cimlab_ctrl")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("pynq://", ["pynq://OVERLAY"]),
        ("pynq://x/y", ["pynq://OVERLAY"]),
        ("pynq://cimlab_ctrl?speed=1", ["unknown option", "speed"]),
    ],
)
def test_bad_pynq_urls(url, words):
    with pytest.raises(ConfigError) as info:
        open_link(url)
    for word in words:
        assert word in str(info.value)


# ---- the manifest ----------------------------------------------------------------------------------------
def test_repository_manifest_matches_this_host():
    overlays = load_manifest(BITSTREAMS_DIR)
    entry = overlays["cimlab_ctrl"]
    assert entry.protocol_version == PROTOCOL_VERSION
    assert entry.regmap_version == REGMAP_VERSION
    assert entry.dma == "axi_dma_0"
    bit = BITSTREAMS_DIR / entry.file
    if bit.is_file():  # a built overlay was added: it must check out
        assert check_overlay("cimlab_ctrl")[1] == bit
    else:
        with pytest.raises(ArtifactError, match=r"missing.*README"):
            check_overlay("cimlab_ctrl")


def test_unknown_overlay_lists_the_known_ones(tmp_path):
    _write_manifest(tmp_path)
    with pytest.raises(ConfigError, match=r"'other'.*known: cimlab_ctrl"):
        check_overlay("other", tmp_path)


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"protocol_version": PROTOCOL_VERSION + 1}, VersionMismatch, "protocol version"),
        ({"regmap_version": REGMAP_VERSION + 1}, VersionMismatch, "register map version"),
        ({"sha256": "0" * 64}, ArtifactError, "SHA-256"),
        ({"hwh_sha256": "0" * 64}, ArtifactError, "cimlab_ctrl.hwh has SHA-256"),
        ({"file": "gone.bit"}, ArtifactError, "gone.bit is missing"),
        ({"file": "../escape.bit"}, ArtifactError, "plain file name"),
        ({"sha256": "xyz"}, ArtifactError, "64 lower-case hex"),
        ({"max_payload": 3}, ArtifactError, "max_payload"),
        ({"interfaces": {}}, ArtifactError, "dma"),
        ({"protocol_version": "1"}, ArtifactError, "protocol_version"),
    ],
)
def test_manifest_mismatches_fail_loudly(tmp_path, changes, error, words):
    (tmp_path / "cimlab_ctrl.bit").write_bytes(b"bits")
    (tmp_path / "cimlab_ctrl.hwh").write_text("<hwh/>")
    _write_manifest(tmp_path, **changes)
    with pytest.raises(error, match=words):
        check_overlay("cimlab_ctrl", tmp_path)


def test_unreadable_manifests(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"manifest_version": 2, "overlays": []}))
    with pytest.raises(ArtifactError, match="manifest_version"):
        load_manifest(tmp_path)


def test_checks_run_before_the_overlay_loads(board):
    folder, fake = board
    _write_manifest(folder, sha256="1" * 64)
    with pytest.raises(ArtifactError, match="SHA-256"):
        open_link(f"pynq://cimlab_ctrl?dir={folder}")
    assert fake.loaded == []

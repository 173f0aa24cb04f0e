"""Fixtures for the link tests: the sim:// factory hook and echo peers for every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

import cimlab.links.sim as sim_module
from links_fakes import EchoPty, EchoTcpServer, fake_factory, ping_traffic


@pytest.fixture
def fake_twin(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, dict[str, str]]]:
    """Make sim:// build FakeControllers (the factory hook); returns the recorded (profile, seed, overrides)."""
    made: list[tuple[str, int, dict[str, str]]] = []
    monkeypatch.setattr(sim_module, "twin_controller", fake_factory(made))
    return made


def _echo_traffic(total: int, chunk: int, seed: int = 0) -> tuple[bytes, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8).tobytes()
    return data, data


@dataclass
class Peer:
    """Something at the far end of a link URL, and what it sends back for what we send."""

    name: str
    url: str
    traffic: Callable[[int, int], tuple[bytes, bytes]]
    close: Callable[[], None]


def _ping_traffic(total: int, chunk: int) -> tuple[bytes, bytes]:
    req, rep, _ = ping_traffic(total, chunk)
    return req, rep


@pytest.fixture(params=["sim", "twin", "tcp", "pty", "socket"])
def peer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Peer]:
    """One peer per backend: sim:// (fake controller via the hook, then the real twin) answers PINGs; the
    others echo."""
    kind = request.param
    if kind == "sim":
        monkeypatch.setattr(sim_module, "twin_controller", fake_factory())
        yield Peer("sim", "sim://?max_payload=65536", _ping_traffic, lambda: None)
        return
    if kind == "twin":
        yield Peer("twin", "sim://?profile=default&seed=1", _ping_traffic, lambda: None)
        return
    if kind == "pty":
        pty = EchoPty()
        try:
            yield Peer("pty", pty.path, _echo_traffic, pty.close)
        finally:
            pty.close()
        return
    server = EchoTcpServer()
    try:
        scheme = "tcp" if kind == "tcp" else "socket"
        yield Peer(kind, f"{scheme}://127.0.0.1:{server.port}", _echo_traffic, server.close)
    finally:
        server.close()

"""Fixtures of the protocol tests: bridges over the fake controller, and a reply decoder."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from protocol_fakes import SMALL_SPEC, FakeController

from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.frame import BadFrame, Frame, Framer
from cimlab.firmware_bridge.spec import MacroSpec

MakeBridge = Callable[..., tuple[Bridge, FakeController]]


@pytest.fixture(scope="session")
def make_bridge() -> MakeBridge:
    """Factory: ``make_bridge(spec=SMALL_SPEC, **bridge_kwargs) -> (bridge, fake controller)``."""

    def make(spec: MacroSpec = SMALL_SPEC, **kwargs: object) -> tuple[Bridge, FakeController]:
        ctl = FakeController(spec)
        return Bridge(ctl, **kwargs), ctl  # type: ignore[arg-type]

    return make


def decode_all(chunks: Iterable[bytes], max_payload: int = 16 * 1024 * 1024) -> list[Frame | BadFrame]:
    """Every event a fresh framer produces from the concatenation of ``chunks``."""
    framer = Framer(max_payload)
    events: list[Frame | BadFrame] = []
    for chunk in chunks:
        events += framer.feed(chunk)
    assert framer.pending == 0, f"{framer.pending} bytes left undecoded"
    return events


@pytest.fixture(scope="session")
def decode() -> Callable[[Iterable[bytes]], list[Frame]]:
    """``decode(reply_frames) -> [Frame]``: decode bridge replies, asserting every one is a good frame."""

    def run(chunks: Iterable[bytes]) -> list[Frame]:
        events = decode_all(chunks)
        assert all(isinstance(e, Frame) for e in events), events
        return events  # type: ignore[return-value]

    return run

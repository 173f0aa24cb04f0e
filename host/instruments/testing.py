"""Test a driver against the exact commands it must send: ``expected_protocol`` (PyMeasure's idea).

::

    with expected_protocol(Keithley2400, [(":SOUR:VOLT 8.000000E-01", None), (":MEAS:CURR?", "1.5E-3")]) as smu:
        smu.source_voltage = 0.8
        assert smu.current == 1.5e-3

Each pair is (command the driver must send, reply it gets; ``None`` for a command without reply). A command
that differs from the next expected one, a query where a write was expected (or the reverse) and pairs left
over when the block ends all fail the test with a message saying what was expected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from cimlab.instruments.base import Instrument

I = TypeVar("I", bound=Instrument)


class ProtocolAdapter:
    """An adapter that checks every command against a script of (command, reply) pairs."""

    def __init__(self, pairs: Sequence[tuple[str, str | None]], name: str = "expected-protocol") -> None:
        self.pairs = list(pairs)
        self.name = name
        self.index = 0
        self.closed = False

    def _next(self, command: str, want_reply: bool) -> str | None:
        if self.index >= len(self.pairs):
            raise AssertionError(f"unexpected command {command!r}: all {len(self.pairs)} expected pairs were used")
        expected, reply = self.pairs[self.index]
        if command != expected:
            raise AssertionError(f"command #{self.index} was {command!r}, expected {expected!r}")
        if want_reply and reply is None:
            raise AssertionError(f"command #{self.index} {command!r} was sent as a query; the script has no reply")
        if not want_reply and reply is not None:
            raise AssertionError(f"command #{self.index} {command!r} expects reply {reply!r} but was only written")
        self.index += 1
        return reply

    def write(self, command: str) -> None:
        self._next(command, want_reply=False)

    def query(self, command: str) -> str:
        reply = self._next(command, want_reply=True)
        assert reply is not None
        return reply

    def close(self) -> None:
        self.closed = True

    def check_consumed(self) -> None:
        """AssertionError listing the pairs never used."""
        left = self.pairs[self.index :]
        if left:
            raise AssertionError(f"{len(left)} expected command(s) never sent: {left}")


@contextmanager
def expected_protocol(cls: type[I], pairs: Sequence[tuple[str, str | None]], **kwargs: Any) -> Iterator[I]:
    """An instance of ``cls`` on a ``ProtocolAdapter``; on a clean exit every pair must have been used."""
    adapter = ProtocolAdapter(pairs)
    inst = cls(adapter, **kwargs)  # type: ignore[call-arg]
    yield inst
    adapter.check_consumed()


__all__ = ["ProtocolAdapter", "expected_protocol"]

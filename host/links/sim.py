# URL format: sim://?profile=NAME&seed=N&max_payload=BYTES&KEY=VALUE...
#
#   sim://                                  the twin's default profile, seed 0
#   sim://?profile=default&seed=3&rows=100  any other key overrides a profile parameter (passed as text)
#   sim://?max_payload=262144#rate=3000000  append #rate=BAUD to pace it like a UART (see cimlab.links.rate)
#
# Options:
#   profile=NAME        twin profile (default "default")
#   seed=N              twin random seed, 0..2**63-1 (default 0)
#   max_payload=BYTES   largest frame payload the bridge accepts and sends, 256..16777216 (default 65536)
#   backend=python|rtl  python: the Python twin in this process (default); rtl: the RTL of bitstreams/rtl in a
#                       simulator process (cocotb), behind the same bridge and board controller a PYNQ board runs
#   simulator=NAME      with backend=rtl: verilator (the default and, for now, the only one)
"""The twin in-process, still through real frames.

``write`` feeds the bytes to a ``cimlab.firmware_bridge.bridge.Bridge`` in front of the twin's controller and queues
the reply frames it returns; ``read`` hands the queued bytes out. A partial request that has waited longer than
the bridge's inter-frame timeout is abandoned (``Bridge.poll``), so a truncated frame cannot wedge the link.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.controller import Controller
from cimlab.firmware_bridge.errors import BackendUnavailable, ConfigError
from cimlab.firmware_bridge.frame import DEFAULT_MAX_PAYLOAD, MAX_PAYLOAD_LIMIT
from cimlab.links.base import Link
from cimlab.links.url import int_param, parse_params

ControllerFactory = Callable[[str, int, dict[str, str]], Controller]
"""``(profile, seed, overrides) -> Controller``; overrides are the URL's other query keys, values as text."""


DEFAULT_PROFILE = "default"
MIN_PAYLOAD = 256


def twin_controller(profile: str, seed: int, overrides: dict[str, str]) -> Controller:
    """The twin's controller from ``cimlab.chip_sim.make_twin`` (imported only now, so host does not need chip_sim)."""
    try:
        from cimlab import chip_sim
    except ImportError as err:
        raise BackendUnavailable(f"sim:// needs the chip_sim package, which did not import: {err}") from err
    make_twin = getattr(chip_sim, "make_twin", None)
    if make_twin is None:
        raise BackendUnavailable("sim:// needs chip_sim.make_twin, which this chip_sim does not provide")
    return make_twin(profile, seed, overrides)


def rtl_twin(profile: str, seed: int, overrides: dict[str, str], simulator: str, max_payload: int):  # noqa: ANN201
    """The RTL twin (``cimlab.chip_sim.rtl.twin.RtlTwin``), imported only now."""
    try:
        from cimlab.chip_sim.rtl.twin import RtlTwin
    except ImportError as err:
        raise BackendUnavailable(f"sim://?backend=rtl needs the RTL twin, which did not import: {err}") from err
    return RtlTwin(profile, seed, overrides, simulator=simulator, max_payload=max_payload)


class SimLink(Link):
    """The twin behind a Bridge, in this process.

    Args:
        url: ``sim://?...`` (see the module comment).
        timeout: seconds (kept for the Link contract; writes here never wait on a line).
        make_controller: builds the controller from (profile, seed, overrides); defaults to the twin.
    """

    def __init__(
        self, url: str, *, timeout: float = 1.0, make_controller: ControllerFactory | None = None
    ) -> None:
        super().__init__(url, timeout=timeout)
        where = f"sim link {url!r}"
        parts = urlsplit(url)
        if parts.scheme.lower() != "sim":
            raise ConfigError(f"{where}: scheme must be sim://")
        if parts.netloc or parts.path not in ("", "/"):
            raise ConfigError(
                f"{where}: sim:// takes no host or path ({parts.netloc + parts.path!r});"
                " use sim://?profile=NAME&seed=N"
            )
        params = parse_params(parts.query, where)
        self.profile = params.pop("profile", DEFAULT_PROFILE)
        self.seed = int_param(params, "seed", 0, 2**63 - 1, 0, where)
        params.pop("seed", None)
        max_payload = int_param(params, "max_payload", MIN_PAYLOAD, MAX_PAYLOAD_LIMIT, DEFAULT_MAX_PAYLOAD, where)
        params.pop("max_payload", None)
        backend = params.pop("backend", "python")
        simulator = params.pop("simulator", "verilator")
        if backend not in ("python", "rtl"):
            raise ConfigError(f"{where}: backend={backend!r} is not python or rtl")
        self.overrides = params
        self._cond = threading.Condition()
        self._rx = bytearray()
        self.rtl = None
        if backend == "rtl":  # the bridge runs in the simulator process, as on a board's processor
            self.rtl = rtl_twin(self.profile, self.seed, dict(params), simulator, max_payload)
            return
        factory = make_controller if make_controller is not None else twin_controller
        self.controller = factory(self.profile, self.seed, dict(params))
        self.bridge = Bridge(self.controller, max_payload=max_payload)

    def _write(self, data: memoryview) -> None:
        if self.rtl is not None:
            self.rtl.write(data, self.write_deadline(len(data)))
            return
        with self._cond:
            replies = self.bridge.receive(data)
            if replies:
                self._rx += b"".join(replies)
                self._cond.notify_all()

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        if self.rtl is not None:
            return self.rtl.read(max_bytes, timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._rx:
                    out = bytes(self._rx[:max_bytes])
                    del self._rx[:max_bytes]
                    return out
                now = time.monotonic()
                wake = self.bridge.wake_at()
                if wake is not None and now >= wake:
                    # the bridge's inter-frame timeout or a hold expired: replies may come of it
                    self._rx += b"".join(self.bridge.poll(now))
                    continue
                left = deadline - now
                if left <= 0:
                    return b""
                if wake is not None:
                    left = min(left, wake - now)
                self._cond.wait(max(left, 0.0))

    def _close(self) -> None:
        if self.rtl is not None:
            self.rtl.close()
            return
        with self._cond:
            self._rx.clear()
            self._cond.notify_all()

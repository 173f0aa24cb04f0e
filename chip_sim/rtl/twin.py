"""Start an RTL twin: the simulator process, and the channel to it.

``RtlTwin`` builds the RTL for the profile (cached, ``cimlab.chip_sim.rtl.build``), listens on a Unix socket in a
private temporary folder, and starts the simulator with ``cimlab.chip_sim.rtl.sim`` as cocotb's test, which
connects back. In ``channel`` mode the socket carries the protocol's bytes (the ``sim://?backend=rtl`` link); in
``pty`` or ``tcp`` mode the simulated device serves a pseudo-terminal or a TCP port itself and reports where on
the socket (``cimlab sim serve --backend rtl``). Closing the twin closes the socket; the simulation then ends.
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from cimlab.chip_sim.profiles import load_profile
from cimlab.chip_sim.rng import check_seed
from cimlab.chip_sim.rtl.build import CONFIG_ENV, build
from cimlab.firmware_bridge.errors import CimTimeoutError, LinkError
from cimlab.firmware_bridge.serve import IDLE_TIMEOUT_S, check_exposure

START_TIMEOUT_S = 120.0
"""How long the simulator may take to start and connect (it loads Python and the design)."""
STOP_TIMEOUT_S = 10.0
LOG_TAIL = 6000


class RtlTwin:
    """One simulated board (see the module docstring).

    Args:
        profile: profile name or file.
        seed: the twin's seed (mismatch and noise, as for the Python twin).
        overrides: profile parameter overrides.
        simulator: ``verilator`` (``cimlab.chip_sim.rtl.build.SIMULATORS``).
        max_payload: the bridge's largest payload, bytes.
        serve: ``channel``, ``pty`` or ``tcp``.
        host, port, token, allow_remote, idle_timeout_s: for ``tcp``, as ``cimlab.firmware_bridge.serve.serve_tcp``
            takes them (loopback unless ``allow_remote``, which needs ``token``).
        baud: pace a served port like a UART.
        run_timeout_s: the board controller's deadline for one run of the sequencer (wall-clock seconds).
        macro_hooks: test hooks of the behavioural macro (``AnalogMacro``'s ``adc_extra``, ``adc_stall_at``).
    """

    def __init__(
        self,
        profile: str = "default",
        seed: int = 0,
        overrides: Mapping[str, str | int | float | bool] | None = None,
        *,
        simulator: str = "verilator",
        max_payload: int = 65536,
        serve: str = "channel",
        host: str = "127.0.0.1",
        port: int = 0,
        token: bytes | None = None,
        allow_remote: bool = False,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        baud: int | None = None,
        run_timeout_s: float = 60.0,
        macro_hooks: Mapping[str, object] | None = None,
    ) -> None:
        if serve == "tcp":
            check_exposure(host, allow_remote=allow_remote, token=token)
        prof = load_profile(profile, dict(overrides or {}))
        self.profile = prof
        self.simulator = simulator
        self.build = build(prof, simulator)
        self._dir = Path(tempfile.mkdtemp(prefix="cimlab-rtl-"))
        self._log_path = self._dir / "sim.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: socket.socket | None = None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path = self._dir / "channel"
            listener.bind(str(path))
            listener.listen(1)
            config = {
                "profile": prof.to_toml(),
                "seed": check_seed(seed),
                "socket": str(path),
                "serve": serve,
                "host": host,
                "port": port,
                "token": token.hex() if token else None,
                "allow_remote": allow_remote,
                "idle_timeout_s": idle_timeout_s,
                "baud": baud,
                "max_payload": max_payload,
                "simulator": simulator,
                "chip_id": f"rtl-{prof.name}-s{seed}"[:255],
                "run_timeout_s": run_timeout_s,
                "macro": dict(macro_hooks or {}),
            }
            env = self.build.environment({CONFIG_ENV: json.dumps(config)})
            with open(self._log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self.build.command(),
                    cwd=self._dir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            self.channel = self._accept(listener)
        except BaseException:
            listener.close()
            self.close()
            raise
        listener.close()

    def _accept(self, listener: socket.socket) -> socket.socket:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ready, _, _ = select.select([listener], [], [], 0.1)
            if ready:
                conn, _ = listener.accept()
                return conn
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise LinkError(
                    f"the RTL simulator exited ({self.proc.returncode}) before it connected:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise CimTimeoutError(f"the RTL simulator did not connect within {START_TIMEOUT_S:g} s")

    def log_tail(self) -> str:
        """The end of the simulator's output."""
        try:
            return self._log_path.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return "(no log)"

    def where(self, timeout: float = START_TIMEOUT_S) -> str:
        """In ``pty``/``tcp`` mode: where the simulated board serves (the line it reports)."""
        assert self.channel is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.channel], [], [], left)[0]:
                raise CimTimeoutError(f"the RTL twin did not report where it serves within {timeout:g} s")
            chunk = self.channel.recv(256)
            if not chunk:
                raise LinkError(f"the RTL twin stopped before it served:\n{self.log_tail()}")
            line += chunk
        return line.decode().strip()

    # ---- the channel's bytes (channel mode) ------------------------------------------------------------------
    def write(self, data: bytes | memoryview, timeout: float) -> None:
        """Send bytes to the simulated board, within ``timeout`` seconds."""
        assert self.channel is not None
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.channel], [], left)[1]:
                raise CimTimeoutError(f"the RTL twin took no bytes for {timeout:g} s")
            try:
                sent = self.channel.send(view)
            except OSError as err:
                raise LinkError(f"the RTL twin's channel failed: {err}\n{self.log_tail()}") from err
            view = view[sent:]

    def read(self, max_bytes: int, timeout: float) -> bytes:
        """Up to ``max_bytes`` from the simulated board; b"" when none came within ``timeout`` seconds."""
        assert self.channel is not None
        if not select.select([self.channel], [], [], max(0.0, timeout))[0]:
            return b""
        try:
            data = self.channel.recv(max_bytes)
        except OSError as err:
            raise LinkError(f"the RTL twin's channel failed: {err}\n{self.log_tail()}") from err
        if not data:
            raise LinkError(f"the RTL twin stopped:\n{self.log_tail()}")
        return data

    def close(self) -> None:
        """Close the channel, let the simulation end (kill it after STOP_TIMEOUT_S), remove the folder."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None:
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RtlTwin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

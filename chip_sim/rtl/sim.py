"""The RTL twin inside the simulator: the board's device end over simulated AXI4-Lite (a cocotb test module).

``cimlab.chip_sim.rtl.twin`` starts the simulator with this module as cocotb's test; it reads its configuration
from ``$CIMLAB_RTL_CONFIG`` (JSON: the profile as TOML, the seed, the channel's socket path, and what to serve).
It starts the clock and the behavioural macro's analog half (``cimlab.chip_sim.rtl.macro``), then runs, in a thread
that ``cocotb.task.bridge`` pauses the simulation for, exactly what runs on a board's ARM: a
``cimlab.firmware_bridge.bridge.Bridge`` over a ``cimlab.firmware_bridge.board.FabricController``. The
controller's bus (``SimBus``) turns every register and buffer access into AXI4-Lite transactions (cocotbext-axi)
through ``cocotb.task.resume``: simulated time passes only while the processor touches the fabric or waits for
it, as on a board. The simulation ends when the channel closes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import cocotb
import numpy as np
from cimlab.chip_sim.controller import TwinController
from cimlab.chip_sim.profiles import profile_from_toml
from cimlab.chip_sim.rtl.build import CONFIG_ENV
from cimlab.chip_sim.rtl.macro import AnalogMacro
from cimlab.firmware_bridge.board import FabricController
from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.serve import serve_fd, serve_pty, serve_tcp
from cocotb.clock import Clock
from cocotb.task import bridge, resume
from cocotb.triggers import ClockCycles, First, RisingEdge, Timer
from cocotbext.axi import AxiLiteBus, AxiLiteMaster

WAIT_CHUNK_CYCLES = 4096
"""Cycles simulated between two checks of the wall-clock deadline while waiting for a run."""


class SimBus:
    """``FabricBus`` over a cocotbext-axi AXI4-Lite master; call only from the ``cocotb.bridge`` thread."""

    def __init__(self, dut: Any, master: AxiLiteMaster, period_ns: int) -> None:
        self.dut = dut
        self.master = master
        self.period_ns = period_ns
        self.read32 = resume(self._read32)
        self.write32 = resume(self._write32)
        self.read_block = resume(self._read_block)
        self.write_block = resume(self._write_block)
        self.wait_irq = resume(self._wait_irq)

    async def _read32(self, offset: int) -> int:
        return int.from_bytes((await self.master.read(offset, 4)).data, "little")

    async def _write32(self, offset: int, value: int) -> None:
        await self.master.write(offset, int(value).to_bytes(4, "little"))

    async def _read_block(self, offset: int, n_words: int) -> np.ndarray:
        return np.frombuffer((await self.master.read(offset, 4 * n_words)).data, dtype="<u4").astype(np.uint32)

    async def _write_block(self, offset: int, words: np.ndarray) -> None:
        await self.master.write(offset, np.ascontiguousarray(words, dtype="<u4").tobytes())

    async def _wait_irq(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        chunk = Timer(WAIT_CHUNK_CYCLES * self.period_ns, unit="ns")
        while not int(self.dut.irq.value):
            if time.monotonic() >= deadline:
                return False
            await First(RisingEdge(self.dut.irq), chunk)
        return True


def _serve(config: dict[str, Any], bridge_of: Any, channel: socket.socket) -> None:
    """The processor's program: build the controller and bridge, then serve until the channel closes."""
    bridge = bridge_of()
    mode = config.get("serve", "channel")
    if mode == "channel":
        serve_fd(bridge, channel.fileno())
        return
    stop = threading.Event()

    def watch() -> None:  # the parent closes the channel to stop us
        try:
            channel.recv(1)
        except OSError:
            pass
        stop.set()

    def ready(where: str) -> None:
        channel.sendall(f"{where}\n".encode())

    watcher = threading.Thread(target=watch, name="rtl-twin-stop", daemon=True)
    watcher.start()
    if mode == "pty":
        serve_pty(bridge, stop=stop, on_ready=ready, baud=config.get("baud"))
    else:
        token = bytes.fromhex(config["token"]) if config.get("token") else None
        serve_tcp(bridge, config["host"], config["port"], stop=stop, on_ready=ready, baud=config.get("baud"),
                  token=token, allow_remote=config["allow_remote"], idle_timeout_s=config["idle_timeout_s"])


@cocotb.test()
async def rtl_twin(dut: Any) -> None:
    """Serve the RTL twin (see the module docstring)."""
    config = json.loads(os.environ[CONFIG_ENV])
    profile = profile_from_toml(config["profile"], source="the RTL twin's profile")
    twin = TwinController(profile, config["seed"])
    period_ns = max(1, round(1e9 / profile.spec.clock_hz))
    dut.aresetn.value = 0
    dut.ext_code.value = 0
    dut.adc_extra.value = 0
    dut.adc_stall.value = 0
    for name in (
        "awvalid",
        "wvalid",
        "bready",
        "arvalid",
        "rready",
        "awaddr",
        "araddr",
        "wdata",
        "wstrb",
        "awprot",
        "arprot",
    ):  # defined before the master drives them (4-state simulators start at Z)
        getattr(dut, f"s_axi_{name}").value = 0
    await Timer(1, unit="ns")
    Clock(dut.aclk, period_ns, unit="ns", impl="gpi").start()
    master = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi"), dut.aclk, dut.aresetn, reset_active_level=False)
    master.write_if.log.setLevel("WARNING")
    master.read_if.log.setLevel("WARNING")
    await ClockCycles(dut.aclk, 4)
    dut.aresetn.value = 1
    await ClockCycles(dut.aclk, 2)
    hooks = config.get("macro", {})
    macro = AnalogMacro(
        dut,
        twin.converter,
        config["seed"],
        adc_extra=hooks.get("adc_extra"),
        adc_stall_at=hooks.get("adc_stall_at"),
    )
    cocotb.start_soon(macro.watch_writes())
    cocotb.start_soon(macro.watch_noise_seed())
    cocotb.start_soon(macro.watch_conversions())
    bus = SimBus(dut, master, period_ns)
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.connect(config["socket"])

    def bridge_of() -> Bridge:
        controller = FabricController(
            bus,
            chip_id=config["chip_id"],
            energy=twin.activity_energy,
            run_timeout_s=config.get("run_timeout_s", 60.0),
            bitstream_id=f"rtl-{config['simulator']}",
        )
        return Bridge(controller, max_payload=config["max_payload"])

    try:
        await bridge(_serve)(config, bridge_of, channel)
    finally:
        channel.close()

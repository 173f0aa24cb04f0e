"""The analog half of the behavioural macro (``bitstreams/rtl/cim_macro_model.sv``): each conversion drawn from the
twin's converter, so the RTL twin's codes can equal the Python twin's bit for bit.

Runs in the simulator under cocotb. It watches the macro port as a chip would see it: every SRAM row write (to
know what the cells compute with: ``Converter.compute_digits``, with the profile's cell variation and stuck cells),
and every conversion start (row group, input plane, the group's input slices, the supply and temperature outputs).
It computes the partial sums of every physical column, converts them with the random items of the vector's
global index (``cimlab.chip_sim.rng.VectorStream``, as the Python twin does), and drives ``ext_code`` before the
model raises ``m_adc_done``. A vector begins where the conversion order (planes most significant first, then row
groups) starts over.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cimlab.chip_sim.analog import Converter


def unpack_fields(value: int, n: int, bits: int) -> np.ndarray:
    """An unsigned integer -> its ``n`` fields of ``bits`` bits, least significant first (int64)."""
    nbytes = (n * bits + 7) // 8
    raw = np.frombuffer(value.to_bytes(nbytes, "little"), dtype=np.uint8)
    b = np.unpackbits(raw, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
    return (b << np.arange(bits, dtype=np.int64)).sum(axis=1)


def pack_fields(values: np.ndarray, bits: int) -> int:
    """Unsigned values of ``bits`` bits each -> one integer, the first value least significant."""
    v = np.asarray(values, dtype=np.int64)
    b = ((v[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8).ravel()
    return int.from_bytes(np.packbits(b, bitorder="little").tobytes(), "little")


class AnalogMacro:
    """The conversions of one RTL twin (see the module docstring).

    Args:
        dut: the ``cimlab_sim_top`` handle.
        converter: the twin's converter (its static mismatch drawn from the twin's seed).
        seed: the twin's seed (the per-vector random stream).
        adc_extra: test hook: extra cycles of conversion ``i``, ``adc_extra[i % len(adc_extra)]``.
        adc_stall_at: test hook: conversion ``i`` never completes (the macro hangs until the next start).
    """

    def __init__(
        self,
        dut: Any,
        converter: Converter,
        seed: int,
        *,
        adc_extra: list[int] | None = None,
        adc_stall_at: int | None = None,
    ) -> None:
        self.dut = dut
        self.converter = converter
        spec = self.spec = converter.spec
        self.stream = converter.stream(seed)
        rows_pad = spec.n_groups * spec.rows_per_conversion
        self.compute = np.zeros((rows_pad, spec.physical_cols), dtype=np.float32)
        self.compute[: spec.rows] = converter.compute_digits(
            np.zeros((spec.rows, spec.physical_cols), np.uint8), 0
        )
        self.vector_counter = 0
        self.conversions = 0
        self._items: np.ndarray | None = None
        self._last_key: tuple[int, int] | None = None
        self._conditions: tuple[int, int] | None = None
        self.adc_extra = list(adc_extra or [])
        self.adc_stall_at = adc_stall_at

    async def watch_noise_seed(self) -> None:
        """Rekey the per-conversion stream at every write of NOISE_SEED, and rewind it, as the Python twin does."""
        from cocotb.triggers import RisingEdge  # noqa: PLC0415 - only inside the simulator

        dut = self.dut
        while True:
            await RisingEdge(dut.m_noise_seed_wr)
            await RisingEdge(dut.aclk)  # the register takes the written word at this edge
            await RisingEdge(dut.aclk)
            if self.stream is not None:
                self.stream.rekey(int(dut.m_noise_seed.value))
            self.vector_counter = 0
            self._last_key = None

    async def watch_writes(self) -> None:
        """Mirror every SRAM row write into the compute weights."""
        from cocotb.triggers import RisingEdge  # noqa: PLC0415 - only inside the simulator

        dut, spec = self.dut, self.spec
        while True:
            await RisingEdge(dut.m_sram_we)
            row = int(dut.m_sram_addr.value)
            if row >= spec.rows:
                continue
            digits = unpack_fields(int(dut.m_sram_wdata.value), spec.physical_cols, spec.cell_bits)
            self.compute[row] = self.converter.compute_digits(digits.astype(np.uint8)[None, :], row)[0]

    async def watch_conversions(self) -> None:
        """Answer every conversion start with the converter's codes."""
        from cocotb.triggers import RisingEdge  # noqa: PLC0415

        dut = self.dut
        while True:
            await RisingEdge(dut.m_adc_start)
            group, plane = int(dut.m_grp.value), int(dut.m_wl_plane.value)
            self._set_conditions(int(dut.m_vdd_mv.value), int(dut.m_temp_cc.value))
            index = self.conversions
            if self.adc_extra:
                dut.adc_extra.value = self.adc_extra[index % len(self.adc_extra)]
            dut.adc_stall.value = int(index == self.adc_stall_at)
            codes = self.convert(group, plane, int(dut.m_wl_data.value))
            dut.ext_code.value = pack_fields(codes, self.spec.adc_bits)

    def _set_conditions(self, vdd_mv: int, temp_cc: int) -> None:
        if self._conditions != (vdd_mv, temp_cc):
            self._conditions = (vdd_mv, temp_cc)
            signed = temp_cc - (1 << 32) if temp_cc & 0x8000_0000 else temp_cc
            self.converter.set_conditions(vdd_mv, signed / 100.0)

    def convert(self, group: int, plane: int, wl_data: int) -> np.ndarray:
        """Codes [physical_cols] of one conversion of ``group`` for input ``plane`` (its slices in ``wl_data``)."""
        spec = self.spec
        key = (spec.n_planes - 1 - plane, group)
        if self._last_key is None or key <= self._last_key:
            self._new_vector()
        self._last_key = key
        R = spec.rows_per_conversion
        x = unpack_fields(wl_data, R, spec.input_slice_bits).astype(np.float32)
        sums = (x @ self.compute[group * R : (group + 1) * R]).reshape(1, 1, 1, -1)  # exact integers in float32
        items = None
        if self._items is not None:
            items = self._items[plane, group].reshape(1, 1, 1, -1)
        self.conversions += 1
        return self.converter.convert(sums, items).reshape(-1)

    def _new_vector(self) -> None:
        spec = self.spec
        if self.stream is not None:
            self._items = self.stream.draw(self.vector_counter, 1)[0].reshape(
                spec.n_planes, spec.n_groups, spec.physical_cols
            )
        self.vector_counter += 1

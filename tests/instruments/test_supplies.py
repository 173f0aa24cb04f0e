"""Supplies: PyMeasure's drivers behind BenchSupply. Exact SCPI (PyMeasure's expected_protocol), limits checked
before anything is sent, ramps from 0, output off on every exit, pyvisa-sim, and the charge sampler."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pymeasure.instruments.keithley import Keithley2400, Keithley2450
from pymeasure.instruments.keysight import KeysightE36312A
from pymeasure.test import expected_protocol

from cimlab.chip_sim.profiles import load_profile
from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError, DeviceError
from cimlab.instruments import CurrentSampler, Reading, SupplyLimits, open_supply, sim_bench_yaml, source_for_idn
from cimlab.instruments.keysight import KeysightE364xA
from cimlab.instruments.supplies import (
    BenchSupply,
    Keithley2400Source,
    Keithley2450Source,
    KeysightE364xASource,
    KeysightE3631ASource,
    KeysightE36312ASource,
)

HERE = Path(__file__).parent
BENCH = f"{sim_bench_yaml()}@sim"
FAULTY = f"{HERE / 'faulty.yaml'}@sim"
K2400 = "GPIB0::24::INSTR"
K2450 = "USB0::0x05E6::0x2450::04000001::INSTR"
E36312A = "USB0::0x2A8D::0x1102::MY00000001::INSTR"
LIMITS = SupplyLimits(v_min=0.6, v_max=1.0, compliance_a=0.01, ramp_step_v=0.25, ramp_dwell_s=0.0, source="test")
FORMAT = (":FORMAT:ELEMENTS VOLTAGE, CURRENT, RESISTANCE, TIME, STATUS", None)
NO_ERROR = ("SYST:ERR?", '0,"No error"')


def no_sleep(_s: float) -> None:
    """Ramp dwell in tests: none."""


class TestExactCommands:
    def test_k2400_compliance_and_zero_before_output_on_then_a_ramp_and_off(self) -> None:
        pairs = [
            FORMAT,
            ("OUTPUT 0", None), (":SOURCE:FUNCTION VOLT", None),
            (":SENSE:CURRENT:PROTECTION 0.01", None), (":SOURCE:VOLTAGE 0", None),  # compliance, 0 V ...
            NO_ERROR,
            ("OUTPUT 1", None),  # ... before the output turns on
            (":SOURCE:VOLTAGE 0.2", None), (":SOURCE:VOLTAGE 0.4", None), (":SOURCE:VOLTAGE 0.6", None),
            (":SOURCE:VOLTAGE 0.8", None),  # ramp from 0 in steps of at most 0.25 V
            (":MEASURE:CURRENT?", "+8.0E-01,+1.5E-03,+9.91E+37,+2.5E+00,+0.0E+00"),
            (":SOURCE:VOLTAGE 0.6", None), (":SOURCE:VOLTAGE 0.4", None), (":SOURCE:VOLTAGE 0.2", None),
            (":SOURCE:VOLTAGE 0", None),  # ramp down ...
            ("OUTPUT 0", None), (":SOURCE:VOLTAGE 0", None),  # ... and off
        ]
        with expected_protocol(Keithley2400, pairs) as inst:
            supply = BenchSupply(Keithley2400Source(inst), LIMITS, sleep=no_sleep)
            with supply.powered(0.8):
                assert supply.read() == Reading(1.5e-3, 2.5)

    def test_k2450_reads_the_current_with_its_timestamp(self) -> None:
        pairs = [
            ("OUTPUT OFF", None), (":SOUR:FUNC VOLT", None),
            (":SENS:FUNC 'CURR';:SENS:CURR:NPLC 1.000000;", None), (":SENS:CURR:RANG:AUTO 1;", None), NO_ERROR,
            (":SOUR:VOLT:ILIM 0.01", None), (":SOUR:VOLT:LEV 0", None), NO_ERROR, ("OUTPUT ON", None),
            (":SOUR:VOLT:LEV 0.25", None), (":SOUR:VOLT:LEV 0.5", None), (":SOUR:VOLT:LEV 0.75", None),
            (':READ? "defbuffer1", READ, REL', "+4.2E-05,+1.25E+00"),
            ("OUTPUT OFF", None), (":SOUR:VOLT:LEV 0", None),
        ]
        with expected_protocol(Keithley2450, pairs) as inst:
            supply = BenchSupply(Keithley2450Source(inst), LIMITS, sleep=no_sleep)
            with pytest.raises(RuntimeError, match="sweep failed"), supply.powered(0.75):
                assert supply.read() == Reading(4.2e-5, 1.25)
                raise RuntimeError("sweep failed")  # an error: off at once, no ramp down

    def test_e36312a_drives_its_channel(self) -> None:
        pairs = [
            ("OUTPut 0, (@2)", None), ("CURR 0.01, (@2)", None), ("VOLT 0, (@2)", None), NO_ERROR,
            ("OUTPut 1, (@2)", None), ("VOLT 0.25, (@2)", None), ("VOLT 0.5, (@2)", None),
            ("VOLT 0.75, (@2)", None), ("MEAS:CURRent? (@2)", "+4.2E-02"),
            ("OUTPut 0, (@2)", None), ("VOLT 0, (@2)", None),
        ]
        with expected_protocol(KeysightE36312A, pairs) as inst:
            supply = BenchSupply(KeysightE36312ASource(inst, channel=2), LIMITS, sleep=no_sleep)
            with pytest.raises(KeyboardInterrupt), supply.powered(0.75):
                assert supply.read() == Reading(0.042, None)
                raise KeyboardInterrupt

    def test_e364xa_driver_in_pymeasure_style(self) -> None:
        pairs = [("OUTP 0", None), ("INST:NSEL 2", None), ("CURR 0.01", None), ("VOLT 0", None), NO_ERROR,
                 ("OUTP 1", None), ("VOLT 0.2", None), ("VOLT 0.4", None), ("VOLT 0.6", None),
                 ("MEAS:CURR?", "1.5E-03"), ("VOLT 0.4", None), ("VOLT 0.2", None), ("VOLT 0", None),
                 ("OUTP 0", None), ("VOLT 0", None)]
        with expected_protocol(KeysightE364xA, pairs) as inst:
            supply = BenchSupply(KeysightE364xASource(inst, channel=2), LIMITS, sleep=no_sleep)
            with supply.powered(0.6):
                assert supply.read().amps == pytest.approx(1.5e-3)

    def test_scpi_errors_after_configuration_keep_the_output_off(self) -> None:
        pairs = [FORMAT, ("OUTPUT 0", None), (":SOURCE:FUNCTION VOLT", None),
                 (":SENSE:CURRENT:PROTECTION 0.01", None), (":SOURCE:VOLTAGE 0", None),
                 ("SYST:ERR?", '-222,"Data out of range"'), NO_ERROR, ("OUTPUT 0", None), (":SOURCE:VOLTAGE 0", None)]
        with expected_protocol(Keithley2400, pairs) as inst:
            supply = BenchSupply(Keithley2400Source(inst), LIMITS, sleep=no_sleep)
            with pytest.raises(DeviceError, match="Data out of range"), supply.powered(0.8):
                pytest.fail("the block must not run")

    @pytest.mark.parametrize("volts", [5.0, 800.0, 0.5, -0.8, float("nan")])
    def test_a_setpoint_outside_the_limits_sends_nothing(self, volts: float) -> None:
        with expected_protocol(Keithley2400, [FORMAT]) as inst:
            supply = BenchSupply(Keithley2400Source(inst), LIMITS, sleep=no_sleep)
            with pytest.raises(ConfigError, match="nothing was sent|not a voltage"), supply.powered(volts):
                pytest.fail("unreachable")

    def test_set_voltage_is_checked_and_ramped(self) -> None:
        pairs = [FORMAT, ("OUTPUT 0", None), (":SOURCE:FUNCTION VOLT", None),
                 (":SENSE:CURRENT:PROTECTION 0.01", None), (":SOURCE:VOLTAGE 0", None), NO_ERROR,
                 ("OUTPUT 1", None), (":SOURCE:VOLTAGE 0.2", None), (":SOURCE:VOLTAGE 0.4", None),
                 (":SOURCE:VOLTAGE 0.6", None), (":SOURCE:VOLTAGE 0.8", None), (":SOURCE:VOLTAGE 1", None),
                 NO_ERROR, ("OUTPUT 0", None), (":SOURCE:VOLTAGE 0", None)]
        with expected_protocol(Keithley2400, pairs) as inst:
            supply = BenchSupply(Keithley2400Source(inst), LIMITS, sleep=no_sleep)
            with pytest.raises(ConfigError, match="1.2 V is outside"), supply.powered(0.6):
                supply.set_voltage(1.0)
                supply.set_voltage(1.2)  # refused before anything is sent; the output goes off


class TestLimits:
    def test_from_the_profile_and_the_user_cap(self) -> None:
        profile = load_profile("default")
        lim = SupplyLimits.from_profile(profile)
        assert (lim.v_min, lim.v_max) == (0.6, 1.0)
        assert lim.compliance_a == pytest.approx(profile.supply.compliance_ma / 1000)
        assert SupplyLimits.from_profile(profile, vdd_max_v=0.85).v_max == 0.85
        with pytest.raises(ConfigError, match="--vdd-max 1.2 V is above the chip's maximum 1 V"):
            SupplyLimits.from_profile(profile, vdd_max_v=1.2)
        with pytest.raises(ConfigError, match="millivolts"):
            lim.check(800.0)

    def test_ramp_steps_never_exceed_the_step(self) -> None:
        steps = LIMITS.ramp(0.0, 0.8)
        assert steps[-1] == 0.8 and max(b - a for a, b in zip([0.0, *steps], steps, strict=False)) <= 0.25 + 1e-12


class TestIdentification:
    @pytest.mark.parametrize(
        ("idn", "cls"),
        [
            ("KEITHLEY INSTRUMENTS INC.,MODEL 2400,1234567,C30", Keithley2400Source),
            ("KEITHLEY INSTRUMENTS INC.,MODEL 2410,1234567,C30", Keithley2400Source),
            ("KEITHLEY INSTRUMENTS,MODEL 2450,04000001,1.7.12b", Keithley2450Source),
            ("Keysight Technologies,E36312A,MY1234,2.1.0", KeysightE36312ASource),
            ("Agilent Technologies,E3631A,0,2.1-5.0-1.0", KeysightE3631ASource),
            ("Agilent Technologies,E3646A,0,1.7-5.0-1.0", KeysightE364xASource),
        ],
    )
    def test_idn_picks_the_driver(self, idn: str, cls: type) -> None:
        assert source_for_idn(idn) is cls

    def test_unknown_instrument_is_named(self) -> None:
        with pytest.raises(ConfigError, match="RIGOL.*known models"):
            source_for_idn("RIGOL TECHNOLOGIES,DP832,DP8A1,00.01.14")


class TestPyvisaSim:
    @pytest.mark.parametrize(("resource", "model", "current"),
                             [(K2400, "keithley2400", 1.25e-3), (K2450, "keithley2450", 2.5e-3),
                              (E36312A, "e36312a", 5e-4)])
    def test_power_cycle_on_the_simulated_bench(self, resource: str, model: str, current: float) -> None:
        supply = open_supply(resource, LIMITS, BENCH)
        supply._sleep = no_sleep
        try:
            assert supply.source.model == model
            with supply.powered(0.8):
                assert supply.volts == 0.8
                assert supply.read().amps == pytest.approx(current)
            assert supply.volts == 0.0
        finally:
            supply.close()

    def test_a_silent_instrument_times_out(self) -> None:
        supply = open_supply(K2400, LIMITS, FAULTY, timeout_s=0.2)
        try:
            with pytest.raises(CimTimeoutError, match=r"GPIB0::24::INSTR.*reading the current"):
                supply.read()
        finally:
            supply.close()

    def test_model_and_channel_rules(self) -> None:
        with pytest.raises(ConfigError, match="supply model 'hp6632'"):
            open_supply(K2400, LIMITS, BENCH, model="hp6632")
        with pytest.raises(ConfigError, match="multi-output"):
            open_supply(K2400, LIMITS, BENCH, channel=2)
        with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"GPIB0::99::INSTR.*--smu-model"):
            open_supply("GPIB0::99::INSTR", LIMITS, BENCH)  # pyvisa-sim opens it, but nothing answers


class _Meter:
    """Readings of a scripted current, timestamped on a clock that advances 1 s a reading."""

    def __init__(self, amps: list[float], stamped: bool = True, fail_after: int | None = None) -> None:
        self.amps = amps
        self.calls = 0
        self.stamped = stamped
        self.fail_after = fail_after

    def read(self) -> Reading:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise CimTimeoutError("meter silent")
        return Reading(self.amps[(self.calls - 1) % len(self.amps)], float(self.calls) if self.stamped else None)


class TestCurrentSampler:
    def test_charge_is_each_reading_times_the_time_since_the_one_before(self) -> None:
        meter = _Meter([5.0, 1.0e-3, 3.0e-3])  # the first reading (5 A) covers the time before the block
        with CurrentSampler(meter, period_s=10.0) as s:
            pass  # one reading at the start, one at the end
        assert s.summary is not None and s.summary.clock == "instrument"
        assert s.summary.samples == 2 and s.summary.duration_s == 1.0
        assert s.summary.charge_c == pytest.approx(1.0e-3) and s.summary.mean_a == pytest.approx(1.0e-3)

    def test_background_readings_use_the_host_clock_without_timestamps(self) -> None:
        meter = _Meter([2.0e-3], stamped=False)
        with CurrentSampler(meter, period_s=0.001) as s:
            threading.Event().wait(0.05)
        assert s.summary is not None and s.summary.clock == "host" and s.summary.samples >= 3
        assert s.summary.mean_a == pytest.approx(2.0e-3)

    def test_a_failing_meter_raises_in_the_caller(self) -> None:
        meter = _Meter([1.0e-3], fail_after=1)
        with pytest.raises(CimTimeoutError, match="meter silent"), CurrentSampler(meter, period_s=0.0):
            threading.Event().wait(0.02)

    def test_bad_arguments(self) -> None:
        with pytest.raises(ConfigError, match="period_s"):
            CurrentSampler(_Meter([1.0]), period_s=-1)

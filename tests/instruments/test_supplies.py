"""Supply drivers: exact SCPI (expected_protocol), validators, safe power-down, and pyvisa-sim."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError, DeviceError
from cimlab.instruments import (
    CurrentSampler,
    Keithley2400,
    Keithley2450,
    KeysightE36xx,
    driver_for_idn,
    open_supply,
    sim_bench_yaml,
)
from cimlab.instruments.testing import ProtocolAdapter, expected_protocol

HERE = Path(__file__).parent
BENCH = f"{sim_bench_yaml()}@sim"
FAULTY = f"{HERE / 'faulty.yaml'}@sim"
K2400 = "GPIB0::24::INSTR"
K2450 = "USB0::0x05E6::0x2450::04000001::INSTR"
E36312A = "USB0::0x2A8D::0x1102::MY00000001::INSTR"

NO_ERROR = '0,"No error"'

K2400_POWER_UP = [
    (":SOUR:FUNC VOLT", None),
    (':SENS:FUNC "CURR"', None),
    (":FORM:ELEM CURR", None),
    (":SENS:CURR:PROT 1.000000E-02", None),  # compliance first ...
    (":SOUR:VOLT 8.000000E-01", None),  # ... then the voltage
    (":SYST:ERR?", NO_ERROR),
    (":OUTP 1", None),
]


class TestExpectedProtocol:
    def test_k2400_power_cycle_sends_compliance_before_output_on_and_turns_off(self) -> None:
        pairs = [*K2400_POWER_UP, (":MEAS:CURR?", "+1.500000E-03"), (":OUTP 0", None)]
        with expected_protocol(Keithley2400, pairs) as smu, smu.powered(0.8, 0.01):
            assert smu.current == pytest.approx(1.5e-3)

    def test_k2450_uses_its_current_limit_command(self) -> None:
        pairs = [
            (":SOUR:FUNC VOLT", None),
            (':SENS:FUNC "CURR"', None),
            (":SOUR:VOLT:ILIM 5.000000E-02", None),
            (":SOUR:VOLT 7.000000E-01", None),
            (":SYST:ERR?", NO_ERROR),
            (":OUTP 1", None),
            (":OUTP 0", None),
        ]
        with expected_protocol(Keithley2450, pairs) as smu, smu.powered(0.7, 0.05):
            pass

    def test_e36xx_selects_its_channel_and_applies_both_values_at_once(self) -> None:
        pairs = [
            ("INST:SEL CH2", None),
            ("APPL 9.000000E-01,2.000000E-01", None),
            ("SYST:ERR?", '+0,"No error"'),
            ("OUTP 1", None),
            ("MEAS:CURR?", "+4.200000E-02"),
            ("OUTP 0", None),
        ]
        with expected_protocol(KeysightE36xx, pairs, channel="CH2") as psu, psu.powered(0.9, 0.2):
            assert psu.current == pytest.approx(0.042)

    def test_properties_read_and_write_their_commands(self) -> None:
        pairs = [
            (":SOUR:VOLT?", "+8.000000E-01"),
            (":SOUR:VOLT 1.200000E+00", None),
            (":OUTP?", "0"),
            (":SENS:CURR:PROT?", "+1.050000E-04"),
        ]
        with expected_protocol(Keithley2400, pairs) as smu:
            assert smu.source_voltage == pytest.approx(0.8)
            smu.source_voltage = 1.2
            assert smu.output_enabled is False
            assert smu.current_limit == pytest.approx(1.05e-4)

    @pytest.mark.parametrize("exc", [RuntimeError("sweep failed"), KeyboardInterrupt()])
    def test_output_turns_off_when_the_block_fails(self, exc: BaseException) -> None:
        pairs = [*K2400_POWER_UP, (":OUTP 0", None)]
        with expected_protocol(Keithley2400, pairs) as smu, pytest.raises(type(exc)), smu.powered(0.8, 0.01):
            raise exc

    def test_output_turns_off_when_configuration_fails(self) -> None:
        # the error queue reports a problem: the output must never turn on, and is commanded off
        pairs = [*K2400_POWER_UP[:5], (":SYST:ERR?", '-222,"Data out of range"'), (":SYST:ERR?", NO_ERROR),
                 (":OUTP 0", None)]
        with (
            expected_protocol(Keithley2400, pairs) as smu,
            pytest.raises(DeviceError, match="Data out of range"),
            smu.powered(0.8, 0.01),
        ):
            pytest.fail("the block must not run")

    def test_out_of_range_values_name_the_property_range_and_unit_and_send_nothing(self) -> None:
        with expected_protocol(Keithley2400, []) as smu:
            with pytest.raises(ConfigError, match=r"source_voltage=300.*-210\.\.210 V"):
                smu.source_voltage = 300
            with pytest.raises(ConfigError, match=r"current_limit=2.*1e-09\.\.1\.05 A"):
                smu.current_limit = 2.0
            with pytest.raises(ConfigError, match="output_enabled must be a boolean"):
                smu.output_enabled = "yes"
            with pytest.raises(ConfigError, match="current_limit"), smu.powered(0.8, 5.0):
                pytest.fail("unreachable")
        with (
            expected_protocol(KeysightE36xx, [], v_max=6.18) as psu,
            pytest.raises(ConfigError, match=r"source_voltage=7.*0\.\.6\.18 V"),
        ):
            psu.source_voltage = 7.0

    def test_helper_catches_wrong_and_missing_commands(self) -> None:
        with (
            pytest.raises(AssertionError, match="expected ':SOUR:VOLT 8.000000E-01'"),
            expected_protocol(Keithley2400, [(":SOUR:VOLT 8.000000E-01", None)]) as smu,
        ):
            smu.source_voltage = 0.9
        unused = [(":OUTP 0", None)]
        with pytest.raises(AssertionError, match="never sent"), expected_protocol(Keithley2400, unused):
            pass
        adapter = ProtocolAdapter([(":OUTP?", "1")])
        with pytest.raises(AssertionError, match="only written"):
            adapter.write(":OUTP?")


class TestIdentification:
    @pytest.mark.parametrize(
        ("idn", "cls"),
        [
            ("KEITHLEY INSTRUMENTS INC.,MODEL 2400,1234567,C30", Keithley2400),
            ("KEITHLEY INSTRUMENTS INC.,MODEL 2410,1234567,C30", Keithley2400),
            ("KEITHLEY INSTRUMENTS,MODEL 2450,04000001,1.7.12b", Keithley2450),
            ("Keysight Technologies,E36312A,MY1234,2.1.0", KeysightE36xx),
            ("Agilent Technologies,E3631A,0,2.1-5.0-1.0", KeysightE36xx),
        ],
    )
    def test_idn_picks_the_driver(self, idn: str, cls: type) -> None:
        assert driver_for_idn(idn) is cls

    def test_unknown_instrument_is_named(self) -> None:
        with pytest.raises(ConfigError, match="RIGOL.*known models"):
            driver_for_idn("RIGOL TECHNOLOGIES,DP832,DP8A1,00.01.14")


class TestPyvisaSim:
    @pytest.mark.parametrize(
        ("resource", "cls", "current"),
        [(K2400, Keithley2400, 1.25e-3), (K2450, Keithley2450, 2.5e-3), (E36312A, KeysightE36xx, 5e-4)],
    )
    def test_power_cycle_on_the_simulated_bench(self, resource: str, cls: type, current: float) -> None:
        channel = "CH1" if cls is KeysightE36xx else None
        supply = open_supply(resource, BENCH, channel=channel)
        try:
            assert type(supply) is cls
            assert supply.output_enabled is False
            with supply.powered(0.8, 0.1):
                assert supply.output_enabled is True
                assert supply.current == pytest.approx(current)
                if cls is not KeysightE36xx:  # the E36xx sets both with APPL (see test above)
                    assert supply.source_voltage == pytest.approx(0.8)
                    assert supply.current_limit == pytest.approx(0.1)
            assert supply.output_enabled is False
        finally:
            supply.close()

    def test_explicit_model_and_channel_rules(self) -> None:
        with pytest.raises(ConfigError, match="E36xx supplies only"):
            open_supply(K2400, BENCH, channel="CH1")
        with pytest.raises(ConfigError, match="supply model 'hp6632'"):
            open_supply(K2400, BENCH, model="hp6632")
        smu = open_supply(K2400, BENCH, model="keithley2400")
        smu.close()

    def test_scpi_errors_surface_as_device_errors(self) -> None:
        smu = open_supply(K2400, BENCH)
        try:
            smu.write(":SOUR:VOLT:MODE SWEEP")  # not in the simulated subset: the instrument queues -100
            with pytest.raises(DeviceError, match="-100"):
                smu.check_errors()
            smu.check_errors()  # the queue is empty again
        finally:
            smu.close()

    def test_a_silent_instrument_times_out_with_the_command_named(self) -> None:
        supply = open_supply(K2400, FAULTY, model="keithley2400", timeout=0.2)
        try:
            with pytest.raises(CimTimeoutError, match=r"GPIB0::24::INSTR.*:MEAS:CURR\?"):
                _ = supply.current
        finally:
            supply.close()

    def test_output_is_off_after_a_failure_inside_the_block(self) -> None:
        smu = open_supply(K2450, BENCH)
        try:
            with pytest.raises(KeyboardInterrupt), smu.powered(0.75, 0.02):
                assert smu.output_enabled is True
                raise KeyboardInterrupt
            assert smu.output_enabled is False
        finally:
            smu.close()

    def test_an_instrument_without_identity_needs_an_explicit_model(self) -> None:
        with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"GPIB0::7::INSTR.*--smu-model"):
            open_supply("GPIB0::7::INSTR", BENCH)  # pyvisa-sim opens it, but nothing answers


class _Meter:
    def __init__(self, values: list[float], fail_after: int | None = None) -> None:
        self.values = values
        self.calls = 0
        self.fail_after = fail_after
        self.gate = threading.Event()

    @property
    def current(self) -> float:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise CimTimeoutError("meter silent")
        return self.values[(self.calls - 1) % len(self.values)]


class TestCurrentSampler:
    def test_mean_of_readings_over_the_block(self) -> None:
        meter = _Meter([1.0e-3, 3.0e-3])
        with CurrentSampler(meter, period_s=0.001) as s:
            deadline = threading.Event()
            deadline.wait(0.05)
        assert s.summary is not None
        assert s.summary.samples >= 2
        assert 1.0e-3 <= s.summary.mean_a <= 3.0e-3
        assert s.summary.min_a == 1.0e-3
        assert s.summary.duration_s >= 0.05

    def test_a_short_block_still_gets_one_reading(self) -> None:
        meter = _Meter([2.0e-3])
        with CurrentSampler(meter, period_s=10.0) as s:
            pass
        assert s.summary is not None and s.summary.samples >= 1
        assert s.summary.mean_a == 2.0e-3

    def test_a_failing_meter_raises_in_the_caller(self) -> None:
        meter = _Meter([1.0e-3], fail_after=0)
        with pytest.raises(CimTimeoutError, match="meter silent"), CurrentSampler(meter, period_s=0.0):
            threading.Event().wait(0.01)

    def test_bad_arguments(self) -> None:
        with pytest.raises(ConfigError, match="period_s"):
            CurrentSampler(_Meter([1.0]), period_s=-1)

"""Keysight/Agilent E364xA bench supplies, a driver in PyMeasure's style (PyMeasure has none for this family).

The E3640A..E3649A have one or two outputs, selected with ``INST:NSEL``; each takes ``VOLT``, ``CURR``, ``OUTP``
and measures with ``MEAS:VOLT?`` / ``MEAS:CURR?`` (the models' programming guides, "SCPI command summary").
"""

from __future__ import annotations

from typing import Any

from pymeasure.instruments import Instrument, SCPIMixin
from pymeasure.instruments.validators import strict_discrete_set, strict_range


class KeysightE364xA(SCPIMixin, Instrument):
    """Keysight/Agilent E364xA DC power supply (E3640A .. E3649A).

    .. code-block:: python

        psu = KeysightE364xA("GPIB0::5::INSTR")
        psu.output_selected = 1
        psu.current_limit = 0.01          # A
        psu.voltage_setpoint = 0.8        # V
        psu.output_enabled = True
        print(psu.current)                # A
    """

    def __init__(self, adapter: Any, name: str = "Keysight E364xA", **kwargs: Any) -> None:
        super().__init__(adapter, name, **kwargs)

    output_selected = Instrument.control(
        "INST:NSEL?", "INST:NSEL %d",
        """Control which output the other commands address (int, 1 or 2; single-output models have 1).""",
        validator=strict_discrete_set, values=[1, 2], cast=int,
    )

    voltage_setpoint = Instrument.control(
        "VOLT?", "VOLT %g",
        """Control the output voltage setpoint of the selected output in Volts (float, 0 to the model's
        range; 60 V covers the family).""",
        validator=strict_range, values=[0, 60], dynamic=True,
    )

    current_limit = Instrument.control(
        "CURR?", "CURR %g",
        """Control the current limit of the selected output in Amps (float, 0 to the model's rating).""",
        validator=strict_range, values=[0, 8], dynamic=True,
    )

    output_enabled = Instrument.control(
        "OUTP?", "OUTP %d",
        """Control whether the outputs are enabled (bool).""",
        validator=strict_discrete_set, values={True: 1, False: 0}, map_values=True,
    )

    voltage = Instrument.measurement("MEAS:VOLT?", """Measure the voltage of the selected output in Volts (float).""")

    current = Instrument.measurement("MEAS:CURR?", """Measure the current of the selected output in Amps (float).""")


__all__ = ["KeysightE364xA"]

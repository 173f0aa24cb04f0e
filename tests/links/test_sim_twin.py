"""sim:// with the real twin (chip_sim.make_twin), still only through frames."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import encode_frame
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.links import open_link
from links_fakes import frames_in


def _replies(link, want: int, timeout: float = 5.0):
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(frames_in(bytes(data))) < want and time.monotonic() < deadline:
        data += link.read(1 << 16, 0.2)
    return frames_in(bytes(data))


def _hello(link) -> m.Identity:
    link.write(encode_frame(Opcode.HELLO, 1, m.Hello(1 << 16).encode()))
    (reply,) = _replies(link, 1)
    assert reply.status == Status.OK
    return m.Identity.decode(reply.payload)


def test_hello_reports_the_overridden_spec():
    with open_link("sim://?profile=ideal&seed=3&rows=100&cols=16") as link:
        spec = _hello(link).spec
        assert (spec.rows, spec.cols) == (100, 16)


def test_weights_round_trip_and_an_ideal_mac():
    with open_link("sim://?profile=ideal&rows=64&cols=8") as link:
        spec = _hello(link).spec
        rng = np.random.default_rng(0)
        w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
        x = rng.integers(0, spec.input_max + 1, (4, spec.rows))
        frames = [
            encode_frame(Opcode.WRITE_WEIGHTS, 2, m.WeightRows.of(spec, 0, w).encode()),
            encode_frame(Opcode.READ_WEIGHTS, 3, m.RowRange(0, spec.rows).encode()),
            encode_frame(Opcode.MAC, 4, m.MacInputs.of(spec, 0, x).encode()),
        ]
        for f in frames:  # a window of three requests in flight
            link.write(f)
        replies = _replies(link, 3)
        assert [(r.seq, r.status) for r in replies] == [(2, Status.OK), (3, Status.OK), (4, Status.OK)]
        # 4-bit weights and inputs travel two to a byte
        assert len(replies[1].payload) == m.ROWS_FIXED + spec.rows * spec.cols // 2
        np.testing.assert_array_equal(m.WeightRows.decode(replies[1].payload).weights(spec), w)
        y = m.MacResult.decode(replies[2].payload).outputs(spec, 0, spec.rows)
        np.testing.assert_array_equal(y, x @ w)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sim://?profile=no-such-profile", ["no-such-profile"]),
        ("sim://?bogus_param=1", ["bogus_param"]),
        ("sim://?device=tpu", ["device='tpu'", "cuda"]),
        ("sim://?backend=rtl&device=cuda", ["device='cuda'", "backend=python"]),
    ],
)
def test_twin_rejects_bad_profiles_and_parameters(url, words):
    with pytest.raises(ConfigError) as info:
        open_link(url)
    for word in words:
        assert word in str(info.value)


def test_cuda_device_without_a_gpu_is_backend_unavailable():
    pytest.importorskip("torch")
    import torch

    from cimlab.firmware_bridge.errors import BackendUnavailable

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the device opens")
    with pytest.raises(BackendUnavailable, match="device='cuda'"):
        open_link("sim://?device=cuda")


def test_device_cpu_mac_through_frames():
    with open_link("sim://?profile=ideal&rows=64&cols=8&device=cpu") as link:
        assert _hello(link).spec.rows == 64

"""sim://: the twin (here a fake controller through the factory hook) behind a real Bridge."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.frame import DEFAULT_MAX_PAYLOAD, REPLY_FLAG, encode_frame
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.links import open_link
from cimlab.firmware_bridge.bridge import IDLE_S
from cimlab.links.sim import SimLink
from links_fakes import SMALL_SPEC, FakeController, fake_factory, frames_in, ping_traffic, read_exactly


def test_query_reaches_the_factory(fake_twin):
    with open_link("sim://?profile=lab&seed=7&rows=100&adc.sigma=0.5") as link:
        assert isinstance(link, SimLink)
        assert link.rate_hint is None
        assert link.bridge.max_payload == DEFAULT_MAX_PAYLOAD
    assert fake_twin == [("lab", 7, {"rows": "100", "adc.sigma": "0.5"})]


def test_defaults(fake_twin):
    with open_link("sim://") as link:
        assert link.url == "sim://"
    assert fake_twin == [("default", 0, {})]


def test_make_controller_argument_is_used():
    made: list = []
    with SimLink("sim://?seed=3&max_payload=4096", make_controller=fake_factory(made)) as link:
        assert link.bridge.max_payload == 4096
    assert made == [("default", 3, {})]


def test_hello_and_a_mac_through_real_frames():
    ctrl = FakeController()
    with SimLink("sim://", make_controller=lambda *_: ctrl) as link:
        link.write(encode_frame(Opcode.HELLO, 1, m.Hello(1 << 16).encode()))
        (reply,) = frames_in(read_exactly(link, 1, 1.0) + _drain(link))
        assert reply.opcode == Opcode.HELLO | REPLY_FLAG and reply.seq == 1 and reply.status == Status.OK
        hello = m.Identity.decode(reply.payload)
        assert hello.spec == SMALL_SPEC
        assert hello.chip_id == "fake-0"

        rng = np.random.default_rng(1)
        w = rng.integers(SMALL_SPEC.weight_min, SMALL_SPEC.weight_max + 1, (SMALL_SPEC.rows, SMALL_SPEC.cols))
        x = rng.integers(0, SMALL_SPEC.input_max + 1, (3, SMALL_SPEC.rows))
        wr = m.WeightRows.of(SMALL_SPEC, 0, w).encode()
        mac = m.MacInputs.of(SMALL_SPEC, 0, x)
        link.write(encode_frame(Opcode.WRITE_WEIGHTS, 2, wr) + encode_frame(Opcode.MAC, 3, mac.encode()))
        frames = frames_in(_drain(link, want=2))
        assert [(f.seq, f.status) for f in frames] == [(2, Status.OK), (3, Status.OK)]
        y = m.MacResult.decode(frames[1].payload).outputs(SMALL_SPEC, 0, SMALL_SPEC.rows)
        np.testing.assert_array_equal(y, x @ w)


def _drain(link, want: int = 1, timeout: float = 2.0) -> bytes:
    """Bytes until ``want`` frames are complete."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(frames_in(bytes(data))) < want and time.monotonic() < deadline:
        data += link.read(1 << 16, 0.1)
    return bytes(data)


def test_a_truncated_request_cannot_wedge_the_link(fake_twin):
    with open_link("sim://") as link:
        whole = encode_frame(Opcode.PING, 5, b"A" * 1000)
        link.write(whole[:40])  # header promises 1000 payload bytes that never come
        good = encode_frame(Opcode.PING, 6, b"hello")
        link.write(good)  # swallowed as payload of the truncated frame until the inter-frame timeout
        t0 = time.monotonic()
        data = _drain(link, timeout=2.0)
        elapsed = time.monotonic() - t0
        (reply,) = frames_in(data)
        assert reply.seq == 6 and reply.payload == b"hello"
        assert IDLE_S * 0.9 <= elapsed < IDLE_S + 0.5
        assert link.bridge.framer.stats.partials_dropped >= 1


def test_garbage_gets_no_reply_and_link_stays_usable(fake_twin):
    with open_link("sim://") as link:
        link.write(bytes(range(256)) * 4)
        assert link.read(100, 0.1) == b""
        req, rep, _ = ping_traffic(10, 10)
        link.write(req)
        assert read_exactly(link, len(rep), 1.0) == rep


def test_one_mib_in_one_write(fake_twin):
    req, rep, payloads = ping_traffic(1 << 20, DEFAULT_MAX_PAYLOAD)
    with open_link("sim://") as link:
        t0 = time.monotonic()
        link.write(req)
        assert time.monotonic() - t0 < 10
        got = read_exactly(link, len(rep), 10.0)
    assert [f.payload for f in frames_in(got)] == payloads


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sim://host", ["no host or path"]),
        ("sim:///path", ["no host or path"]),
        ("sim://?seed=abc", ["seed", "integer"]),
        ("sim://?seed=-1", ["seed", "0.."]),
        ("sim://?max_payload=10", ["max_payload", "256.."]),
        ("sim://?profile=a&profile=b", ["profile", "twice"]),
        ("sim://?rows", ["rows", "key=value"]),
        ("sim://?rows=", ["rows", "no value"]),
    ],
)
def test_bad_sim_urls(fake_twin, url, words):
    with pytest.raises(ConfigError) as info:
        open_link(url)
    for word in words:
        assert word in str(info.value)
    assert fake_twin == []

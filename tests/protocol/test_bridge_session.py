"""Sessions on the bridge: the payload both ends agree at HELLO, and the token a served device requires."""

from __future__ import annotations

import numpy as np
from protocol_fakes import SMALL_SPEC

from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.frame import REPLY_FLAG, Frame, Framer, encode_frame
from cimlab.firmware_bridge.messages import Opcode, Status
from cimlab.firmware_bridge.registers import BY_NAME

SPEC = SMALL_SPEC
TOKEN = b"0123456789abcdef0123"


def exchange(bridge, *frames: bytes) -> list[Frame]:
    out = Framer().feed(b"".join(r for f in frames for r in bridge.receive(f)))
    assert all(isinstance(f, Frame) for f in out)
    return out  # type: ignore[return-value]


def hello(seq: int, max_payload: int = 1 << 16, token: bytes = b"") -> bytes:
    return encode_frame(Opcode.HELLO, seq, m.Hello(max_payload, token).encode())


def test_both_ends_use_the_smaller_payload(make_bridge) -> None:
    bridge, _ = make_bridge(max_payload=4096)
    (r,) = exchange(bridge, hello(1, max_payload=1 << 20))
    assert m.Identity.decode(r.payload).max_payload == 4096 and bridge.session_cap == 4096
    (r,) = exchange(bridge, hello(2, max_payload=300))
    assert m.Identity.decode(r.payload).max_payload == 4096 and bridge.session_cap == 300
    # a PING whose echo the host cannot take is refused, not sent
    (r,) = exchange(bridge, encode_frame(Opcode.PING, 3, bytes(301)))
    assert (r.seq, r.status) == (3, Status.TOO_LARGE)
    assert b"300" in r.payload
    # and a MAC whose reply would not fit is refused before the controller is asked
    x = np.ones((40, SPEC.rows), dtype=np.int64)
    (r,) = exchange(bridge, encode_frame(Opcode.MAC, 4, m.MacInputs.of(SPEC, 0, x).encode()))
    assert r.status == Status.TOO_LARGE


def test_hello_stating_a_tiny_payload_is_refused(make_bridge) -> None:
    bridge, _ = make_bridge()
    (r,) = exchange(bridge, hello(1, max_payload=255))
    assert r.status == Status.BAD_ARGUMENT and b"256" in r.payload


def test_without_the_token_nothing_is_served(make_bridge) -> None:
    bridge, ctl = make_bridge()
    bridge.new_session(TOKEN)
    before = ctl.state()
    w = np.full((SPEC.rows, SPEC.cols), 3)
    raw_write = encode_frame(Opcode.WRITE_WEIGHTS, 1, m.WeightRows.of(SPEC, 0, w).encode())
    replies = exchange(bridge, raw_write, encode_frame(Opcode.PING, 2, b"x"), hello(3),
                       hello(4, token=TOKEN[:-1] + b"!"), encode_frame(Opcode.STATUS, 5))
    assert [(r.seq, r.status) for r in replies] == [(1, Status.DENIED), (2, Status.DENIED), (3, Status.DENIED),
                                                    (4, Status.DENIED), (5, Status.DENIED)]
    assert all(r.opcode & REPLY_FLAG and r.payload for r in replies)
    assert ctl.state() == before and [c for c in ctl.calls if c[0] != "identity"] == []
    # with the token, the host is served
    (ok,) = exchange(bridge, hello(6, token=TOKEN))
    assert ok.status == Status.OK and bridge.authenticated
    (r,) = exchange(bridge, encode_frame(Opcode.WRITE_WEIGHTS, 7, m.WeightRows.of(SPEC, 0, w).encode()))
    assert r.status == Status.OK and (ctl.weights == 3).all()


def test_a_new_session_forgets_the_last_host(make_bridge) -> None:
    bridge, ctl = make_bridge()
    scratch = BY_NAME["SCRATCH"].addr
    write = encode_frame(Opcode.WRITE_REG, 9, m.RegValue(scratch, 5).encode())
    assert exchange(bridge, hello(8, token=b""), write)[1].status == Status.OK
    held = encode_frame(Opcode.WRITE_REG, 12, m.RegValue(scratch, 6).encode())
    assert [r.status for r in exchange(bridge, held)] == [Status.MISSING]  # 10 and 11 never came
    bridge.new_session(TOKEN)
    assert bridge.wake_at() is None and not bridge.authenticated
    # the next host's HELLO starts afresh; its seq 9 is not answered from the last host's memory
    exchange(bridge, hello(1, token=TOKEN))
    again = encode_frame(Opcode.WRITE_REG, 2, m.RegValue(scratch, 7).encode())
    assert exchange(bridge, again)[0].status == Status.OK and ctl.regs[scratch] == 7
    assert ctl.count("write_reg") == 2  # the held request of the last host never executed

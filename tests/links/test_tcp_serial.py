"""tcp:// and the serial backend (a real pty, socket://, loop://): what the shared contract does not cover."""

from __future__ import annotations

import socket
import time

import pytest

from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError, LinkError
from cimlab.links import open_link
from cimlab.links.serial_port import SerialLink
from cimlab.links.tcp import TcpLink
from links_fakes import EchoPty, EchoTcpServer, read_exactly

SLACK = 0.5


@pytest.fixture
def echo_server():
    server = EchoTcpServer()
    yield server
    server.close()


@pytest.fixture
def echo_pty():
    pty = EchoPty()
    yield pty
    pty.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- tcp:// ----------------------------------------------------------------------------------------------
def test_tcp_sets_nodelay_and_rate_hint(echo_server):
    with open_link(f"tcp://127.0.0.1:{echo_server.port}?baud=3000000") as link:
        assert isinstance(link, TcpLink)
        assert link.rate_hint == 300_000
        assert link._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with open_link(f"tcp://localhost:{echo_server.port}") as link:
        assert link.rate_hint is None
        link.write(b"ping")
        assert read_exactly(link, 4, 2.0) == b"ping"


def test_tcp_connection_refused_is_a_link_error():
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    with pytest.raises(LinkError) as info:
        open_link(url)
    assert url in str(info.value) and "refused" in str(info.value).lower()
    assert isinstance(info.value.__cause__, OSError)


def test_tcp_peer_closing_is_a_link_error(echo_server):
    with open_link(f"tcp://127.0.0.1:{echo_server.port}") as link:
        link.write(b"x")
        assert read_exactly(link, 1, 2.0) == b"x"
        echo_server.drop_clients()
        with pytest.raises(LinkError, match="closed by the peer"):
            read_exactly(link, 1, 2.0)


def test_tcp_write_to_a_peer_that_never_reads_times_out():
    server = EchoTcpServer(echo=False, rcvbuf=4096)
    try:
        with open_link(f"tcp://127.0.0.1:{server.port}", timeout=0.3) as link:
            t0 = time.monotonic()
            with pytest.raises(CimTimeoutError, match="stalled"):
                link.write(bytes(32 << 20))
            assert time.monotonic() - t0 < 0.3 + SLACK
    finally:
        server.close()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("tcp://127.0.0.1", ["missing port"]),
        ("tcp://:5000", ["missing host"]),
        ("tcp://127.0.0.1:99999", ["port"]),
        ("tcp://127.0.0.1:http", ["port"]),
        ("tcp://127.0.0.1:5000/x", ["path"]),
        ("tcp://127.0.0.1:5000?baud=fast", ["baud", "integer"]),
        ("tcp://127.0.0.1:5000?baud=10", ["baud", "50.."]),
        ("tcp://127.0.0.1:5000?speed=1", ["unknown option", "speed"]),
    ],
)
def test_bad_tcp_urls(url, words):
    with pytest.raises(ConfigError) as info:
        open_link(url)
    for word in words:
        assert word in str(info.value)


# ---- serial: pty -----------------------------------------------------------------------------------------
def test_pty_rate_hint_only_when_baud_is_given(echo_pty):
    with open_link(echo_pty.path) as link:
        assert isinstance(link, SerialLink)
        assert link.rate_hint is None
        assert link.port.baudrate == 115200
    with open_link(f"{echo_pty.path}?baud=3000000") as link:
        assert link.rate_hint == 300_000
        assert link.port.baudrate == 3_000_000
        link.write(b"abc")
        assert read_exactly(link, 3, 2.0) == b"abc"


def test_pty_hang_up_is_a_link_error(echo_pty):
    with open_link(echo_pty.path) as link:
        link.write(b"x")
        assert read_exactly(link, 1, 2.0) == b"x"
        echo_pty.hang_up()
        with pytest.raises(LinkError, match="failed"):
            read_exactly(link, 1, 2.0)


def test_pty_write_nobody_reads_times_out():
    pty = EchoPty(echo=False)
    pty.echo.stop.set()  # nothing drains the master side: the pty buffer fills
    pty.echo.thread.join(5)
    try:
        with open_link(pty.path, timeout=0.3) as link:
            t0 = time.monotonic()
            with pytest.raises(CimTimeoutError, match="did not finish"):
                link.write(bytes(1 << 20))
            assert time.monotonic() - t0 < 0.3 + SLACK
    finally:
        pty.close()


def test_missing_device_is_a_link_error_with_the_reason():
    with pytest.raises(LinkError) as info:
        open_link("/dev/cimlab-no-such-port?baud=3000000")
    text = str(info.value)
    assert "/dev/cimlab-no-such-port" in text and "No such file" in text


def test_not_a_tty_is_a_link_error():
    with pytest.raises(LinkError, match="/dev/null"):
        open_link("/dev/null")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("/dev/ttyUSB0?baud=0", ["baud", "50.."]),
        ("/dev/ttyUSB0?baud=x", ["baud", "integer"]),
        ("/dev/ttyUSB0?parity=E", ["unknown option", "parity"]),
        ("?baud=9600", ["no device path"]),
        ("bogus://x", ["unknown scheme", "bogus"]),
        ("", ["non-empty"]),
    ],
)
def test_bad_serial_urls(url, words):
    with pytest.raises(ConfigError) as info:
        open_link(url)
    for word in words:
        assert word in str(info.value)


# ---- serial: pyserial URLs -------------------------------------------------------------------------------
def test_socket_url_through_pyserial(echo_server):
    with open_link(f"socket://127.0.0.1:{echo_server.port}") as link:
        assert isinstance(link, SerialLink)
        assert link.rate_hint is None
        payload = bytes(range(256)) * 64
        link.write(payload)
        assert read_exactly(link, len(payload), 5.0) == payload


def test_socket_url_refused_is_a_link_error():
    url = f"socket://127.0.0.1:{_free_port()}"
    with pytest.raises(LinkError, match="socket://"):
        open_link(url)


def test_loop_url_smoke():
    with open_link("loop://") as link:
        link.write(b"hello")
        assert read_exactly(link, 5, 1.0) == b"hello"
        t0 = time.monotonic()
        assert link.read(10, 0.1) == b""
        assert time.monotonic() - t0 < 0.1 + SLACK


def test_open_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="timeout"):
        open_link("loop://", timeout=0)

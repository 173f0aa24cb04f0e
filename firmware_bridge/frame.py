"""Frames: the only unit of bytes between host and controller, for a board and the twin alike.

Layout (little-endian)::

    offset size field
    0      2    sync      0xA7 0x3C
    2      1    version   PROTOCOL_VERSION
    3      1    opcode    request opcode; replies set bit 7 (REPLY_FLAG)
    4      1    status    0 in requests; a StatusCode in replies
    5      2    seq       request sequence number, echoed by the reply
    7      4    length    payload bytes, capped (max_payload) before anything is allocated
    11     2    hcrc      CRC-16/CCITT (binascii.crc_hqx, init 0) of bytes 0..10
    13     n    payload
    13+n   4    crc       CRC-32 (zlib) of bytes 0 .. 13+n-1

The header CRC is our addition to the architecture sketch: without it a corrupted length field makes the
receiver wait for up to ``max_payload`` bytes that never come; with it a damaged header is rejected at once
and the framer hunts for the next sync word.

The framer does no I/O: ``feed(bytes) -> events``. It survives, and its tests feed it:

- garbage before, between and after frames (bytes are skipped until a sync word with a valid header);
- frames split across reads at any byte, and several frames merged in one read;
- a bad header CRC (the sync is skipped, hunting resumes one byte later);
- a bad payload CRC or an oversize length with a valid header: reported as ``BadFrame`` (the peer can be told
  which ``seq`` failed), then hunting resumes one byte after that sync, so a frame hidden in the rejected
  bytes is still found;
- a truncated frame followed by silence: ``drop_partial()`` (the caller's inter-frame timeout) abandons it.
"""

from __future__ import annotations

import binascii
import zlib
from dataclasses import dataclass, field

import construct as cs

from cimlab.firmware_bridge.errors import ConfigError

SYNC = b"\xa7\x3c"
PROTOCOL_VERSION = 2
"""2: HELLO states the host's payload cap and token; bulk arrays travel packed at their bit width."""
REPLY_FLAG = 0x80
DEFAULT_MAX_PAYLOAD = 64 * 1024
MAX_PAYLOAD_LIMIT = 16 * 1024 * 1024

HEADER = cs.Struct(
    "sync" / cs.Const(SYNC),
    "version" / cs.Int8ul,
    "opcode" / cs.Int8ul,
    "status" / cs.Int8ul,
    "seq" / cs.Int16ul,
    "length" / cs.Int32ul,
    "hcrc" / cs.Int16ul,
)
HEADER_SIZE = HEADER.sizeof()  # 13
TRAILER_SIZE = 4
OVERHEAD = HEADER_SIZE + TRAILER_SIZE
_HEADER_C = HEADER.compile()


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded, CRC-checked frame."""

    version: int
    opcode: int
    status: int
    seq: int
    payload: bytes

    @property
    def is_reply(self) -> bool:
        """True for device-to-host frames."""
        return bool(self.opcode & REPLY_FLAG)


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame whose header was valid but which could not be accepted.

    ``reason`` is ``"crc"`` (payload CRC mismatch) or ``"oversize"`` (length over the cap). The header fields
    make it attributable: a device answers it with an error status for ``seq``.
    """

    version: int
    opcode: int
    seq: int
    length: int
    reason: str


@dataclass
class FramerStats:
    """Counters of what the framer saw since it was made."""

    frames: int = 0
    bad_frames: int = 0
    header_errors: int = 0
    resyncs: int = 0
    bytes_in: int = 0
    bytes_discarded: int = 0
    partials_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict for reports."""
        return dict(self.__dict__)


def _header_bytes(version: int, opcode: int, status: int, seq: int, length: int) -> bytes:
    head = _HEADER_C.build(
        dict(version=version, opcode=opcode, status=status, seq=seq, length=length, hcrc=0)
    )
    hcrc = binascii.crc_hqx(head[: HEADER_SIZE - 2], 0)
    return head[: HEADER_SIZE - 2] + hcrc.to_bytes(2, "little")


def encode_frame(
    opcode: int,
    seq: int,
    payload: bytes | bytearray | memoryview = b"",
    *,
    status: int = 0,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """Build one frame. ``seq`` wraps at 16 bits; the payload is not copied more than once."""
    if not 0 <= opcode <= 0xFF:
        raise ConfigError(f"opcode {opcode} does not fit one byte")
    if not 0 <= status <= 0xFF:
        raise ConfigError(f"status {status} does not fit one byte")
    if not 0 <= version <= 0xFF:
        raise ConfigError(f"version {version} does not fit one byte")
    head = _header_bytes(version, opcode, status, seq & 0xFFFF, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, payload, crc.to_bytes(4, "little")))


class Framer:
    """Bytes in, frames out; no I/O. See the module docstring for what it survives.

    Args:
        max_payload: largest payload accepted, bytes; longer lengths are rejected before any allocation.
        version: protocol version expected; other versions still decode (the caller decides what to do).
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, version: int = PROTOCOL_VERSION) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD_LIMIT:
            raise ConfigError(f"max_payload={max_payload} is outside 0..{MAX_PAYLOAD_LIMIT}")
        self.max_payload = max_payload
        self.version = version
        self.stats = FramerStats()
        self._buf = bytearray()
        self._pos = 0
        self._hunting = False

    @property
    def pending(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf) - self._pos

    def reset(self) -> None:
        """Forget buffered bytes (counters are kept)."""
        self._buf.clear()
        self._pos = 0

    def pending_header(self) -> tuple[int, int] | None:
        """``(opcode, seq)`` of the partial frame held, when its header arrived intact (None otherwise)."""
        head = bytes(self._buf[self._pos : self._pos + HEADER_SIZE])
        if len(head) < HEADER_SIZE or not head.startswith(SYNC):
            return None
        if binascii.crc_hqx(head[:-2], 0) != int.from_bytes(head[-2:], "little"):
            return None
        h = _HEADER_C.parse(head)
        return h.opcode, h.seq

    def drop_partial(self) -> bool:
        """Abandon a partial frame after the caller's inter-frame timeout.

        Skips past the buffered frame's sync word and hunts again in the bytes held. Returns True if anything
        was dropped.
        """
        if self.pending == 0:
            return False
        self.stats.partials_dropped += 1
        self._skip(1)
        return True

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | BadFrame]:
        """Add bytes; return every frame (or attributable bad frame) now complete, in order."""
        if data:
            self.stats.bytes_in += len(data)
            self._buf += data
        return self._scan()

    def _skip(self, n: int) -> None:
        self._pos += n
        self.stats.bytes_discarded += n

    def _scan(self) -> list[Frame | BadFrame]:
        out: list[Frame | BadFrame] = []
        buf = self._buf
        while True:
            idx = buf.find(SYNC, self._pos)
            if idx < 0:
                # keep a trailing first sync byte: it may be half of a sync word split across reads
                keep = 1 if buf.endswith(SYNC[:1]) else 0
                gone = len(buf) - self._pos - keep
                if gone > 0:
                    self._note_resync()
                    self._skip(gone)
                break
            if idx > self._pos:
                self._note_resync()
                self._skip(idx - self._pos)
            self._hunting = False
            if len(buf) - idx < HEADER_SIZE:
                break
            head = bytes(buf[idx : idx + HEADER_SIZE])
            if binascii.crc_hqx(head[:-2], 0) != int.from_bytes(head[-2:], "little"):
                self.stats.header_errors += 1
                self._skip(1)
                continue
            h = _HEADER_C.parse(head)
            if h.length > self.max_payload:
                self.stats.bad_frames += 1
                out.append(BadFrame(h.version, h.opcode, h.seq, h.length, "oversize"))
                self._skip(1)
                continue
            end = idx + HEADER_SIZE + h.length
            if len(buf) < end + TRAILER_SIZE:
                break
            crc = int.from_bytes(buf[end : end + TRAILER_SIZE], "little")
            view = memoryview(buf)
            try:
                ok = zlib.crc32(view[idx:end]) == crc
                payload = bytes(view[idx + HEADER_SIZE : end]) if ok else b""
            finally:
                view.release()
            if not ok:
                self.stats.bad_frames += 1
                out.append(BadFrame(h.version, h.opcode, h.seq, h.length, "crc"))
                self._skip(1)
                continue
            self.stats.frames += 1
            out.append(Frame(h.version, h.opcode, h.status, h.seq, payload))
            self._pos = end + TRAILER_SIZE
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        return out

    def _note_resync(self) -> None:
        if not self._hunting:
            self.stats.resyncs += 1
            self._hunting = True


@dataclass
class WireLog:
    """A ring of one-line descriptions of the last frames, attached to timeout errors."""

    depth: int = 16
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        """Record one line, dropping the oldest past ``depth``."""
        self.lines.append(line)
        if len(self.lines) > self.depth:
            del self.lines[0]

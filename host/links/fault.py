# URL format: any link URL followed by #drop=P&flip=P&insert=P&dup=P&truncate=P&stall=P&stall_s=S&fault_seed=N
#
#   sim://#flip=0.02&drop=0.01&fault_seed=7
#   /dev/pts/5#truncate=0.05
#
# Options (probabilities P in 0..1, each rolled independently per write call and, for flip/drop/insert, per
# chunk read):
#   drop=P       write: discard the whole write;             read: discard the chunk
#   flip=P       write/read: flip one random bit
#   insert=P     write/read: insert 1..8 random bytes at a random position
#   dup=P        write: send the bytes twice
#   truncate=P   write: send a random strict prefix only
#   stall=P      write: sleep stall_s seconds before sending
#   stall_s=S    stall length, 0..10 s (default 0.05)
#   fault_seed=N seed, 0..2**63-1 (default 0): the same seed and traffic give the same faults
"""A wrapper that damages traffic on purpose, for soak tests of the driver's recovery."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.links.base import Link, WrapperLink
from cimlab.links.url import float_param, int_param, reject_unknown

WRITE_FAULTS = ("drop", "flip", "insert", "dup", "truncate", "stall")
READ_FAULTS = ("flip", "drop", "insert")
MAX_INSERT = 8
"""Most random bytes one ``insert`` fault adds."""


@dataclass(frozen=True)
class FaultConfig:
    """Probabilities (0..1) of each fault, per write call / per chunk read, and the seed.

    Attributes:
        drop: discard a write (or a read chunk).
        flip: flip one random bit of a write (or a read chunk).
        insert: insert 1..8 random bytes at a random position of a write (or a read chunk).
        dup: send a write twice.
        truncate: send a random strict prefix of a write.
        stall: sleep ``stall_s`` seconds before a write.
        stall_s: stall length, seconds.
        seed: random seed; writes and reads draw from separate generators, each reproducible.
    """

    drop: float = 0.0
    flip: float = 0.0
    insert: float = 0.0
    dup: float = 0.0
    truncate: float = 0.0
    stall: float = 0.0
    stall_s: float = 0.05
    seed: int = 0

    FRAGMENT_KEYS = (*WRITE_FAULTS, "stall_s", "fault_seed")

    def __post_init__(self) -> None:
        for name in WRITE_FAULTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"FaultConfig.{name}={value!r} is outside the allowed range 0..1")
        stall_s = self.stall_s
        if isinstance(stall_s, bool) or not isinstance(stall_s, int | float) or not 0 <= stall_s <= 10:
            raise ConfigError(f"FaultConfig.stall_s={self.stall_s!r} is outside the allowed range 0..10 s")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"FaultConfig.seed={self.seed!r} is outside the allowed range 0..2**63-1")

    @classmethod
    def from_params(cls, params: dict[str, str], where: str = "fault fragment") -> FaultConfig:
        """From URL fragment keys (``fault_seed`` is the seed); unknown keys are a ConfigError."""
        reject_unknown(params, cls.FRAGMENT_KEYS, where)
        kwargs: dict[str, float | int] = {
            name: float_param(params, name, 0.0, 1.0, 0.0, where) for name in WRITE_FAULTS
        }
        kwargs["stall_s"] = float_param(params, "stall_s", 0.0, 10.0, 0.05, where)
        kwargs["seed"] = int_param(params, "fault_seed", 0, 2**63 - 1, 0, where)
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def active(self) -> bool:
        """True when any fault has a nonzero probability."""
        return any(getattr(self, name) > 0 for name in WRITE_FAULTS)


@dataclass
class FaultStats:
    """How many of each fault were injected.

    ``writes``/``chunks`` count write calls and non-empty chunks read; ``damaged_writes`` and
    ``damaged_chunks`` count those that suffered at least one fault other than a stall.
    """

    writes: int = 0
    damaged_writes: int = 0
    chunks: int = 0
    damaged_chunks: int = 0
    write_drop: int = 0
    write_flip: int = 0
    write_insert: int = 0
    write_dup: int = 0
    write_truncate: int = 0
    write_stall: int = 0
    read_flip: int = 0
    read_drop: int = 0
    read_insert: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict for reports."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class FaultLink(WrapperLink):
    """Inject faults into the traffic of ``inner``, reproducibly.

    Args:
        inner: the link to wrap (closed with this one).
        config: fault probabilities and seed.
        url: reported URL (defaults to the inner link's).
    """

    def __init__(self, inner: Link, config: FaultConfig, *, url: str | None = None) -> None:
        super().__init__(inner, url=url, rate_hint=inner.rate_hint)
        if not isinstance(config, FaultConfig):
            raise ConfigError(f"FaultLink needs a FaultConfig, got {type(config).__name__}")
        self.config = config
        self.faults = FaultStats()
        self._wrng = random.Random(f"{config.seed}:write")
        self._rrng = random.Random(f"{config.seed}:read")
        self._carry = b""

    def _roll(self, rng: random.Random, p: float) -> bool:
        return p > 0 and rng.random() < p

    def _flip(self, rng: random.Random, data: bytearray) -> None:
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)

    def _insert(self, rng: random.Random, data: bytearray) -> None:
        junk = rng.randbytes(rng.randint(1, MAX_INSERT))
        at = rng.randint(0, len(data))
        data[at:at] = junk

    def _write(self, data: memoryview) -> None:
        cfg, rng, st = self.config, self._wrng, self.faults
        st.writes += 1
        # Roll every fault up front, so the draws per write do not depend on which faults hit.
        stall, drop, flip, insert, truncate, dup = (
            self._roll(rng, p) for p in (cfg.stall, cfg.drop, cfg.flip, cfg.insert, cfg.truncate, cfg.dup)
        )
        if stall:
            st.write_stall += 1
            time.sleep(cfg.stall_s)
        if drop:
            st.write_drop += 1
            st.damaged_writes += 1
            return
        if not (flip or insert or truncate or dup):
            self.inner.write(data)
            return
        st.damaged_writes += 1
        buf = bytearray(data)
        if flip:
            st.write_flip += 1
            self._flip(rng, buf)
        if insert:
            st.write_insert += 1
            self._insert(rng, buf)
        if truncate:
            st.write_truncate += 1
            del buf[rng.randrange(len(buf)) :]
        if dup:
            st.write_dup += 1
            buf = buf + buf
        if buf:
            self.inner.write(bytes(buf))

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        if self._carry:
            out, self._carry = self._carry[:max_bytes], self._carry[max_bytes:]
            return out
        cfg, rng, st = self.config, self._rrng, self.faults
        deadline = time.monotonic() + timeout
        while True:
            chunk = self.inner.read(max_bytes, max(0.0, deadline - time.monotonic()))
            if not chunk:
                return b""
            st.chunks += 1
            flip, drop, insert = (self._roll(rng, p) for p in (cfg.flip, cfg.drop, cfg.insert))
            if drop:
                st.read_drop += 1
                st.damaged_chunks += 1
                if time.monotonic() >= deadline:
                    return b""
                continue
            if not (flip or insert):
                return chunk
            st.damaged_chunks += 1
            buf = bytearray(chunk)
            if flip:
                st.read_flip += 1
                self._flip(rng, buf)
            if insert:
                st.read_insert += 1
                self._insert(rng, buf)
            out = bytes(buf)
            self._carry = out[max_bytes:]
            return out[:max_bytes]

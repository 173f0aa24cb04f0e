"""Position-keyed random streams: the draws of vector ``v`` are a pure function of (seed, domain, v).

Per-conversion draws come from numpy's PCG64 seeded by ``SeedSequence([seed, domain])`` and jumped ahead
(``advance``, O(log n)) to word ``v * words_per_vector``; a batch of vectors ``v0 .. v0+n-1`` is one contiguous
``random_raw`` call from there. So the bits a vector sees depend only on its global index, never on how the
vectors were split into batches or chunks. (PCG64's raw output is about twice as fast as Philox's here, and the
jump makes it as addressable as a counter-based generator.) Static maps use Philox keyed by the seed.
"""

from __future__ import annotations

import math

import numpy as np

from cimlab.firmware_bridge.errors import ConfigError

DOMAIN_STATIC = 1
"""Static mismatch drawn once per twin (gains, offsets, cells, ADC thresholds)."""
DOMAIN_CONVERSION = 2
"""Per-conversion draws (noise, data-driven sampling)."""

def check_seed(seed: int) -> int:
    """A seed as an int in 0..2**64-1; ConfigError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise ConfigError(f"seed={seed} is outside the allowed range 0..2**64-1")
    return int(seed)


def static_generator(seed: int, tag: int = 0) -> np.random.Generator:
    """Generator for a twin's static mismatch; ``tag`` separates independent maps."""
    return np.random.Generator(np.random.Philox(key=check_seed(seed) | ((DOMAIN_STATIC << 32 | tag) << 64)))


class VectorStream:
    """Random bits per MAC vector, ``itemsize`` bytes per conversion, ``per_vector`` conversions a vector.

    Args:
        seed: the twin's seed.
        per_vector: random items each vector needs.
        dtype: unsigned dtype of one item (uint16 for noise-table indices, uint32 for sampler uniforms).
    """

    def __init__(self, seed: int, per_vector: int, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        self.per_vector = per_vector
        self.words = math.ceil(per_vector * self.dtype.itemsize / 8)
        self.seed = check_seed(seed)
        self._seed_seq = np.random.SeedSequence([self.seed, DOMAIN_CONVERSION])

    def rekey(self, key: int) -> None:
        """Draw from the stream of (seed, ``key``) from now on: another stream, as addressable as the first."""
        self._seed_seq = np.random.SeedSequence([self.seed, DOMAIN_CONVERSION, int(key)])

    def pcg_state(self) -> np.ndarray:
        """The stream's PCG64 state before its first word, as uint64 [state hi, state lo, increment hi, increment
        lo]: what the fused engines (``cimlab.chip_sim.kernels``) start from to draw the same words."""
        st = np.random.PCG64(self._seed_seq).state["state"]
        mask = (1 << 64) - 1
        return np.array([st["state"] >> 64, st["state"] & mask, st["inc"] >> 64, st["inc"] & mask], dtype=np.uint64)

    def draw(self, first: int, n: int) -> np.ndarray:
        """Items of vectors ``first .. first+n-1``: array [n, per_vector] of ``dtype``."""
        bg = np.random.PCG64(self._seed_seq)
        bg.advance(first * self.words)
        raw = bg.random_raw(n * self.words)
        return raw.view(self.dtype).reshape(n, -1)[:, : self.per_vector]

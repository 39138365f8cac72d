"""Seeded random streams for sampling: rows that depend only on the seed and the row index.

z is drawn from ``numpy.random.default_rng(seed)`` (PCG64) with ``standard_normal`` in float32,
always in fixed blocks of rows, so row i is the same whatever batch sizes are taken; this equals
``default_rng(seed).standard_normal((n, *latent_shape), dtype=np.float32)``, which any app can
reproduce. Bernoulli pixel draws use a second stream, ``default_rng(SeedSequence(seed,
spawn_key=(0,)))``, uniform float32 in the same way. numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vae_deploy.errors import UsageError

MAX_BLOCK_ROWS = 1024  # rows drawn per generator call (fewer for large rows: <= ~4 MB a block)


def block_rows(row_shape: tuple[int, ...]) -> int:
    return max(1, min(MAX_BLOCK_ROWS, (1 << 20) // max(1, math.prod(row_shape))))


class BlockStream:
    """Rows of one generator drawn in fixed blocks, handed out in any batch size.

    Row i is the same whatever sizes are taken, because the generator is always called with the
    same block shape in the same order; only the hand-out is sliced.
    """

    def __init__(self, rng: np.random.Generator, row_shape: tuple[int, ...], normal: bool) -> None:
        self._draw = rng.standard_normal if normal else rng.random
        self._block = (block_rows(row_shape), *row_shape)
        self._buf = np.empty((0, *row_shape), np.float32)
        self._pos = 0

    def take(self, k: int) -> np.ndarray:
        parts = []
        while k:
            if self._pos == len(self._buf):
                self._buf, self._pos = self._draw(self._block, dtype=np.float32), 0
            m = min(k, len(self._buf) - self._pos)
            parts.append(self._buf[self._pos : self._pos + m])
            self._pos += m
            k -= m
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def seed_sequence(seed: Any) -> np.random.SeedSequence:
    """A SeedSequence from a non-negative int (or None: fresh entropy), else a UsageError."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if seed is None:
        return np.random.SeedSequence()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer or None, got {seed!r}")
    return np.random.SeedSequence(int(seed))


def sample_streams(
    seed: Any, latent_shape: tuple[int, ...], image_shape: tuple[int, ...] | None
) -> tuple[BlockStream, BlockStream | None]:
    """The latent stream and, when ``image_shape`` is given, the Bernoulli pixel stream of a seed."""
    ss = seed_sequence(seed)
    z = BlockStream(np.random.Generator(np.random.PCG64(ss)), latent_shape, normal=True)
    if image_shape is None:
        return z, None
    pixel_ss = np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, 0))
    return z, BlockStream(np.random.Generator(np.random.PCG64(pixel_ss)), image_shape, normal=False)

"""Seeded random streams for sampling (stream version 2): row i depends only on (seed, i).

Rows come in blocks of ``SAMPLE_BLOCK_ROWS`` (contract.py). Block k of the latents is drawn from
``numpy.random.default_rng(SeedSequence(seed, spawn_key=(k,)))`` with ``standard_normal(dtype=
float32)``, rows in C order; block k of the Bernoulli uniforms from ``default_rng(SeedSequence(seed,
spawn_key=(k, SAMPLE_PIXEL_KEY)))`` with ``random(dtype=float32)``. A block's generator is read
sequentially, so its first m rows are the same whether m rows or the whole block are drawn: a
worker reaches row i by opening block i // SAMPLE_BLOCK_ROWS and skipping i % SAMPLE_BLOCK_ROWS
rows, never by drawing the rows before the block. docs/CONTRACT.md has the recipe for other apps.
The streams know nothing of shapes beyond "a row is ``row_shape`` float32 values" (vector or
spatial latents alike). numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vae_deploy.contract import SAMPLE_BLOCK_ROWS, SAMPLE_PIXEL_KEY
from vae_deploy.errors import UsageError

SKIP_VALUES = 1 << 16  # values drawn per call while skipping to a row inside a block (bounded memory)


def seed_sequence(seed: Any) -> np.random.SeedSequence:
    """A SeedSequence from a non-negative int (or None: fresh entropy), else a UsageError."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if seed is None:
        return np.random.SeedSequence()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer or None, got {seed!r}")
    return np.random.SeedSequence(int(seed))


def block_key(ss: np.random.SeedSequence, block: int, *suffix: int) -> np.random.SeedSequence:
    """The key of one block: ``SeedSequence(seed, spawn_key=(block, *suffix))`` for an int seed
    (the block-th child of ``SeedSequence(seed)``; a seed sequence's own spawn key is kept in front)."""
    return np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, block, *suffix))


class RowStream:
    """Rows of one keyed stream (standard normal or uniform float32), for any row range in any order.

    Consecutive ranges continue the open block's generator; a range elsewhere opens its block's
    generator and skips to the row (at most ``SAMPLE_BLOCK_ROWS - 1`` rows of draws). Not
    thread-safe: one stream per thread.
    """

    def __init__(self, ss: np.random.SeedSequence, row_shape: tuple[int, ...], normal: bool, *suffix: int) -> None:
        self.row_shape = tuple(int(d) for d in row_shape)
        self._ss, self._normal, self._suffix = ss, normal, suffix
        self._row_values = math.prod(self.row_shape)
        self._block, self._pos, self._gen = -1, 0, None  # open block, rows drawn from it, its generator
        self._next = 0  # take()'s cursor

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new float32 array [stop - start, *row_shape]."""
        out = np.empty((stop - start, *self.row_shape), np.float32)
        self.fill(start, out)
        return out

    def fill(self, start: int, out: np.ndarray) -> None:
        """Write rows [start, start + len(out)) into ``out`` (float32, C-contiguous)."""
        done, n = 0, len(out)
        while done < n:
            block, offset = divmod(start + done, SAMPLE_BLOCK_ROWS)
            m = min(n - done, SAMPLE_BLOCK_ROWS - offset)
            self._draw(self._seek(block, offset), out[done : done + m])
            self._pos += m
            done += m
        self._next = start + n

    def take(self, k: int) -> np.ndarray:
        """The next k rows after the last range drawn (from row 0 at first)."""
        return self.rows(self._next, self._next + k)

    def _seek(self, block: int, offset: int) -> np.random.Generator:
        if block != self._block or offset < self._pos:
            self._gen = np.random.Generator(np.random.PCG64(block_key(self._ss, block, *self._suffix)))
            self._block, self._pos = block, 0
        skip = (offset - self._pos) * self._row_values
        if skip:
            scratch = np.empty(min(skip, SKIP_VALUES), np.float32)
            while skip:
                part = scratch[: min(skip, len(scratch))]
                self._draw(self._gen, part)
                skip -= len(part)
            self._pos = offset
        return self._gen

    def _draw(self, gen: np.random.Generator, out: np.ndarray) -> None:
        if self._normal:
            gen.standard_normal(dtype=np.float32, out=out)
        else:
            gen.random(dtype=np.float32, out=out)


def sample_streams(
    seed: Any, latent_shape: tuple[int, ...], image_shape: tuple[int, ...] | None
) -> tuple[RowStream, RowStream | None]:
    """The latent stream and, when ``image_shape`` is given, the Bernoulli pixel stream of a seed."""
    ss = seed_sequence(seed)
    z = RowStream(ss, latent_shape, True)
    return z, None if image_shape is None else RowStream(ss, image_shape, False, SAMPLE_PIXEL_KEY)

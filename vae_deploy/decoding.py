"""Rows [start, stop) of a seeded sample, decoded: the one path that ``VAERuntime.sample_iter`` and
``sample_rows``, shard writing and Ray decoder actors share, so every one of them gives row i the
same bytes. onnxruntime-free itself (it drives an engine from engines.py); numpy only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from vae_deploy.streams import RowStream

# CUDA decodes in runs of exactly this many rows (the last one zero-padded): cuBLAS picks kernels
# by shape, so fixed-size runs keep a row's result independent of how the rows were batched.
CUDA_RUN_ROWS = 1024


def decode(engine: Any, z: np.ndarray) -> np.ndarray:
    """The decoder's first output for latents z; on CUDA in fixed runs of ``CUDA_RUN_ROWS`` rows."""
    if engine.provider != "cuda":
        return engine.run(z)[0]
    parts = []
    for start in range(0, len(z), CUDA_RUN_ROWS):
        chunk = z[start : start + CUDA_RUN_ROWS]
        if len(chunk) < CUDA_RUN_ROWS:
            padded = np.zeros((CUDA_RUN_ROWS, *z.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk
            chunk = padded
        parts.append(engine.run(chunk)[0][: min(CUDA_RUN_ROWS, len(z) - start)])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def sample_batches(
    engine: Any, latents: RowStream, pixels: RowStream | None, start: int, stop: int, batch: int
) -> Iterator[np.ndarray]:
    """Images of rows [start, stop), ``batch`` rows at a time (0/1 draws when ``pixels`` is given)."""
    for row in range(start, stop, batch):
        end = min(row + batch, stop)
        x = decode(engine, latents.rows(row, end))
        if pixels is not None:
            x = (pixels.rows(row, end) < x).astype(np.float32)
        yield x

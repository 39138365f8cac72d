"""Millions of samples on disk: numbered ``.npy`` shards plus an index, streamed with bounded memory.

    write_shards("exported", 10_000_000, "samples/", seed=0)    # this machine
    # vae_deploy.ray_sampling.write_shards_ray(...): the same shards through Ray Data

Layout: ``DIR/shard-00000.npy``, ``shard-00001.npy``, ... each ``[rows, C, H, W]`` float32 in
``np.save``'s format (every shard holds ``shard_rows`` rows but the last), and ``DIR/index.json``
(:class:`ShardIndex`: n, seed, shapes, stream version, provider, the export's sha256s and each
shard's sha256). Concatenated in name order the shards are ``VAERuntime.sample(n, seed)``: bitwise
on the CPU, whoever wrote them (one process or any number of Ray workers, any batch sizes).

Writing: rows may arrive in any order (Ray workers finish when they finish) and go straight to
their offsets in a temp file beside their shard; the sha256 advances as rows become contiguous
(rows that came early are read back once). When a shard's last row arrives it is fsynced and
renamed into place. The index is written first (``complete: false``, claiming the folder), again
at most every ``INDEX_EVERY_S`` seconds as shards complete, and last with ``complete: true``.
Memory: the batch in hand and an 8 MiB read-back buffer, never a whole shard.

Resuming: a run with the same :class:`ShardSpec` in a folder it was interrupted in keeps every
shard whose file still has the sha256 recorded for it and writes the others.

The folder: we write into a new or empty folder, one holding only README.md/.gitignore/.gitkeep,
or one holding our index (whose listed shards a run with other settings replaces; nothing else in
it is touched). Anything else is refused in one line before any work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vae_deploy import inputs
from vae_deploy.shard_index import (
    INDEX,
    SHARD_BYTES,
    ShardEntry,
    ShardIndex,
    ShardSpec,
    check_out_dir,
    check_seed,
    default_batch_rows,
    read_index,
    shard_spec,
)
from vae_deploy.shard_writer import ShardWriter

__all__ = [
    "INDEX",
    "SHARD_BYTES",
    "ShardEntry",
    "ShardIndex",
    "ShardSpec",
    "ShardWriter",
    "ShardsResult",
    "check_out_dir",
    "read_index",
    "write_shards",
]


@dataclass
class ShardsResult:
    """What a shard run did: for the CLI's report and for benchmarks."""

    out_dir: Path
    index: ShardIndex
    seconds: float  # writing, after the runtime (or cluster) was ready
    rows_written: int  # this run; rows_kept came from an interrupted run with the same spec
    rows_kept: int
    shards_kept: int
    provider: str
    fallback_reason: str | None = None
    setup_seconds: float = 0.0  # runtime / cluster start, actors excluded
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.index.spec.n

    @property
    def seed(self) -> int:
        return self.index.spec.seed

    @property
    def samples_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else float("inf")


def write_shards(
    export_dir: str | os.PathLike,
    n: int,
    out_dir: str | os.PathLike,
    *,
    seed: int | None = None,
    shard_rows: int | None = None,
    provider: str = "auto",
    bernoulli: bool = False,
    batch_size: int | None = None,
    resume: bool = True,
    progress: Callable[[int], None] | None = None,
    runtime_options: dict[str, Any] | None = None,
) -> ShardsResult:
    """Sample n images from an export into numbered ``.npy`` shards in ``out_dir`` on this machine.

    Memory stays at one decode batch (``batch_size`` rows; default 4096, or 16 MiB of images)
    whatever n is. ``seed=None`` picks a fresh seed and records it. ``shard_rows`` defaults to
    the largest power of two within ``SHARD_BYTES`` per shard.
    ``runtime_options`` go to ``VAERuntime`` (e.g. ``cpu_plan``); they change speed, never bytes.
    ``progress(k)`` is called with rows as they are written (kept rows of a resumed run first).
    """
    from vae_deploy.runtime import VAERuntime

    n = inputs.count(n, "n")
    seed = check_seed(seed)
    check_out_dir(out_dir)  # before any work
    began = time.perf_counter()
    runtime = VAERuntime(export_dir, provider, **(runtime_options or {}))
    assert runtime.manifest is not None
    shape, provider, precision = runtime.image_shape, runtime.provider, runtime.precision
    spec = shard_spec(runtime.manifest, export_dir, n, seed, shard_rows, shape, bernoulli, provider, precision)
    batch = default_batch_rows(spec.row_bytes) if batch_size is None else inputs.count(batch_size, "batch_size")
    info = {"export_dir": str(Path(export_dir).resolve()), "writer": {"kind": "local", "batch_size": batch}}
    setup = time.perf_counter() - began
    began = time.perf_counter()
    with ShardWriter.open(out_dir, spec, resume=resume, info=info) as writer:
        if progress is not None and writer.rows_kept:
            progress(writer.rows_kept)
        for start, stop in writer.todo():
            row = start
            for images in runtime.sample_iter(stop - start, seed, batch, bernoulli, start=start):
                writer.put(row, images)
                row += len(images)
                if progress is not None:
                    progress(len(images))
        index = writer.finish()
    return ShardsResult(
        Path(out_dir),
        index,
        time.perf_counter() - began,
        writer.rows_written,
        writer.rows_kept,
        writer.shards_kept,
        runtime.provider,
        runtime.fallback_reason,
        setup,
    )

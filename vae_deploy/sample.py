"""The ``vae-deploy sample`` command as a library call: sample an export folder into a file."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vae_deploy.errors import UsageError
from vae_deploy.images import check_out_path, grid_rows, require_png_memory, write_samples
from vae_deploy.resources import available_memory, require_memory
from vae_deploy.runtime import VAERuntime


@dataclass
class SampleResult:
    """What ``sample_to_file`` did: for the CLI's report line."""

    path: Path
    n: int
    seed: int
    provider: str
    seconds: float
    fallback_reason: str | None = None
    shape: tuple[int, ...] = field(default=())

    @property
    def samples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def sample_to_file(
    export_dir: str | os.PathLike,
    n: int,
    out: str | os.PathLike,
    *,
    seed: int | None = None,
    provider: str = "auto",
    batch_size: int | None = None,
    bernoulli: bool = False,
    nrow: int | None = None,
    progress: Callable[[int], None] | None = None,
    latent_size: tuple[int, int] | None = None,
) -> SampleResult:
    """Sample n images from an export folder and write them (what ``vae-deploy sample`` does).

    ``seed=None`` picks a fresh seed and reports it, so every run can be repeated. Exports that
    take any image size need ``latent_size=(h, w)``.
    """
    out = check_out_path(out)
    if nrow is not None:
        grid_rows(np.empty((1, 1, 1, 1)), nrow)  # checks nrow before any work
    seed = int(np.random.SeedSequence().entropy) if seed is None else seed
    runtime = VAERuntime(export_dir, provider)
    if runtime.model.dynamic_size:
        if latent_size is None or len(latent_size) != 2:
            raise UsageError("this export takes any image size: pass --latent-size H,W (latent height and width)")
        shape = runtime.model.shapes_at(latent_size=tuple(latent_size))[1]
    elif latent_size is not None:
        raise UsageError(
            f"--latent-size is for exports that take any image size; this one makes {list(runtime.image_shape)}"
        )
    else:
        shape = tuple(int(v) for v in runtime.image_shape)
    if isinstance(n, int) and n > 0:  # a file holds every sample in memory: say what streams instead
        need = n * 4 * math.prod(shape)
        require_memory(need, f"{n} samples of shape {list(shape)}", "write them as shards with --out-dir (streamed)")
    if out.suffix.lower() == ".png" and isinstance(n, int) and 0 < n * 4 * math.prod(shape) <= available_memory():
        require_png_memory(n, shape, nrow)  # the samples fit (else the runtime says so); their picture?
    start = time.perf_counter()
    sizes = {"latent_size": tuple(latent_size)} if latent_size is not None else {}
    images = runtime.sample(n, seed=seed, batch_size=batch_size, bernoulli=bernoulli, progress=progress, **sizes)
    seconds = time.perf_counter() - start
    write_samples(out, images, nrow)
    return SampleResult(out, n, seed, runtime.provider, seconds, runtime.fallback_reason, tuple(images.shape))

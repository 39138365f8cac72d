"""Checks of what callers hand the runtime: latents, images, counts. Cheap in the common case
(a float32 C-contiguous batch costs a few type checks and one reduction), exact otherwise, and
every refusal is a ``UsageError`` that says what was expected. numpy only."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vae_deploy.contract import Dim
from vae_deploy.errors import UsageError

MAX_ABS_LATENT = 1e6  # a VAE's prior is N(0, I); near float32's limit decoders overflow into NaN
MAX_ABS_LATENT_SQ = MAX_ABS_LATENT * MAX_ABS_LATENT


def count(n: Any, name: str) -> int:
    """A positive integer, or a UsageError naming the argument."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def as_float_array(a: Any, name: str) -> np.ndarray:
    """``a`` as a float32 ndarray, or a UsageError saying which dtype was expected."""
    if type(a) is not np.ndarray:
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{name} must be a numeric array, got {type(a).__name__}: {exc}") from None
    if a.dtype != np.float32:
        if a.dtype.kind not in "fiu":
            raise UsageError(f"{name} must be a real numeric array (float32, float64, int), got dtype {a.dtype}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UsageError(f"{name} has NaN or infinite values; expected finite numbers")
        a = a.astype(np.float32)
    return a


def _fits(shape: tuple[int, ...], rows: tuple[Dim, ...]) -> bool:
    return len(shape) == len(rows) and all(not isinstance(e, int) or g == e for g, e in zip(shape, rows))


def _shape_text(rows: tuple[Dim, ...]) -> str:
    return ", ".join(map(str, rows))


def batch_of(a: Any, name: str, rows: tuple[Dim, ...]) -> tuple[np.ndarray, bool]:
    """``a`` as a C-contiguous float32 [batch, *rows] (one unbatched row is accepted too); also
    whether a single row came in. Symbolic dimensions in ``rows`` take any positive size."""
    if type(a) is not np.ndarray or a.dtype != np.float32:
        a = as_float_array(a, name)
    single = a.ndim == len(rows)
    if single:
        a = a[None]
    if not _fits(a.shape[1:], rows) or 0 in a.shape[1:]:
        raise UsageError(
            f"{name} must have shape [batch, {_shape_text(rows)}] (or [{_shape_text(rows)}] for one), "
            f"got {list(a.shape[1:] if single else a.shape)}"
        )
    if a.shape[0] == 0:
        raise UsageError(f"{name} is an empty batch (shape {list(a.shape)}); expected at least one")
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a, single


def plain_latents(z: np.ndarray) -> bool:
    """Whether a float32 batch is non-empty with every value finite and within ``MAX_ABS_LATENT``,
    in one float32 dot product: a sum of squares <= MAX_ABS_LATENT**2 bounds every value, and
    NaN/inf (or an overflowing sum) fail the comparison. False sends the caller to the exact checks."""
    return z.shape[0] > 0 and np.vdot(z, z) <= MAX_ABS_LATENT_SQ


def check_latents(z: np.ndarray) -> None:
    """Refuse NaN/inf and latents beyond ``MAX_ABS_LATENT`` (common case: :func:`plain_latents`)."""
    if plain_latents(z):
        return
    if not np.isfinite(z).all():
        raise UsageError("z has NaN or infinite values; expected finite numbers")
    peak = float(np.abs(z).max())
    if peak > MAX_ABS_LATENT:
        raise UsageError(f"z has values up to {peak:g} in magnitude; expected latents within ±{MAX_ABS_LATENT:g}")


def check_images(x: np.ndarray, value_range: tuple[float, float]) -> None:
    """Refuse NaN/inf and pixel values outside the model's value range."""
    lo, hi = float(x.min()), float(x.max())
    want = f"[{value_range[0]:g}, {value_range[1]:g}]"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UsageError(f"x has NaN or infinite values; expected pixel values in {want}")
    if lo < value_range[0] or hi > value_range[1]:
        hint = " (divide 8-bit images by 255)" if value_range == (0.0, 1.0) else ""
        raise UsageError(f"x must hold pixel values in {want}, got [{lo:g}, {hi:g}]{hint}")


def index(v: Any, name: str) -> int:
    """A non-negative integer (a row index), or a UsageError naming the argument."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise UsageError(f"{name} must be a non-negative integer, got {v!r}")
    return int(v)


def row_range(start: Any, stop: Any) -> tuple[int, int]:
    """Row indices with 0 <= start < stop, or a UsageError saying so."""
    start, stop = index(start, "start"), index(stop, "stop")
    if start >= stop:
        raise UsageError(f"a row range needs start < stop, got start={start}, stop={stop}")
    return start, stop


def check_multiple(sizes: tuple[int, ...], factor: int, name: str) -> None:
    """Sizes (e.g. an image's height and width) must be multiples of the model's downsampling factor."""
    if any(v % factor for v in sizes):
        raise UsageError(f"{name} must be multiples of {factor} (the model's downsampling factor), got {list(sizes)}")

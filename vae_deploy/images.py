"""Images out: the one tiler (rows of images -> one picture) and PNG/NPY writing, atomically.

numpy + pillow only (torch-free): ``vae-deploy sample`` and every view write through here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vae_deploy.errors import UsageError
from vae_deploy.files import atomic_write
from vae_deploy.resources import require_memory

SAMPLE_SUFFIXES = (".png", ".npy")
# Peak bytes per picture value while making a PNG grid: the float canvas and its clipped, padded
# and scaled copies (4 B each, not all alive at once), the uint8 picture, pillow's copy and the
# encoder's buffer. Measured: 12 B per value.
PNG_BYTES_PER_VALUE = 14


def tile(rows: Sequence[np.ndarray], pad: int = 2, fill: float = 1.0) -> np.ndarray:
    """Rows of images [n, C, H, W] (n may differ per row) -> one float picture [Y, X] (C=1) or
    [Y, X, 3] (C=3), values clipped to [0, 1], ``pad`` pixels of ``fill`` between tiles."""
    c, h, w = rows[0].shape[1:]
    if c not in (1, 3):
        raise UsageError(f"a picture needs images with 1 or 3 channels, got {c}; write .npy instead")
    cols = max(len(r) for r in rows)
    shape = (len(rows) * (h + pad) - pad, cols * (w + pad) - pad) + ((3,) if c == 3 else ())
    canvas = np.full(shape, fill, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = (
                img[0] if c == 1 else img.transpose(1, 2, 0)
            )
    return np.clip(canvas, 0.0, 1.0)


def grid_rows(images: np.ndarray, nrow: int | None = None) -> list[np.ndarray]:
    """Split [n, C, H, W] into rows of ``nrow`` images (default: a near-square grid)."""
    n = len(images)
    if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1):
        raise UsageError(f"nrow must be a positive integer, got {nrow!r}")
    ncol = min(nrow or max(1, math.ceil(math.sqrt(n))), n)
    return [images[i : i + ncol] for i in range(0, n, ncol)]


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile images [n, C, H, W] in [0, 1] into one uint8 picture [rows, cols, C] with a black
    border (like torchvision's ``make_grid``)."""
    picture = tile(grid_rows(images, nrow), pad=padding, fill=0.0)
    picture = np.pad(picture, [(padding, padding), (padding, padding)] + [(0, 0)] * (picture.ndim - 2))
    pixels = (picture * 255.0 + 0.5).astype(np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def grid_picture_shape(
    n: int, image_shape: Sequence[int], nrow: int | None = None, padding: int = 2
) -> tuple[int, int, int]:
    """(height, width, channels) of :func:`image_grid`'s picture of n images of ``image_shape``."""
    c, h, w = image_shape
    ncol = min(nrow or max(1, math.ceil(math.sqrt(n))), n)
    rows = math.ceil(n / ncol)
    return rows * (h + padding) + padding, ncol * (w + padding) + padding, c


def require_png_memory(n: int, image_shape: Sequence[int], nrow: int | None = None) -> None:
    """Refuse, before any work, a PNG grid of n images that would not fit in memory."""
    y, x, c = grid_picture_shape(n, image_shape, nrow)
    require_memory(
        y * x * c * PNG_BYTES_PER_VALUE,
        f"a {x:,} x {y:,} pixel PNG of {n:,} images",
        "write .npy instead, or fewer images",
    )


def check_out_path(path: str | os.PathLike) -> Path:
    """``path`` if it names a .png or .npy file (not a folder), else a UsageError."""
    path = Path(path)
    if path.suffix.lower() not in SAMPLE_SUFFIXES:
        raise UsageError(f"--out must end in {' or '.join(SAMPLE_SUFFIXES)}, got {path.name!r}")
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; expected a file name ending in .png or .npy")
    return path


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 [Y, X, 1|3] or [Y, X] picture as PNG bytes."""
    import io

    from PIL import Image

    if picture.ndim == 3 and picture.shape[2] == 1:
        picture = picture[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def write_samples(path: str | os.PathLike, images: np.ndarray, nrow: int | None = None) -> Path:
    """Write images to ``path`` (.png grid or .npy array) atomically: never half-written."""
    path = check_out_path(path)
    if path.suffix.lower() == ".npy":
        return atomic_write(path, lambda f: np.save(f, images))
    if len(images):
        require_png_memory(len(images), images.shape[1:], nrow)
    return atomic_write(path, png_bytes(image_grid(images, nrow)))

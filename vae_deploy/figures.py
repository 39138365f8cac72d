"""Figures for the views: image grids drawn with matplotlib, saved as palette PNGs, atomically;
and what a figure costs (pixels, memory) so a view can refuse a picture before drawing it.

matplotlib (the optional ``viz`` extra) is used through its object API (no pyplot state) and is
imported only when a figure is drawn.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy.errors import MissingExtraError, ResourceError, UsageError
from vae_deploy.files import atomic_write
from vae_deploy.images import tile
from vae_deploy.latents import VIZ_HINT

DPI = 100
TILE_INCHES = 0.55  # the least longer side of one image in a grid figure (larger images get more)
MAX_PIXELS_PER_SIDE = 2**16 - 1  # matplotlib's Agg renderer draws nothing larger
MAX_TILES = 1000  # images per row or column of a picture: more is no longer a picture
# Peak memory per figure pixel while drawing and saving: Agg's RGBA buffer (4 B), an image axis
# resampled to RGBA float64 (32 B) and matplotlib's other buffers, then the PNG decoded again as
# RGBA and RGB for the palette (7 B). Measured: 40 (mostly blank) to 70 (all image) B per pixel.
FIGURE_BYTES_PER_PIXEL = 80
# Peak memory per mosaic pixel: the float32 canvas and its clipped copy, matplotlib's copy of the
# data and its colour-mapped RGBA image. Measured: about 48 B (gray) and 40 B (colour) per pixel.
MOSAIC_BYTES_PER_PIXEL = 48
# What drawing any view costs beyond its data: matplotlib's and scikit-learn's own buffers.
BASE_BYTES = 128 * 2**20


# --- what a picture costs -----------------------------------------------------------------------


def tile_scale(image_shape: Sequence[int]) -> int:
    """Figure pixels per image pixel in a grid: the least whole number that gives TILE_INCHES a
    side (28x28: 2, 8x8: 7), and 1 for images already that large. Whole numbers keep every image
    pixel the same size; a large image is never shrunk, so 64x64 photos keep their detail."""
    return max(1, math.ceil(TILE_INCHES * DPI / max(image_shape[-2:])))


def tile_inches(image_shape: Sequence[int]) -> tuple[float, float]:
    """(width, height) in inches of one [C, H, W] image in a grid figure (aspect ratio kept)."""
    h, w = image_shape[-2:]
    k = tile_scale(image_shape)
    return k * w / DPI, k * h / DPI


def grid_figure_inches(rows: int, cols: int, image_shape: Sequence[int]) -> tuple[float, float]:
    """Figure size of ``rows`` x ``cols`` images plus room for labels and title."""
    tw, th = tile_inches(image_shape)
    return tw * cols + 1.2, th * rows + 0.7


def figure_bytes(width_in: float, height_in: float) -> int:
    """Peak memory (bytes) of drawing and saving a figure of this size (with BASE_BYTES)."""
    return BASE_BYTES + int(width_in * DPI * height_in * DPI * FIGURE_BYTES_PER_PIXEL)


def mosaic_bytes(rows: int, cols: int, image_shape: Sequence[int], pad: int = 2) -> int:
    """Peak memory (bytes) of tiling rows x cols images and handing the mosaic to matplotlib."""
    h, w = image_shape[-2:]
    return (rows * (h + pad)) * (cols * (w + pad)) * MOSAIC_BYTES_PER_PIXEL


def check_tiles(name: str, value: int, tiles: int, limit: int = MAX_TILES) -> None:
    """Refuse a picture ``tiles`` images wide (or high) when that is over ``limit``."""
    if tiles > limit:
        raise ResourceError(
            f"{name}={value} would make a picture {tiles:,} images wide; at most {limit:,} fit in one "
            "picture: use a smaller value"
        )


def check_figure(width_in: float, height_in: float, what: str) -> None:
    """Refuse a figure matplotlib cannot draw (over 65,535 pixels a side)."""
    w, h = math.ceil(width_in * DPI), math.ceil(height_in * DPI)
    if max(w, h) > MAX_PIXELS_PER_SIDE:
        raise ResourceError(
            f"{what} would be a {w:,} x {h:,} pixel picture; matplotlib draws at most "
            f"{MAX_PIXELS_PER_SIDE:,} pixels a side: use fewer images"
        )


def check_channels(image_shape: Sequence[int]) -> None:
    """Pictures show gray (1 channel) or colour (3 channel) images only."""
    if image_shape[0] not in (1, 3):
        raise UsageError(f"pictures need images with 1 or 3 channels; this model's are {tuple(image_shape)}")


# --- drawing ------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure (object API, constrained layout) of this size in inches."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(f"pictures need matplotlib: {VIZ_HINT}") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def png_path(out: str | os.PathLike) -> Path:
    """``out`` if it names a .png file (not a folder); checked before any work, so a typo fails fast."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; expected a .png file name")
    return out


def save(fig: Any, out: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out`` as a palette PNG, atomically; returns the path."""
    out = png_path(out)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out, palette_png(buf.getvalue()))
    return out


def palette_png(png: bytes) -> bytes:
    """Re-encode as a 256-colour palette PNG: these plots use few colours, and the file is 2-3x smaller."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(
        buf, format="PNG", optimize=True
    )
    return buf.getvalue()


def draw_grid(
    ax: Any,
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str],
    col_labels: Sequence[str] = (),
    pad: int = 2,
    every: int = 1,
    interpolation: str = "nearest",
) -> None:
    """Draw image rows [n, C, H, W] (gray or colour, any size) on ``ax`` with white gutters,
    labelling every ``every``-th row and column."""
    canvas = tile(rows, pad, fill=1.0)
    gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if canvas.ndim == 2 else {}
    ax.imshow(canvas, interpolation=interpolation, **gray)
    h, w = rows[0].shape[2:]
    ys = range(0, len(row_labels), every)
    xs = range(0, len(col_labels), every)
    ax.set_yticks([i * (h + pad) + h / 2 for i in ys], [row_labels[i] for i in ys])
    ax.set_xticks([j * (w + pad) + w / 2 for j in xs], [col_labels[j] for j in xs])
    ax.tick_params(length=0, labelsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)


def grid_figure(
    rows: Sequence[np.ndarray], row_labels: Sequence[str], title: str, col_labels: Sequence[str] = ()
) -> Any:
    """A figure of image rows with labels and a title, sized by grid_figure_inches."""
    cols = max(len(r) for r in rows)
    shape = rows[0].shape[1:]
    fig = new_figure(*grid_figure_inches(len(rows), cols, shape))
    ax = fig.add_subplot()
    # the layout leaves the axes a little smaller than the mosaic: nearest-neighbour keeps small images'
    # pixels crisp at 2x and more, but would drop rows of a larger image shown near 1:1
    draw_grid(ax, rows, row_labels, col_labels, interpolation="nearest" if tile_scale(shape) >= 2 else "antialiased")
    ax.set_title(title, fontsize=9)
    return fig


def label_text(classes: tuple[str, ...], value: Any, width: int = 10) -> str:
    """A label's name (shortened to ``width``) where the dataset names them, else its number."""
    i = int(value)
    text = classes[i] if 0 <= i < len(classes) else str(i)
    return text if len(text) <= width else text[: width - 1] + "~"


def scatter_by_label(fig: Any, ax: Any, xy: np.ndarray, y: np.ndarray, classes: tuple[str, ...]) -> None:
    """Points coloured by label: ten distinct colours (named ticks) for up to ten labels, a
    continuous colour map above, one colour for unlabelled data."""
    count = max(int(y.max(initial=0)) + 1, len(classes))
    if count <= 1:
        ax.scatter(xy[:, 0], xy[:, 1], color="C0", s=5, alpha=0.8)
        return
    if count <= 10:
        points = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", vmin=-0.5, vmax=9.5, s=5, alpha=0.8)
        bar = fig.colorbar(points, ax=ax, ticks=range(count), label="label", shrink=0.85)
        bar.ax.set_yticklabels([label_text(classes, k) for k in range(count)], fontsize=7)
        bar.ax.set_ylim(-0.5, count - 0.5)
        return
    points = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="viridis", s=5, alpha=0.8)
    fig.colorbar(points, ax=ax, label=f"label (0..{count - 1})", shrink=0.85)


__all__ = [
    "MAX_TILES",
    "tile_scale",
    "tile_inches",
    "grid_figure_inches",
    "figure_bytes",
    "mosaic_bytes",
    "check_tiles",
    "check_figure",
    "check_channels",
    "new_figure",
    "png_path",
    "save",
    "palette_png",
    "draw_grid",
    "grid_figure",
    "label_text",
    "scatter_by_label",
]

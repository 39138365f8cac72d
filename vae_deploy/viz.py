"""Inference views: pictures that show what a trained VAE does, each written once for any model source.

A view reads a model through ``load_source(path)``: an export folder (``manifest.json``) runs through
``VAERuntime`` (onnxruntime), a checkpoint file or a run folder (``checkpoint.pt``) through the eager
torch model. Both give the same numpy interface (``encode(x) -> (mu, logvar)``, ``decode(z) -> x``),
so every view below is written once, for gray or colour images of any size. Each view checks its
options and estimates its peak memory before any work (refusing in one line what would not fit),
then writes a PNG atomically and returns its path.

Figures are drawn by :mod:`vae_deploy.figures` (matplotlib, the optional ``viz`` extra); the latent
math lives in :mod:`vae_deploy.latents` (t-SNE uses scikit-learn); both import their extras lazily.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy.errors import UsageError, printable
from vae_deploy.figures import (
    DPI,
    check_channels,
    check_figure,
    check_tiles,
    draw_grid,
    figure_bytes,
    grid_figure,
    grid_figure_inches,
    label_text,
    mosaic_bytes,
    new_figure,
    png_path,
    save,
    scatter_by_label,
)
from vae_deploy.latents import (
    MAP_METHODS,
    TSNE_MIN_IMAGES,
    embed_2d,
    lerp,
    manifold_latents,
    one_per_class,
    pick_pair,
    posterior_draws,
    slerp,
)
from vae_deploy.resources import require_memory

CHUNK = 1000  # rows per encode/decode call: bounds the model's working memory
MAX_SEED = 2**32 - 1  # numpy and scikit-learn seeds
MAX_VALIDATION = 10_000  # the largest validation split of the datasets here (MNIST's test set)
CLASSES = 10  # rows of ``vary``: one per class (a seeded choice of ten where there are more)
MAP_INCHES = (5.6, 4.6)  # latent-map's scatter panel (the whole figure above 2-D)
MANIFOLD_MIN_INCHES = 3.6  # the decoded manifold's side at least; one figure pixel per image pixel above


# --- the model source ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A VAE seen through numpy: float32 x [N,C,H,W] in [0,1] <-> latents [N,d]."""

    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    decode: Callable[[np.ndarray], np.ndarray]
    latent_dim: int
    image_shape: tuple[int, int, int]
    name: str
    kind: str  # "checkpoint" or "export"
    dataset: str | None = None  # what it was trained on, when known (checkpoints)
    binarize: bool = False
    data_root: str | None = None  # where its data was (checkpoints): a folder dataset's default root


def _checkpoint_source(path: Path) -> Source:
    import torch

    from vae_deploy.checkpoint import model_from_state, read_checkpoint

    state = read_checkpoint(path)
    model = model_from_state(state, str(path))
    train_cfg = state.get("train_config") or {}

    @torch.no_grad()
    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mus, logvars = [], []
        for i in range(0, len(x), CHUNK):
            mu, logvar = model.encoder(torch.from_numpy(np.ascontiguousarray(x[i : i + CHUNK], np.float32)))
            mus.append(mu.numpy())
            logvars.append(logvar.numpy())
        return np.concatenate(mus), np.concatenate(logvars)

    @torch.no_grad()
    def decode(z: np.ndarray) -> np.ndarray:
        zs = torch.from_numpy(np.ascontiguousarray(z, np.float32))
        return np.concatenate([model.decoder(zs[i : i + CHUNK]).numpy() for i in range(0, len(zs), CHUNK)])

    return Source(
        encode,
        decode,
        model.latent_dim,
        tuple(model.config.image_shape),
        printable(path.parent.name if path.name == "checkpoint.pt" else path.stem),
        "checkpoint",
        train_cfg.get("dataset"),
        bool(train_cfg.get("binarize", False)),
        train_cfg.get("data_root"),
    )


def _export_source(folder: Path, provider: str) -> Source:
    from vae_deploy.runtime import VAERuntime

    rt = VAERuntime(folder, provider=provider)
    trained_on = rt.manifest.raw.get("training") or {}

    def in_chunks(f: Callable[[np.ndarray], Any], x: np.ndarray) -> list[Any]:
        return [f(x[i : i + CHUNK]) for i in range(0, max(len(x), 1), CHUNK)]

    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = in_chunks(rt.encode, x)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def decode(z: np.ndarray) -> np.ndarray:
        return np.concatenate(in_chunks(rt.decode, z))

    return Source(
        encode,
        decode,
        int(rt.latent_dim),
        tuple(int(s) for s in rt.image_shape),
        printable(folder.name),
        "export",
        trained_on.get("dataset"),
        bool(trained_on.get("binarize", False)),
    )


def load_source(path: str | os.PathLike, provider: str = "auto") -> Source:
    """An export folder (has manifest.json), a run folder (has checkpoint.pt) or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return _export_source(p, provider)
        if (p / "checkpoint.pt").is_file():
            return _checkpoint_source(p / "checkpoint.pt")
        raise UsageError(f"{p} is neither an export folder (no manifest.json) nor a run folder (no checkpoint.pt)")
    if p.is_file():
        return _checkpoint_source(p)
    raise UsageError(f"no such model: {p} (expected an export folder, a run folder or a checkpoint file)")


# --- checks before any work ---------------------------------------------------------------------


def validation_set(
    source: Source, dataset: str | None, data_root: str | os.PathLike | None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validation images (float32 [N,C,H,W]) and labels (int64 [N]) that fit ``source``.

    ``synthetic``, ``folder`` and ``celeba`` data are made in the model's image shape; another
    dataset must match it. A folder model's default root is the folder it was trained on.
    """
    x, y, _ = _validation(source, dataset, data_root, limit)
    return x, y


def _validation(
    source: Source, dataset: str | None, data_root: str | os.PathLike | None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """:func:`validation_set` and the label names (``()`` where the dataset has none)."""
    from vae_deploy.data import load_splits, to_unit_float

    if limit is not None:
        _count("limit", limit)
    name = dataset or source.dataset or "mnist"
    if data_root is None and name == source.dataset:
        data_root = source.data_root
    shape = tuple(source.image_shape)
    splits = load_splits(
        name, data_root, binarize=source.binarize, train_limit=1, val_limit=limit, image_shape=shape, as_float=False
    )
    x = to_unit_float(splits.val_x).numpy().astype(np.float32, copy=False)
    if tuple(x.shape[1:]) != shape:
        raise UsageError(
            f"{source.name} takes images of shape {shape}, but {name} has "
            f"{tuple(x.shape[1:])}: pick the dataset the model was trained on"
        )
    return x, splits.val_y.numpy(), splits.classes


def _count(name: str, value: Any, least: int = 1, why: str = "") -> int:
    """``value`` as an int if it is an integer >= ``least``, else a UsageError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if value < least:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(least, f"at least {least}")
        raise UsageError(f"{name} must be {kind}{why}, got {value!r}")
    return int(value)


def _start(source: Source, out: str | os.PathLike, seed: Any) -> None:
    """What every view checks first: the output path, the picture's channels, the seed."""
    png_path(out)
    check_channels(source.image_shape)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")


def _image_bytes(source: Source, count: int) -> int:
    """Memory of ``count`` float32 images of the model's shape."""
    return count * 4 * math.prod(source.image_shape)


def _decode_bytes(source: Source, count: int) -> int:
    """Decoding ``count`` latents: the images twice (the chunks and their concatenation) and one
    chunk's working memory in the model."""
    return 2 * _image_bytes(source, count) + 8 * _image_bytes(source, min(count, CHUNK))


def _require_grid(source: Source, what: str, hint: str, rows: int, cols: int, decoded: int) -> None:
    """Refuse a grid figure that matplotlib cannot draw or that would not fit in memory."""
    inches = grid_figure_inches(rows, cols, source.image_shape)
    check_figure(*inches, what)
    need = _decode_bytes(source, decoded) + mosaic_bytes(rows, cols, source.image_shape)
    require_memory(need + figure_bytes(*inches), what, hint)


# --- views --------------------------------------------------------------------------------------


def reconstruct(
    source: Source,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    n: int = 8,
    seed: int = 0,
) -> Path:
    """n random validation images (top row) above their reconstructions decode(mu) (bottom row)."""
    _start(source, out, seed)
    n = _count("n", n)
    check_tiles("n", n, n)
    _require_grid(source, f"reconstruct -n {n}", "use a smaller -n", 2, n, n)
    x, y, classes = _validation(source, dataset, data_root)
    idx = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    mu, _ = source.encode(x[idx])
    fig = grid_figure(
        [x[idx], source.decode(mu)],
        ["original", "reconstruction"],
        f"{source.name}: reconstructions (validation, seed {seed})",
        [label_text(classes, v) for v in y[idx]] if len(np.unique(y)) > 1 else [f"#{i}" for i in idx],
    )
    return save(fig, out)


def interpolate(
    source: Source,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    steps: int = 10,
    slerp_row: bool = False,
    indices: tuple[int, int] | None = None,
    seed: int = 0,
) -> Path:
    """Decode the path between the latent means of two validation images of different classes.

    The first and last columns are the two originals; between them ``steps`` decoded points from
    z_a to z_b (ends included) on the straight line, and on the great circle too with ``slerp_row``.
    """
    _start(source, out, seed)
    steps = _count("steps", steps, 2, " (both ends included)")
    check_tiles("steps", steps, steps + 2)
    rows = 2 if slerp_row else 1
    _require_grid(source, f"interpolate --steps {steps}", "use fewer --steps", rows, steps + 2, rows * steps)
    if indices is not None:
        if len(indices) != 2:
            raise UsageError(f"indices must be two validation indices (i, j), got {indices!r}")
        indices = (_count("index", indices[0], 0), _count("index", indices[1], 0))
    x, y, classes = _validation(source, dataset, data_root)
    if indices is None:
        i, j = pick_pair(y, seed)
    else:
        i, j = indices
        for v in (i, j):
            if not 0 <= v < len(x):
                raise UsageError(f"index {v} is out of range: the validation set has {len(x)} images")
    mu, _ = source.encode(x[[i, j]])
    paths = {"linear": lerp(mu[0], mu[1], steps)}
    if slerp_row:
        paths["slerp"] = slerp(mu[0], mu[1], steps)
    picture = [np.concatenate([x[i : i + 1], source.decode(z), x[j : j + 1]]) for z in paths.values()]
    cols = [f"#{i}"] + [f"{t:.2g}" for t in np.linspace(0, 1, steps)] + [f"#{j}"]
    title = (
        f"{source.name}: {label_text(classes, y[i], 24)} -> {label_text(classes, y[j], 24)} (validation #{i} -> #{j})"
    )
    return save(grid_figure(picture, list(paths), title, cols), out)


def vary(
    source: Source,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    n: int = 5,
    seed: int = 0,
) -> Path:
    """One row per class (at most ``CLASSES``, picked by ``seed``; unlabelled data: as many images):
    an example, then n decodes of z drawn from its posterior N(mu, sigma^2)."""
    _start(source, out, seed)
    n = _count("n", n)
    check_tiles("n", n, n + 1)
    _require_grid(source, f"vary -n {n}", "use a smaller -n", CLASSES, n + 1, CLASSES * n)
    x, y, names = _validation(source, dataset, data_root)
    rng = np.random.default_rng(seed)
    classes, picks = one_per_class(y, rng)
    if len(classes) > CLASSES:  # a seeded choice of CLASSES classes, in label order
        keep = np.sort(rng.choice(len(classes), size=CLASSES, replace=False))
        classes, picks = [classes[k] for k in keep], [picks[k] for k in keep]
    row_labels = [label_text(names, c) for c in classes]
    if len(classes) == 1:  # unlabelled: different images, one row each
        picks = rng.choice(len(x), size=min(CLASSES, len(x)), replace=False).tolist()
        row_labels = [f"#{k}" for k in picks]
    mu, logvar = source.encode(x[picks])
    rows = [
        np.concatenate([x[k : k + 1], source.decode(posterior_draws(mu[r], logvar[r], n, rng))])
        for r, k in enumerate(picks)
    ]
    cols = ["input"] + [f"z~q{t + 1}" for t in range(n)]
    per = "per class" if len(classes) > 1 else "per image"
    title = f"{source.name}: {n} draws from q(z|x) {per} (seed {seed})"
    return save(grid_figure(rows, row_labels, title, cols), out)


def map_inches(image_shape: tuple[int, int, int], grid: int | None) -> tuple[float, float]:
    """latent-map's figure size: the scatter panel, and for a 2-D latent the decoded manifold beside
    it, large enough to show each decoded image at its own size (a 20 x 20 grid of 64x64 images is
    1,280 pixels a side) so that large images are not shrunk into a blur."""
    if grid is None:
        return MAP_INCHES
    side = max(MANIFOLD_MIN_INCHES, grid * max(image_shape[1:]) / DPI)
    return MAP_INCHES[0] + side + 0.9, max(MAP_INCHES[1] - 0.6, side + 1.2)  # + room for ticks and labels


def _map_bytes(source: Source, images: int, grid: int | None) -> int:
    """latent-map's peak: the images mapped (encoded in chunks), their embedding (t-SNE keeps ~90
    neighbours a point), and for a 2-D latent the decoded manifold, its mosaic and the figure."""
    need = _image_bytes(source, min(images, CHUNK)) * 8 + images * (8 * source.latent_dim + 3 * 8 * 91)
    if grid is not None:
        need += _decode_bytes(source, grid * grid) + mosaic_bytes(grid, grid, source.image_shape, pad=0)
    return need + figure_bytes(*map_inches(source.image_shape, grid))


def latent_map(
    source: Source,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    method: str = "auto",
    limit: int | None = 2000,
    grid: int = 20,
    seed: int = 0,
) -> Path:
    """Validation latent means coloured by label (t-SNE or PCA above 2-D); for a 2-D latent also the
    decoded manifold: a grid of decodes over the prior's quantiles, as a second panel."""
    _start(source, out, seed)
    grid = _count("grid", grid)
    if method not in MAP_METHODS:
        raise UsageError(f"method must be one of {MAP_METHODS}, got {method!r}")
    images = min(_count("limit", limit), MAX_VALIDATION) if limit is not None else MAX_VALIDATION
    d = source.latent_dim
    how = "tsne" if method == "auto" else method
    if how == "tsne" and d > 2 and images < TSNE_MIN_IMAGES:
        raise UsageError(
            f"t-SNE needs at least {TSNE_MIN_IMAGES} images, got --limit {images}: map more images or use --method pca"
        )
    two_d = d == 2
    if two_d:
        check_tiles("grid", grid, grid)
    what = f"latent-map --limit {images}" + (f" --grid {grid}" if two_d else "")
    check_figure(*map_inches(source.image_shape, grid if two_d else None), what)
    require_memory(_map_bytes(source, images, grid if two_d else None), what, "use a smaller --limit or --grid")
    x, y, classes = _validation(source, dataset, data_root, limit)
    mu, _ = source.encode(x)
    xy, how = embed_2d(mu, how, seed)
    inches = map_inches(source.image_shape, grid if two_d else None)
    fig = new_figure(*inches)
    panels = fig.add_gridspec(1, 2, width_ratios=[MAP_INCHES[0], inches[0] - MAP_INCHES[0]]) if two_d else None
    ax = fig.add_subplot(panels[0], box_aspect=1) if panels is not None else fig.add_subplot()
    scatter_by_label(fig, ax, xy, y, classes)
    ax.set_xlabel(f"{how} 1" if how != "z" else "z1")
    ax.set_ylabel(f"{how} 2" if how != "z" else ("z2" if d == 2 else ""))
    ax.set_title(f"{source.name}: latent means of {len(x)} validation images (d={d}, {how})", fontsize=9)
    if two_d:
        z, q = manifold_latents(grid)
        tiles = source.decode(z)
        rows = [tiles[r * grid : (r + 1) * grid] for r in range(grid)]
        ax2 = fig.add_subplot(panels[1])
        labels = [f"{v:.2f}" for v in q]
        # antialiased: the mosaic is shrunk to fit, and nearest-neighbour shrinking aliases
        draw_grid(ax2, rows, labels[::-1], labels, pad=0, every=max(1, grid // 6), interpolation="antialiased")
        ax2.set_xlabel("z1 (N(0,1) quantiles 5%..95%)")
        ax2.set_ylabel("z2")
        ax2.set_title("decoded manifold", fontsize=9)
        ax.add_patch(_quantile_box(q))
    return save(fig, out)


def _quantile_box(q: np.ndarray) -> Any:
    from matplotlib.patches import Rectangle

    lo, hi = float(q[0]), float(q[-1])
    return Rectangle((lo, lo), hi - lo, hi - lo, fill=False, ls="--", lw=0.8, ec="black")


# --- training curves ----------------------------------------------------------------------------


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch rows of RUN_DIR/metrics.jsonl (or of that file given directly)."""
    p = Path(run_dir)
    path = p / "metrics.jsonl" if p.is_dir() else p
    if not path.is_file():
        raise UsageError(f"no metrics at {path}: pass a run folder written by `vae-deploy train --out`")
    # a parsed JSON line takes about ten times its text: refuse a file that could not be held
    require_memory(10 * path.stat().st_size, f"reading {path}", "is it really a metrics.jsonl?")
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(row, dict) or not _is_number(row.get("epoch")):
            raise UsageError(f"{path}:{n} is not a metrics row (expected an object with a numeric 'epoch')")
        bad = [k for k, v in row.items() if k.startswith(("train_", "val_")) and not _is_number(v, True)]
        if bad:
            raise UsageError(f"{path}:{n}: {bad[0]} is {row[bad[0]]!r}, expected a number")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} has no epochs yet: train for at least one epoch")
    return rows


def _is_number(value: Any, none_ok: bool = False) -> bool:
    return (value is None and none_ok) or (isinstance(value, (int, float)) and not isinstance(value, bool))


CURVE_PANELS = (("loss", "total (objective)"), ("recon", "reconstruction"), ("kl", "KL (nats/image)"))


def curves(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Train/validation curves per epoch: total objective, reconstruction, KL, and val -ELBO."""
    png_path(out)
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    panels = [*CURVE_PANELS, ("nelbo", "-ELBO (nats/image)")]
    fig = new_figure(3.2 * len(panels), 3.0)
    axes = fig.subplots(1, len(panels))
    for ax, (key, title) in zip(axes, panels):
        for split, style, colour in (("train", "-o", "C0"), ("val", "-s", "C1")):
            values = [r.get(f"{split}_{key}") for r in rows]
            if any(v is None for v in values):
                continue
            ax.plot(epochs, values, style, color=colour, ms=3, lw=1.2, label=split)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    name = Path(run_dir).name if Path(run_dir).is_dir() else Path(run_dir).parent.name
    fig.suptitle(f"{printable(name)}: {len(rows)} epochs", fontsize=10)
    return save(fig, out)


__all__ = [
    "Source",
    "load_source",
    "validation_set",
    "lerp",
    "slerp",
    "posterior_draws",
    "manifold_latents",
    "embed_2d",
    "pick_pair",
    "one_per_class",
    "reconstruct",
    "interpolate",
    "vary",
    "latent_map",
    "read_metrics",
    "curves",
]

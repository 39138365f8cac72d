"""Inference views: pictures that show what a trained VAE does, each written once for any model source.

A view reads a model through ``load_source(path)``: an export folder (``manifest.json``) runs through
``VAERuntime`` (onnxruntime), a checkpoint file or a run folder (``checkpoint.pt``) through the eager
torch model. Both give the same numpy interface (``encode(x) -> (mu, logvar)``, ``decode(z) -> x``),
so every view below is written once. Each view writes a PNG atomically and returns its path.

Plots use matplotlib (the optional ``viz`` extra) through its object API (no pyplot state), and
t-SNE uses scikit-learn; both are imported only when a view runs.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from vae_deploy.errors import MissingExtraError, UsageError

VIZ_HINT = 'pip install "vae-deploy[viz]"'
MAP_METHODS = ("auto", "tsne", "pca")


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


def _checkpoint_source(path: Path) -> Source:
    import torch

    from vae_deploy.checkpoint import model_from_state, read_checkpoint

    state = read_checkpoint(path)
    model = model_from_state(state, str(path))
    train_cfg = state.get("train_config") or {}

    @torch.no_grad()
    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mus, logvars = [], []
        for i in range(0, len(x), 1000):
            mu, logvar = model.encoder(torch.from_numpy(np.ascontiguousarray(x[i : i + 1000], np.float32)))
            mus.append(mu.numpy())
            logvars.append(logvar.numpy())
        return np.concatenate(mus), np.concatenate(logvars)

    @torch.no_grad()
    def decode(z: np.ndarray) -> np.ndarray:
        zs = torch.from_numpy(np.ascontiguousarray(z, np.float32))
        return np.concatenate([model.decoder(zs[i : i + 1000]).numpy() for i in range(0, len(zs), 1000)])

    return Source(
        encode,
        decode,
        model.latent_dim,
        tuple(model.config.image_shape),
        path.parent.name if path.name == "checkpoint.pt" else path.stem,
        "checkpoint",
        train_cfg.get("dataset"),
        bool(train_cfg.get("binarize", False)),
    )


def _export_source(folder: Path, provider: str) -> Source:
    from vae_deploy.runtime import VAERuntime

    rt = VAERuntime(folder, provider=provider)
    trained_on = rt.manifest.raw.get("training") or {}
    return Source(
        rt.encode,
        rt.decode,
        int(rt.latent_dim),
        tuple(int(s) for s in rt.image_shape),
        folder.name,
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


# --- data ---------------------------------------------------------------------------------------


def validation_set(
    source: Source, dataset: str | None, data_root: str | os.PathLike | None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validation images (float32 [N,C,H,W]) and labels (int64 [N]) that fit ``source``."""
    from vae_deploy.data import load_splits

    name = dataset or source.dataset or "mnist"
    splits = load_splits(name, data_root, binarize=source.binarize, val_limit=limit)
    x = splits.val_x.numpy().astype(np.float32, copy=False)
    if tuple(x.shape[1:]) != tuple(source.image_shape):
        raise UsageError(
            f"{source.name} takes images of shape {tuple(source.image_shape)}, but {name} has "
            f"{tuple(x.shape[1:])}: pick the dataset the model was trained on"
        )
    return x, splits.val_y.numpy()


def _positive(name: str, value: int) -> None:
    if int(value) < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")


# --- latent-space helpers (pure numpy; tested directly) -----------------------------------------


def lerp(z0: np.ndarray, z1: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` points on the straight line from z0 to z1, both ends included: [steps, d]."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float64)[:, None]
    return ((1 - t) * z0[None].astype(np.float64) + t * z1[None].astype(np.float64)).astype(np.float32)


def slerp(z0: np.ndarray, z1: np.ndarray, steps: int) -> np.ndarray:
    """Spherical interpolation (great circle, norms interpolated linearly); lerp for parallel ends.

    A Gaussian latent's mass sits near a shell, so the path along it stays in likely regions where
    the straight line cuts through the low-norm middle.
    """
    a, b = z0.astype(np.float64), z1.astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na < 1e-12 or nb < 1e-12:
        return lerp(z0, z1, steps)
    omega = math.acos(float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0)))
    if omega < 1e-6 or math.pi - omega < 1e-6:  # parallel or opposite: no unique great circle
        return lerp(z0, z1, steps)
    t = np.linspace(0.0, 1.0, steps)[:, None]
    dirs = (np.sin((1 - t) * omega) * (a / na) + np.sin(t * omega) * (b / nb)) / math.sin(omega)
    norms = (1 - t) * na + t * nb
    return (dirs * norms).astype(np.float32)


def posterior_draws(mu: np.ndarray, logvar: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of z ~ N(mu, diag(exp(logvar))) for one image: [n, d]."""
    eps = rng.standard_normal((n, mu.shape[-1]))
    return (mu[None] + np.exp(0.5 * logvar)[None] * eps).astype(np.float32)


def manifold_latents(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """A grid x grid lattice over N(0, I)'s 5%..95% quantiles (row-major, z2 decreasing down the rows).

    Returns (z [grid*grid, 2], the 1-D quantile values). Quantile spacing puts equal prior mass
    between neighbours, as in Kingma & Welling's manifold figures.
    """
    q = np.array([NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, grid)], dtype=np.float32)
    z1, z2 = np.meshgrid(q, q[::-1])
    return np.stack([z1.ravel(), z2.ravel()], axis=1), q


def embed_2d(mu: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of latent means: the means themselves when d <= 2, else t-SNE or PCA."""
    if method not in MAP_METHODS:
        raise UsageError(f"method must be one of {MAP_METHODS}, got {method!r}")
    d = mu.shape[1]
    if d == 1:
        return np.column_stack([mu[:, 0], np.zeros(len(mu))]).astype(np.float32), "z"
    if d == 2:
        return mu.astype(np.float32), "z"
    if method == "pca":
        centred = mu - mu.mean(axis=0)
        _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        return (centred @ vt[:2].T).astype(np.float32), "PCA"
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise MissingExtraError(f"t-SNE needs scikit-learn: {VIZ_HINT} (or use --method pca)") from None
    perplexity = float(min(30.0, max(2.0, (len(mu) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(mu.astype(np.float32)).astype(np.float32), "t-SNE"


# --- rendering ----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(f"pictures need matplotlib: {VIZ_HINT}") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png_path(out: str | os.PathLike) -> Path:
    """Checked before any work is done, so a typo fails fast."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; expected a .png file name")
    return out


def _save(fig: Any, out: str | os.PathLike) -> Path:
    from vae_deploy.files import atomic_write

    out = _png_path(out)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out, _palette_png(buf.getvalue()))
    return out


def _palette_png(png: bytes) -> bytes:
    """Re-encode as a 256-colour palette PNG: these plots use few colours, and the file is 2-3x smaller."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(
        buf, format="PNG", optimize=True
    )
    return buf.getvalue()


def _mosaic(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of images [n,C,H,W] (n may differ) -> one [rows*(H+pad)-pad, cols*(W+pad)-pad(, 3)] array."""
    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    shape = (len(rows) * (h + pad) - pad, cols * (w + pad) - pad) + ((3,) if c == 3 else ())
    canvas = np.ones(shape, dtype=np.float32)  # white gutters
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = img[0] if c == 1 else img[:3].transpose(1, 2, 0)
            canvas[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = tile
    return np.clip(canvas, 0.0, 1.0)


def _draw_grid(
    ax: Any,
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str],
    col_labels: Sequence[str] = (),
    pad: int = 2,
    every: int = 1,
    interpolation: str = "nearest",
) -> None:
    """Draw image rows on ``ax``, labelling every ``every``-th row and column."""
    canvas = _mosaic(rows, pad)
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation=interpolation)
    h, w = rows[0].shape[2:]
    ys = range(0, len(row_labels), every)
    xs = range(0, len(col_labels), every)
    ax.set_yticks([i * (h + pad) + h / 2 for i in ys], [row_labels[i] for i in ys])
    ax.set_xticks([j * (w + pad) + w / 2 for j in xs], [col_labels[j] for j in xs])
    ax.tick_params(length=0, labelsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _grid_figure(
    rows: Sequence[np.ndarray], row_labels: Sequence[str], title: str, col_labels: Sequence[str] = ()
) -> Any:
    cols = max(len(r) for r in rows)
    fig = _figure(0.55 * cols + 1.2, 0.55 * len(rows) + 0.7)
    ax = fig.add_subplot()
    _draw_grid(ax, rows, row_labels, col_labels)
    ax.set_title(title, fontsize=9)
    return fig


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
    _png_path(out)
    _positive("n", n)
    x, y = validation_set(source, dataset, data_root)
    idx = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    mu, _ = source.encode(x[idx])
    fig = _grid_figure(
        [x[idx], source.decode(mu)],
        ["original", "reconstruction"],
        f"{source.name}: reconstructions (validation, seed {seed})",
        [str(int(v)) for v in y[idx]],
    )
    return _save(fig, out)


def pick_pair(labels: np.ndarray, seed: int) -> tuple[int, int]:
    """Two validation indices with different labels, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    i = int(rng.integers(len(labels)))
    others = np.flatnonzero(labels != labels[i])
    if len(others) == 0:
        raise UsageError("every validation image has the same label: pass --indices i,j")
    return i, int(rng.choice(others))


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
    _png_path(out)
    if steps < 2:
        raise UsageError(f"steps must be at least 2 (both ends included), got {steps}")
    x, y = validation_set(source, dataset, data_root)
    if indices is None:
        i, j = pick_pair(y, seed)
    else:
        i, j = (int(v) for v in indices)
        for v in (i, j):
            if not 0 <= v < len(x):
                raise UsageError(f"index {v} is out of range: the validation set has {len(x)} images")
    mu, _ = source.encode(x[[i, j]])
    paths = {"linear": lerp(mu[0], mu[1], steps)}
    if slerp_row:
        paths["slerp"] = slerp(mu[0], mu[1], steps)
    rows = [np.concatenate([x[i : i + 1], source.decode(z), x[j : j + 1]]) for z in paths.values()]
    cols = [f"#{i}"] + [f"{t:.2g}" for t in np.linspace(0, 1, steps)] + [f"#{j}"]
    title = f"{source.name}: {int(y[i])} -> {int(y[j])} (validation #{i} -> #{j})"
    return _save(_grid_figure(rows, list(paths), title, cols), out)


def one_per_class(labels: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """The sorted classes present in ``labels`` and one random index of each."""
    order = rng.permutation(len(labels))
    classes = sorted(int(c) for c in np.unique(labels))
    return classes, [int(order[np.flatnonzero(labels[order] == c)[0]]) for c in classes]


def vary(
    source: Source,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    n: int = 5,
    seed: int = 0,
) -> Path:
    """One row per class: an example, then n decodes of z drawn from its posterior N(mu, sigma^2)."""
    _png_path(out)
    _positive("n", n)
    x, y = validation_set(source, dataset, data_root)
    rng = np.random.default_rng(seed)
    classes, picks = one_per_class(y, rng)
    mu, logvar = source.encode(x[picks])
    rows = [
        np.concatenate([x[k : k + 1], source.decode(posterior_draws(mu[r], logvar[r], n, rng))])
        for r, k in enumerate(picks)
    ]
    cols = ["input"] + [f"z~q{t + 1}" for t in range(n)]
    title = f"{source.name}: {n} draws from q(z|x) per class (seed {seed})"
    return _save(_grid_figure(rows, [str(c) for c in classes], title, cols), out)


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
    _png_path(out)
    _positive("grid", grid)
    if method not in MAP_METHODS:
        raise UsageError(f"method must be one of {MAP_METHODS}, got {method!r}")
    x, y = validation_set(source, dataset, data_root, limit)
    mu, _ = source.encode(x)
    xy, how = embed_2d(mu, "tsne" if method == "auto" else method, seed)
    two_d = source.latent_dim == 2
    fig = _figure(9.0 if two_d else 5.6, 4.0 if two_d else 4.6)
    ax = fig.add_subplot(1, 2, 1) if two_d else fig.add_subplot()
    points = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", vmin=-0.5, vmax=9.5, s=5, alpha=0.8)
    fig.colorbar(points, ax=ax, ticks=range(10), label="label", shrink=0.85)
    d = source.latent_dim
    ax.set_xlabel(f"{how} 1" if how != "z" else "z1")
    ax.set_ylabel(f"{how} 2" if how != "z" else ("z2" if d == 2 else ""))
    ax.set_title(f"{source.name}: latent means of {len(x)} validation images (d={d}, {how})", fontsize=9)
    if two_d:
        z, q = manifold_latents(grid)
        tiles = source.decode(z)
        rows = [tiles[r * grid : (r + 1) * grid] for r in range(grid)]
        ax2 = fig.add_subplot(1, 2, 2)
        labels = [f"{v:.2f}" for v in q]
        # antialiased: the mosaic is shrunk to fit, and nearest-neighbour shrinking aliases
        _draw_grid(ax2, rows, labels[::-1], labels, pad=0, every=max(1, grid // 6), interpolation="antialiased")
        ax2.set_xlabel("z1 (N(0,1) quantiles 5%..95%)")
        ax2.set_ylabel("z2")
        ax2.set_title("decoded manifold", fontsize=9)
        ax.add_patch(_quantile_box(q))
    return _save(fig, out)


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
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise UsageError(f"{path}:{n} is not a metrics row (expected an object with 'epoch')")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} has no epochs yet: train for at least one epoch")
    return rows


CURVE_PANELS = (("loss", "total (objective)"), ("recon", "reconstruction"), ("kl", "KL (nats/image)"))


def curves(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Train/validation curves per epoch: total objective, reconstruction, KL, and val -ELBO."""
    _png_path(out)
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    panels = [*CURVE_PANELS, ("nelbo", "-ELBO (nats/image)")]
    fig = _figure(3.2 * len(panels), 3.0)
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
    fig.suptitle(f"{name}: {len(rows)} epochs", fontsize=10)
    return _save(fig, out)


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

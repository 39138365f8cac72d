"""Latent-space helpers for the views: paths, posterior draws, the prior's lattice, 2-D maps,
and the seeded picks of validation images. Pure numpy (scikit-learn only for t-SNE)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from vae_deploy.errors import MissingExtraError, UsageError

VIZ_HINT = 'pip install "vae-deploy[viz]"'
MAP_METHODS = ("auto", "tsne", "pca")
TSNE_MIN_IMAGES = 3  # scikit-learn needs more points than the perplexity (at least 2)


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
    if len(mu) == 0:
        raise UsageError("no latent means to map: expected at least one image")
    d = mu.shape[1]
    if d == 1:
        return np.column_stack([mu[:, 0], np.zeros(len(mu))]).astype(np.float32), "z"
    if d == 2:
        return mu.astype(np.float32), "z"
    if method == "pca":
        centred = mu - mu.mean(axis=0)
        _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        xy = np.zeros((len(mu), 2), np.float32)  # fewer than 2 images span fewer than 2 axes
        xy[:, : min(2, len(vt))] = centred @ vt[:2].T
        return xy, "PCA"
    if len(mu) < TSNE_MIN_IMAGES:
        raise UsageError(
            f"t-SNE needs at least {TSNE_MIN_IMAGES} images, got {len(mu)}: map more images "
            "(--limit) or use --method pca"
        )
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise MissingExtraError(f"t-SNE needs scikit-learn: {VIZ_HINT} (or use --method pca)") from None
    perplexity = float(min(30.0, max(2.0, (len(mu) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(mu.astype(np.float32)).astype(np.float32), "t-SNE"


def pick_pair(labels: np.ndarray, seed: int) -> tuple[int, int]:
    """Two validation indices chosen by ``seed``: with different labels, or for unlabelled data
    (every label the same) two different images."""
    rng = np.random.default_rng(seed)
    i = int(rng.integers(len(labels)))
    others = np.flatnonzero(labels != labels[i])
    if len(others) == 0:
        others = np.delete(np.arange(len(labels)), i)
    if len(others) == 0:
        raise UsageError("the validation set has one image: interpolation needs two (pass --indices i,j)")
    return i, int(rng.choice(others))


def one_per_class(labels: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """The sorted classes present in ``labels`` and one random index of each."""
    order = rng.permutation(len(labels))
    classes = sorted(int(c) for c in np.unique(labels))
    return classes, [int(order[np.flatnonzero(labels[order] == c)[0]]) for c in classes]


__all__ = [
    "MAP_METHODS",
    "TSNE_MIN_IMAGES",
    "lerp",
    "slerp",
    "posterior_draws",
    "manifold_latents",
    "embed_2d",
    "pick_pair",
    "one_per_class",
]

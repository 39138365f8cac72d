"""Datasets as in-memory float tensors [N,1,28,28] in [0,1] with integer labels.

Reads a torchvision-style root (``ROOT/MNIST/raw/*-idx?-ubyte[.gz]``): through torchvision when
the files it expects are there (or with ``download=True``), else with a small IDX reader. When only
the 10,000-image t10k split exists, it is split deterministically into 9,000 train / 1,000
validation images, and the returned ``Splits.note`` says so.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vae_deploy.errors import DataError, UsageError

DATA_ENV = "VAE_DEPLOY_DATA"
_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_T10K_TRAIN = 9000  # t10k-only fallback: first 9,000 (after a fixed shuffle) train, rest validate
_SPLIT_SEED = 20240521


@dataclass(frozen=True)
class Splits:
    """Train/validation images [N,1,H,W] float32 in [0,1] and labels [N] int64."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    note: str


def resolve_data_root(data_root: str | os.PathLike | None) -> Path | None:
    """``data_root`` if given, else ``$VAE_DEPLOY_DATA``, else None."""
    root = data_root if data_root else os.environ.get(DATA_ENV)
    return Path(root).expanduser() if root else None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally .gz) into a numpy array, checking its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - header != count:
        raise DataError(f"{path} is truncated or padded: header says {dims}, {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(raw: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (raw / name).is_file():
            return raw / name
    return None


def _load_split(raw: Path, prefix: str) -> tuple[Tensor, Tensor] | None:
    images, labels = _find(raw, f"{prefix}-images-idx3-ubyte"), _find(raw, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{images} and {labels} do not form an image/label pair")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def _via_torchvision(name: str, root: Path, download: bool) -> tuple[Tensor, ...] | None:
    """Use torchvision when its files are present (or downloadable); None if it cannot."""
    try:
        from torchvision import datasets
    except Exception:  # noqa: BLE001 - torchvision missing or broken: fall back to the IDX reader
        return None
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except RuntimeError:
        return None
    return tr.data.unsqueeze(1), tr.targets, te.data.unsqueeze(1), te.targets


def synthetic(n: int = 2000, seed: int = 0, shape: tuple[int, int, int] = (1, 28, 28)) -> tuple[Tensor, Tensor]:
    """Deterministic plumbing data: 10 smooth blob prototypes plus noise, in [0,1], with labels."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    centres = torch.rand(10, 2, 2, generator=g) * 1.2 - 0.6
    protos = torch.zeros(10, h, w)
    for k in range(10):
        for cy, cx in centres[k]:
            protos[k] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.08)
    labels = torch.randint(0, 10, (n,), generator=g)
    x = protos[labels] + 0.1 * torch.randn(n, h, w, generator=g)
    return x.clamp(0, 1).unsqueeze(1).expand(n, c, h, w).contiguous(), labels


def load_splits(
    dataset: str = "mnist",
    data_root: str | os.PathLike | None = None,
    *,
    binarize: bool = False,
    download: bool = False,
    train_limit: int | None = None,
    val_limit: int | None = None,
) -> Splits:
    """Load train/validation splits of ``dataset`` (``mnist``, ``fashion-mnist`` or ``synthetic``)."""
    if dataset == "synthetic":
        x, y = synthetic(2400)
        tx, ty, vx, vy, note = x[:2000], y[:2000], x[2000:], y[2000:], "synthetic: 2,000 train / 400 val"
    elif dataset in _FOLDERS:
        tx, ty, vx, vy, note = _load_real(dataset, data_root, download)
    else:
        raise UsageError(f"dataset must be one of mnist, fashion-mnist, synthetic; got {dataset!r}")
    if tx.dtype == torch.uint8:
        tx, vx = tx.float() / 255.0, vx.float() / 255.0
    if binarize:
        tx, vx = (tx > 0.5).float(), (vx > 0.5).float()
    for name, lim in (("train_limit", train_limit), ("val_limit", val_limit)):
        if lim is not None and lim < 1:
            raise UsageError(f"{name} must be a positive integer, got {lim}")
    if train_limit:
        tx, ty = tx[:train_limit], ty[:train_limit]
    if val_limit:
        vx, vy = vx[:val_limit], vy[:val_limit]
    return Splits(tx.contiguous(), ty, vx.contiguous(), vy, note)


def _load_real(dataset: str, data_root: str | os.PathLike | None, download: bool) -> tuple:
    root = resolve_data_root(data_root)
    folder = _FOLDERS[dataset]
    if root is None:
        raise DataError(
            f"no data root for {dataset}: pass --data-root DIR or set {DATA_ENV}=DIR "
            f"(DIR/{folder}/raw/*-ubyte[.gz]); add --download to fetch it with torchvision"
        )
    if download:
        root.mkdir(parents=True, exist_ok=True)
    tv = _via_torchvision(dataset, root, download)
    if tv is not None:
        return (*tv, f"{dataset}: torchvision train (60,000) / test as validation")
    raw = root / folder / "raw"
    train, test = _load_split(raw, "train"), _load_split(raw, "t10k")
    if test is None and train is None:
        raise DataError(
            f"{dataset} not found: looked for {raw}/t10k-images-idx3-ubyte[.gz] and "
            f"train-images-idx3-ubyte[.gz]; pass --download (needs internet) or point "
            f"--data-root/{DATA_ENV} at a torchvision-style root"
        )
    if train is not None and test is not None:
        return (*train, *test, f"{dataset}: train split ({len(train[0]):,}) / t10k as validation")
    x, y = test if test is not None else train
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    cut = min(_T10K_TRAIN, int(len(x) * 0.9))
    which = "t10k" if test is not None else "train"
    note = (
        f"{dataset}: only the {which} split ({len(x):,} images) is present; split it "
        f"deterministically into {cut:,} train / {len(x) - cut:,} validation"
    )
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]], note


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Index batches over n items, shuffled by ``generator`` (sequential when None)."""
    idx = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(idx.split(batch_size))

"""Datasets as in-memory tensors [N,C,H,W] with integer labels, split into train and validation.

``load_splits(name, ...)`` is the one entry point. The MNIST family is read here from a
torchvision-style root (``ROOT/MNIST/raw/*-idx?-ubyte[.gz]``): through torchvision when the files
it expects are there (or with ``download=True``), else with a small IDX reader. ``folder``,
``cifar10``, ``celeba`` and ``digits`` come from :mod:`vae_deploy.datasets`. A dataset without its
own validation split (a folder, digits, MNIST's t10k file alone) is split by :func:`split_indices`:
one fixed permutation, the first 90% train and the rest validation, and ``Splits.note`` says so.

Images are float32 in [0, 1] by default; ``as_float=False`` keeps them as stored (uint8 0..255 for
real images) at a quarter of the memory, and :func:`to_unit_float` converts each batch.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from vae_deploy.config import DATASETS
from vae_deploy.datasets import DATA_ENV, load_image_data, resolve_data_root
from vae_deploy.datasets import NAMES as IMAGE_DATASETS
from vae_deploy.errors import DataError, UsageError
from vae_deploy.resources import gib, require_memory

_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CLASSES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion-mnist": ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"),
}
_T10K_TRAIN = 9000  # t10k-only fallback: first 9,000 (after a fixed shuffle) train, rest validate
_SPLIT_SEED = 20240521


@dataclass(frozen=True)
class Splits:
    """Train/validation images [N,C,H,W] and labels [N] int64; images float32 in [0,1] (or as stored,
    uint8, with ``load_splits(..., as_float=False)``). ``classes`` names the labels where known."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    note: str
    classes: tuple[str, ...] = ()


def to_unit_float(x: Tensor) -> Tensor:
    """A batch as float32 in [0, 1]: uint8 images are divided by 255, float ones returned as they are."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def split_indices(n: int, cut: int | None = None) -> tuple[Tensor, Tensor]:
    """The deterministic split of n images: one fixed permutation (seed ``_SPLIT_SEED``), its first
    ``cut`` (default 90%, rounded down) indices train, the rest validation. A folder of MNIST's
    t10k images, named in their file order, splits exactly as the built-in t10k fallback."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    cut = n * 9 // 10 if cut is None else cut
    return perm[:cut], perm[cut:]


IDX_MAX_DIMS = 4  # MNIST-style files have 1 (labels) or 3 (images)
IDX_MAX_BYTES = 1 << 34  # 16 GiB: far above any dataset read here; a larger header is corrupt
_READ_BLOCK = 1 << 20


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally .gz) into a numpy array, checking its header.

    The header is checked before the body is read, and the body is read in blocks up to the size
    the header promises, so a corrupt header or a decompression bomb costs no more memory than the
    data really there (and never more than the header promises).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            dims = _idx_header(f, path)
            count = math.prod(dims)
            if count > IDX_MAX_BYTES:
                raise DataError(
                    f"{path}: its IDX header promises {dims} = {gib(count)} of data, more than the "
                    f"{gib(IDX_MAX_BYTES)} any dataset read here has; the file is corrupt"
                )
            if path.suffix != ".gz":
                body = os.fstat(f.fileno()).st_size - 4 - 4 * len(dims)
                if body != count:
                    raise DataError(_size_mismatch(path, dims, body))
            require_memory(count, f"reading {path}", "the file is too large for this machine")
            raw = bytearray()
            while len(raw) <= count:
                block = f.read(min(_READ_BLOCK, count + 1 - len(raw)))
                if not block:
                    break
                raw += block
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) != count:
        raise DataError(_size_mismatch(path, dims, len(raw), exact=len(raw) <= count))
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def _idx_header(f: BinaryIO, path: Path) -> tuple[int, ...]:
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = magic[3]
    if not 1 <= ndim <= IDX_MAX_DIMS:
        raise DataError(
            f"{path}: IDX header says {ndim} dimensions, expected 1 to {IDX_MAX_DIMS} (1 for labels, 3 for images)"
        )
    sizes = f.read(4 * ndim)
    if len(sizes) != 4 * ndim:
        raise DataError(f"{path} is truncated: it ends inside its IDX header")
    return struct.unpack(f">{ndim}I", sizes)


def _size_mismatch(path: Path, dims: tuple[int, ...], got: int, exact: bool = True) -> str:
    want = math.prod(dims)
    what, has = ("truncated", f"{got:,}") if got < want else ("padded", f"{got:,}" if exact else "more")
    return f"{path} is {what}: its header says {dims} = {want:,} bytes of data, the file has {has}"


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
        raise DataError(
            f"{images} and {labels} do not form an image/label pair: expected [N, H, W] images and "
            f"[N] labels, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
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
    except RuntimeError:  # not there (or the download failed)
        return None
    except Exception:  # noqa: BLE001 - e.g. a corrupt file: our reader says precisely what is wrong
        if download:
            raise
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
    image_shape: tuple[int, int, int] | None = None,
    as_float: bool = True,
) -> Splits:
    """Load train/validation splits of ``dataset`` (one of ``config.DATASETS``).

    ``image_shape`` (C, H, W) shapes the ``synthetic`` images (default 1x28x28) and the images of
    ``folder`` and ``celeba`` (decoded to it); the other datasets have their own shape. An empty
    split is a DataError. ``as_float=False`` returns the images as stored (uint8 for real data).
    """
    for name, lim in (("train_limit", train_limit), ("val_limit", val_limit)):
        if lim is not None and lim < 1:
            raise UsageError(f"{name} must be a positive integer, got {lim}")
    classes: tuple[str, ...] = ()
    if dataset == "synthetic":
        shape = tuple(image_shape) if image_shape is not None else (1, 28, 28)
        require_memory(3 * 2400 * 4 * math.prod(shape), f"synthetic data of shape {shape}", "use smaller images")
        x, y = synthetic(2400, shape=shape)  # type: ignore[arg-type]
        tx, ty, vx, vy, note = x[:2000], y[:2000], x[2000:], y[2000:], "synthetic: 2,000 train / 400 val"
    elif dataset in _FOLDERS:
        tx, ty, vx, vy, note = _load_real(dataset, data_root, download)
        classes = _CLASSES[dataset]
    elif dataset in IMAGE_DATASETS:
        tx, ty, vx, vy, note, classes = _load_images(
            dataset, data_root, image_shape, download, train_limit, val_limit, as_float
        )
    else:
        raise UsageError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    for split, images in (("training", tx), ("validation", vx)):
        if len(images) == 0:
            raise DataError(f"{dataset}'s {split} split is empty ({note}): expected at least one image")
    if train_limit:
        tx, ty = tx[:train_limit], ty[:train_limit]
    if val_limit:
        vx, vy = vx[:val_limit], vy[:val_limit]
    if binarize:
        tx, vx = (_binarize(t) for t in (tx, vx))
    if as_float:
        tx, vx = to_unit_float(tx), to_unit_float(vx)
    return Splits(tx.contiguous(), ty, vx.contiguous(), vy, note, classes)


def _binarize(x: Tensor) -> Tensor:
    """Pixels above 0.5 become 1, the rest 0 (255 and 0 for uint8 images: v/255 > 0.5 iff v >= 128)."""
    if x.dtype == torch.uint8:
        return (x >= 128).to(torch.uint8).mul_(255)
    return (x > 0.5).float()


def _load_images(
    dataset: str,
    data_root: str | os.PathLike | None,
    image_shape: tuple[int, int, int] | None,
    download: bool,
    train_limit: int | None,
    val_limit: int | None,
    as_float: bool,
) -> tuple:
    """A dataset of :mod:`vae_deploy.datasets`, split, limited and copied out of its (memory-mapped)
    store: only the rows kept are read."""
    root = Path(data_root).expanduser() if data_root else (None if dataset == "folder" else resolve_data_root(None))
    if download and root is not None and dataset in ("cifar10", "celeba"):  # a folder of images is never made
        root.mkdir(parents=True, exist_ok=True)
    shape = tuple(image_shape) if image_shape is not None else None
    d = load_image_data(dataset, root, shape, download)  # type: ignore[arg-type]
    n, note = len(d.x), d.note
    if d.val_from is None:
        if n < 2:
            raise DataError(f"{note}: expected at least 2 images (one for validation)")
        tr, va = split_indices(n)
        note += f"; split deterministically (fixed seed): {len(tr):,} train / {len(va):,} validation"
    else:
        tr, va = torch.arange(d.val_from), torch.arange(d.val_from, n)
    tr, va = tr[:train_limit], va[:val_limit]
    row = math.prod(d.x.shape[1:])
    per_image = row * (5 if as_float else 1)  # the uint8 rows, and their float32 copies
    what = f"loading {dataset} ({len(tr) + len(va):,} images of {list(d.x.shape[1:])})"
    require_memory((len(tr) + len(va)) * per_image, what, "use --train-limit or smaller images")
    take = [np.ascontiguousarray(d.x[idx.numpy()]) for idx in (tr, va)]
    labels = [torch.from_numpy(d.y[idx.numpy()].astype(np.int64)) for idx in (tr, va)]
    return torch.from_numpy(take[0]), labels[0], torch.from_numpy(take[1]), labels[1], note, d.classes


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
    cut = min(_T10K_TRAIN, int(len(x) * 0.9))
    tr, va = split_indices(len(x), cut)
    which = "t10k" if test is not None else "train"
    note = (
        f"{dataset}: only the {which} split ({len(x):,} images) is present; split it "
        f"deterministically into {cut:,} train / {len(x) - cut:,} validation"
    )
    return x[tr], y[tr], x[va], y[va], note

"""Image datasets beyond the MNIST family, as stored uint8 arrays: ``folder``, ``cifar10``,
``celeba`` and ``digits``. Torch-free (numpy and pillow; scikit-learn for digits).

- ``folder``: every image under ``--data-root DIR`` (see :mod:`vae_deploy.image_folder`), at the
  model's image shape.
- ``cifar10``: torchvision's layout under the data root: ``cifar-10-batches-bin`` (the binary
  version) or ``cifar-10-batches-py`` (the python version, whose pickles are read by
  :mod:`vae_deploy.inert_pickle`: never unpickled). 50,000 train / the 10,000 test images as
  validation. ``download=True`` fetches the python version (torchvision's URL and checksum).
- ``celeba``: torchvision's layout (``celeba/img_align_celeba/*.jpg``, and
  ``celeba/list_eval_partition.txt`` for its train/validation split), decoded at the model's image
  shape through the same cache as folders.
- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (it ships inside the package).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy.errors import DataError, first_line, printable
from vae_deploy.image_folder import FileList, decode_listing, list_images, load_folder
from vae_deploy.inert_pickle import Built, Call, Global, InertPickleError, read_inert
from vae_deploy.resources import require_memory

NAMES = ("folder", "cifar10", "celeba", "digits")
DATA_ENV = "VAE_DEPLOY_DATA"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_RECORD = 3 * 32 * 32
_CIFAR_FILE_LIMIT = 256 << 20  # a real batch is ~31 MB


@dataclass(frozen=True)
class ImageData:
    """A dataset as stored: uint8 images [N, C, H, W], int64 labels [N], label names, a note, and
    its own validation split where it has one (rows ``val_from:``; None: the caller splits)."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    note: str
    val_from: int | None = None
    files: tuple[str, ...] = ()  # where each image came from (folder and celeba)
    skipped: int = 0  # unreadable files left out


def resolve_data_root(data_root: str | os.PathLike | None) -> Path | None:
    """``data_root`` if given, else ``$VAE_DEPLOY_DATA``, else None."""
    root = data_root if data_root else os.environ.get(DATA_ENV)
    return Path(root).expanduser() if root else None


def load_image_data(
    name: str, root: Path | None, image_shape: tuple[int, int, int] | None, download: bool = False
) -> ImageData:
    """Load dataset ``name`` (one of :data:`NAMES`); ``image_shape`` sizes ``folder`` and ``celeba``."""
    if name == "digits":
        return _digits()
    if name in ("folder", "celeba") and image_shape is None:
        raise DataError(f"{name} images are resized to the model's image shape: pass one (--image-shape C,H,W)")
    if root is None:
        what = "the folder of images" if name == "folder" else f"a torchvision-style root holding {name}"
        raise DataError(f"no data root for {name}: pass --data-root DIR ({what})")
    if name == "folder":
        return _folder(root, image_shape)
    if name == "cifar10":
        return _cifar10(root, download)
    if name == "celeba":
        return _celeba(root, image_shape, download)
    raise DataError(f"unknown dataset {name!r}; expected one of {NAMES}")


# --- folder -------------------------------------------------------------------------------------


def _folder(root: Path, shape: tuple[int, int, int]) -> ImageData:
    d = load_folder(root, shape)
    labels = f"{len(d.classes)} classes from subfolder names" if d.classes else "no labels (no subfolders)"
    c, h, w = shape
    note = f"folder {printable(str(root))}: {d.describe()}, {labels}, at {c}x{h}x{w} (scaled to cover, center-cropped)"
    return ImageData(d.images, d.labels, d.classes, note, files=d.files, skipped=d.skipped)


# --- digits -------------------------------------------------------------------------------------


def _digits() -> ImageData:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    d = load_digits()
    x = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    note = f"digits: scikit-learn's {len(x):,} 8x8 handwritten digits (values 0..16 scaled to 0..255)"
    return ImageData(x, np.asarray(d.target, dtype=np.int64), tuple(str(i) for i in range(10)), note)


# --- CIFAR-10 -----------------------------------------------------------------------------------


def _cifar10(root: Path, download: bool) -> ImageData:
    binary, python = root / "cifar-10-batches-bin", root / "cifar-10-batches-py"
    if download and not (binary / "test_batch.bin").is_file() and not (python / "test_batch").is_file():
        _download_cifar10(root)
    require_memory(60_000 * (_CIFAR_RECORD + 8), "loading CIFAR-10", "free some memory")
    if (binary / "test_batch.bin").is_file():
        read, folder, suffix, how = _cifar_binary, binary, ".bin", "binary version"
    elif (python / "test_batch").is_file():
        read, folder, suffix, how = _cifar_python, python, "", "python version, read without unpickling"
    else:
        raise DataError(
            f"cifar10 not found: looked for {printable(str(binary))}/*.bin and {printable(str(python))}/*; "
            "pass --download (needs internet) or point --data-root at the folder holding them"
        )
    parts = [read(folder / f"{name}{suffix}") for name in [*_CIFAR_BATCHES, "test_batch"]]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    n_val = len(parts[-1][0])
    note = f"cifar10 ({how}): {len(x) - n_val:,} train / the {n_val:,} test images as validation"
    return ImageData(x.reshape(-1, 3, 32, 32), y, CIFAR10_CLASSES, note, val_from=len(x) - n_val)


def _read_limited(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > _CIFAR_FILE_LIMIT:
            raise DataError(f"{printable(str(path))} is {size:,} bytes; a CIFAR-10 batch is about 31 MB")
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {printable(str(path))}: {exc.strerror or exc}") from None


def _cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the binary version: records of 1 label byte + 3,072 pixel bytes."""
    raw = np.frombuffer(_read_limited(path), dtype=np.uint8)
    if raw.size == 0 or raw.size % (_CIFAR_RECORD + 1):
        raise DataError(f"{printable(str(path))} is not a CIFAR-10 binary batch ({raw.size:,} bytes is not N x 3,073)")
    records = raw.reshape(-1, _CIFAR_RECORD + 1)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{printable(str(path))} has labels above 9: not a CIFAR-10 binary batch")
    return records[:, 1:].copy(), labels


def _cifar_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the python version: a pickled dict {b"data": uint8 array [N, 3072], b"labels": [N]}."""
    bad = f"{printable(str(path))} is not a CIFAR-10 python batch"
    try:
        batch = read_inert(_read_limited(path))
    except InertPickleError as exc:
        raise DataError(f"{bad} ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{bad} (expected a dict)")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    labels, data = batch.get("labels"), batch.get("data")
    if not isinstance(labels, list) or not all(type(v) is int and 0 <= v <= 9 for v in labels):
        raise DataError(f"{bad} (its labels are not a list of integers 0..9)")
    pixels = _uint8_array(data, (len(labels), _CIFAR_RECORD))
    if pixels is None:
        raise DataError(f"{bad} (its data is not a uint8 array of {len(labels):,} x {_CIFAR_RECORD:,})")
    return pixels, np.asarray(labels, dtype=np.int64)


def _uint8_array(node: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """The pixels of an inert numpy-array record (``_reconstruct`` + BUILD with a C-order uint8
    state), or None if ``node`` is anything else."""
    if not isinstance(node, Built) or not isinstance(node.obj, Call):
        return None
    func = node.obj.func
    if not (isinstance(func, Global) and func.module.startswith("numpy") and func.name == "_reconstruct"):
        return None
    state = node.state
    if not (isinstance(state, tuple) and len(state) == 5 and tuple(state[1]) == shape and state[3] is False):
        return None
    dtype, raw = state[2], state[4]
    spec = dtype.obj.args if isinstance(dtype, Built) and isinstance(dtype.obj, Call) else None
    if not (isinstance(spec, tuple) and spec and spec[0] in ("u1", b"u1")):
        return None
    if not isinstance(raw, bytes) or len(raw) != shape[0] * shape[1]:
        return None
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()


def _download_cifar10(root: Path) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    try:  # the archive only (checked against torchvision's md5): torchvision's loader would unpickle
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise DataError(f"downloading CIFAR-10 failed: {first_line(exc, 200)}") from None


# --- CelebA -------------------------------------------------------------------------------------


def _celeba(root: Path, shape: tuple[int, int, int], download: bool) -> ImageData:
    base = root / "celeba"
    images = base / "img_align_celeba"
    if download and not images.is_dir():
        _download_celeba(root)
    if not images.is_dir():
        raise DataError(
            f"celeba not found: looked for {printable(str(images))} (torchvision's layout); pass "
            "--download (needs internet) or point --data-root at the folder holding celeba/"
        )
    c, h, w = shape
    partition = base / "list_eval_partition.txt"
    if not partition.is_file():
        d = decode_listing(list_images(images), shape, tag="celeba")
        note = f"celeba {printable(str(images))} (no list_eval_partition.txt): {d.describe()} at {c}x{h}x{w}"
        return ImageData(d.images, d.labels, (), note, files=d.files, skipped=d.skipped)
    train, val = _partition(partition)
    listing = _listing(images, train + val)
    d = decode_listing(listing, shape, tag="celeba")
    if len(d.images) == 0:
        raise DataError(f"none of the celeba images under {printable(str(images))} could be read")
    val_from = int(np.searchsorted(d.kept, len(train)))
    note = (
        f"celeba {printable(str(images))}: {d.describe()} at {c}x{h}x{w} (scaled to cover, center-cropped); "
        f"list_eval_partition.txt's train ({val_from:,}) / validation ({len(d.images) - val_from:,})"
    )
    return ImageData(d.images, d.labels, (), note, val_from=val_from, files=d.files, skipped=d.skipped)


def _partition(path: Path) -> tuple[list[str], list[str]]:
    """File names of the train (0) and validation (1) partitions; test (2) is left out."""
    train, val = [], []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {printable(str(path))}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2") or "/" in parts[0] or parts[0].startswith("."):
            raise DataError(f"{printable(str(path))}:{n} is not 'NAME.jpg 0|1|2': {printable(line[:80])!r}")
        (train if parts[1] == "0" else val if parts[1] == "1" else []).append(parts[0])
    if not train or not val:
        raise DataError(f"{printable(str(path))} lists no train (0) or no validation (1) images")
    return train, val


def _listing(folder: Path, names: list[str]) -> FileList:
    stats = []
    for name in names:
        try:
            st = os.stat(folder / name)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:  # listed but absent: skipped (and counted) when decoded
            stats.append((-1, -1))
    return FileList(folder, tuple(names), np.zeros(len(names), np.int64), (), tuple(stats))


def _download_celeba(root: Path) -> None:
    from torchvision.datasets import CelebA

    try:  # torchvision fetches and checks the files (Google Drive; often over its quota)
        CelebA(str(root), split="all", target_type=[], download=True)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"downloading CelebA failed: {first_line(exc, 200)}") from None


__all__ = ["CIFAR10_CLASSES", "DATA_ENV", "NAMES", "ImageData", "load_image_data", "resolve_data_root"]

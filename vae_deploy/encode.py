"""Bulk-encode a dataset to posterior means and log-variances: ``vae-deploy encode`` as a library call.

``encode_dataset(MODEL, OUT, dataset="folder", data_root=DIR)`` runs every image of DIR (or of a
split of any dataset) through the encoder in batches and writes

- ``OUT.npz``: ``mu`` and ``logvar`` [N, *latent], ``labels`` [N], ``classes`` (label names),
  and ``files`` [N] (paths relative to DIR, for folder and celeba) or ``index`` [N] (row in the
  dataset's split); or
- ``OUT.npy``: the means alone [N, *latent] (``logvar_out=...npy`` writes the log-variances too).

Rows follow the file order (names sorted by their bytes); unreadable files are skipped and counted.
Memory stays bounded whatever N: folder images are read from the decoded-image cache (memory-mapped)
one batch at a time, latents go to anonymous temporary files, and each output is written atomically
at the end (never half-written). MODEL is an export folder (onnxruntime, torch-free for folders of
images) or a checkpoint / run folder (eager torch, CPU).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vae_deploy.errors import DataError, UsageError, printable
from vae_deploy.files import atomic_write
from vae_deploy.resources import require_memory

SPLITS = ("all", "train", "val")
SUFFIXES = (".npz", ".npy")


@dataclass
class EncodeResult:
    """What ``encode_dataset`` wrote, for the CLI's report."""

    path: Path
    logvar_path: Path | None
    count: int
    latent_shape: tuple[int, ...]
    skipped: int
    seconds: float
    note: str

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Encoder:
    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]  # float32 [n,C,H,W] in [0,1]
    image_shape: tuple[int, int, int]
    trained: dict[str, Any]  # dataset, data_root, binarize where known


@dataclass(frozen=True)
class _Rows:
    images: Any  # uint8 (or float) [M, C, H, W], indexable by a slice or an index array
    order: np.ndarray | None  # rows of ``images`` to encode, in order (None: all of them)
    labels: np.ndarray  # [N] for the rows encoded
    classes: tuple[str, ...]
    names: tuple[str, ...] | None  # [N] file names, or None (then ``index`` is written)
    index: np.ndarray  # [N]
    skipped: int
    note: str

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, start: int, stop: int) -> np.ndarray:
        take = self.images[start:stop] if self.order is None else self.images[self.order[start:stop]]
        x = np.asarray(take)
        return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _check_out(out: str | os.PathLike, logvar_out: str | os.PathLike | None) -> tuple[Path, Path | None]:
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--out must end in .npz (means, logvars, labels, files) or .npy (means), got {out.name!r}")
    if out.is_dir():
        raise UsageError(f"--out {printable(str(out))} is a folder; expected a file name ending in .npz or .npy")
    if logvar_out is None:
        return out, None
    logvar_out = Path(logvar_out)
    if out.suffix.lower() != ".npy" or logvar_out.suffix.lower() != ".npy":
        raise UsageError("--logvar-out goes with --out X.npy and must end in .npy (a .npz holds the logvars already)")
    if logvar_out.resolve() == out.resolve() or logvar_out.is_dir():
        raise UsageError("--logvar-out must name a .npy file other than --out")
    return out, logvar_out


def _encoder(model: str | os.PathLike, provider: str) -> _Encoder:
    """The encoder of an export folder (on onnxruntime) or of a checkpoint / run folder (torch)."""
    path = Path(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        from vae_deploy.runtime import VAERuntime

        rt = VAERuntime(path, provider=provider)
        shape = tuple(rt.image_shape)
        if len(shape) != 3 or not all(isinstance(s, int) for s in shape):
            raise UsageError(f"{printable(str(path))} takes images of any size {list(shape)}: encode needs a fixed one")
        lo, hi = (float(v) for v in rt.value_range)  # our images are in [0, 1]: map them to the model's range
        scale = (lambda x: x) if (lo, hi) == (0.0, 1.0) else (lambda x: (lo + (hi - lo) * x).astype(np.float32))
        trained = (rt.manifest.raw.get("training") or {}) if rt.manifest is not None else {}
        return _Encoder(lambda x: rt.encode(scale(x)), shape, dict(trained))  # type: ignore[arg-type]
    if path.is_dir():
        if not (path / "checkpoint.pt").is_file():
            raise UsageError(f"{printable(str(path))} is neither an export folder nor a run folder")
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"no such model: {printable(str(path))} (an export folder, a run folder or a checkpoint)")
    import torch

    from vae_deploy.checkpoint import model_from_state, read_checkpoint

    state = read_checkpoint(path)
    vae = model_from_state(state, str(path))

    @torch.no_grad()
    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, logvar = vae.encoder(torch.from_numpy(x))
        return mu.numpy(), logvar.numpy()

    return _Encoder(encode, tuple(vae.config.image_shape), dict(state.get("train_config") or {}))


def _rows(enc: _Encoder, dataset: str, data_root: Any, split: str) -> _Rows:
    """The images to encode, without reading more than their index up front."""
    shape = enc.image_shape
    if dataset in ("folder", "celeba"):
        from vae_deploy.datasets import load_image_data, resolve_data_root

        root = Path(data_root) if data_root else (resolve_data_root(None) if dataset == "celeba" else None)
        d = load_image_data(dataset, root, shape)
        n = len(d.x)
        order = None if split == "all" else _split_rows(n, d.val_from, split)
        idx = np.arange(n) if order is None else order
        names = tuple(d.files[i] for i in idx.tolist()) if d.files else None
        return _Rows(d.x, order, d.y[idx], d.classes, names, idx, d.skipped, d.note)
    from vae_deploy.data import load_splits

    s = load_splits(dataset, data_root, image_shape=shape, as_float=False)
    parts = {"train": [(s.train_x, s.train_y)], "val": [(s.val_x, s.val_y)]}
    chosen = parts["train"] + parts["val"] if split == "all" else parts[split]
    x = np.concatenate([p[0].numpy() for p in chosen]) if len(chosen) > 1 else chosen[0][0].numpy()
    y = np.concatenate([p[1].numpy() for p in chosen])
    return _Rows(x, None, y, s.classes, None, np.arange(len(y)), 0, s.note)


def _split_rows(n: int, val_from: int | None, split: str) -> np.ndarray:
    """Rows of one split in file order: the dataset's own split, else the deterministic rule."""
    if val_from is not None:
        return np.arange(val_from) if split == "train" else np.arange(val_from, n)
    from vae_deploy.data import split_indices

    train, val = split_indices(n)
    return np.sort((train if split == "train" else val).numpy())


def encode_dataset(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    split: str = "all",
    batch_size: int = 256,
    provider: str = "auto",
    logvar_out: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> EncodeResult:
    """Encode every image of ``dataset`` (default: the model's, else ``folder``) into ``out``.

    ``split`` is ``all`` (train then validation for datasets split in memory; every file, in order,
    for folders), ``train`` or ``val``. ``progress(k)`` is called after each batch of k images.
    """
    from vae_deploy.config import DATASETS

    out, logvar_out = _check_out(out, logvar_out)
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    enc = _encoder(model, provider)
    name = dataset or enc.trained.get("dataset") or "folder"
    if name not in DATASETS:
        raise UsageError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    if data_root is None and name == enc.trained.get("dataset"):
        data_root = enc.trained.get("data_root")
    require_memory(
        batch_size * int(np.prod(enc.image_shape)) * 4 * 4,
        f"encoding batches of {batch_size}",
        "use a smaller --batch-size",
    )
    rows = _rows(enc, name, data_root, split)
    if len(rows) == 0:
        raise DataError(f"{name}'s {split} split has no images to encode")
    start = time.perf_counter()
    with tempfile.TemporaryFile() as mu_file, tempfile.TemporaryFile() as lv_file:
        latent: tuple[int, ...] = ()
        has_logvar = True
        for s in range(0, len(rows), batch_size):
            x = rows.batch(s, s + batch_size)
            if enc.trained.get("binarize"):
                x = (x > 0.5).astype(np.float32)
            mu, logvar = enc.encode(x)
            latent, has_logvar = tuple(mu.shape[1:]), logvar is not None
            mu_file.write(np.ascontiguousarray(mu, dtype="<f4").tobytes())
            if logvar is not None:
                lv_file.write(np.ascontiguousarray(logvar, dtype="<f4").tobytes())
            if progress is not None:
                progress(len(x))
        seconds = time.perf_counter() - start
        arrays = {"mu": (mu_file, latent)} | ({"logvar": (lv_file, latent)} if has_logvar else {})
        if out.suffix.lower() == ".npz":
            extra = {"labels": rows.labels.astype(np.int64), "classes": np.array(rows.classes, dtype=str)}
            extra |= {"files": np.array(rows.names, dtype=str)} if rows.names is not None else {"index": rows.index}
            atomic_write(out, lambda f: _write_npz(f, len(rows), arrays, extra))
        else:
            if logvar_out is not None and has_logvar:
                atomic_write(logvar_out, lambda f: _write_npy(f, len(rows), *arrays["logvar"]))
            atomic_write(out, lambda f: _write_npy(f, len(rows), *arrays["mu"]))
    written_logvar = logvar_out if out.suffix.lower() == ".npy" and has_logvar else None
    return EncodeResult(out, written_logvar, len(rows), latent, rows.skipped, seconds, rows.note)


def _write_npy(f: BinaryIO, n: int, src: BinaryIO, latent: tuple[int, ...]) -> None:
    """A float32 [n, *latent] .npy whose data is copied from ``src`` (written there row by row)."""
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, *latent)})
    src.seek(0)
    shutil.copyfileobj(src, f, 1 << 20)


def _write_npz(
    f: BinaryIO, n: int, arrays: dict[str, tuple[BinaryIO, tuple[int, ...]]], extra: dict[str, np.ndarray]
) -> None:
    """An uncompressed .npz (what ``np.savez`` writes), streamed member by member."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (src, latent) in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                _write_npy(member, n, src, latent)  # type: ignore[arg-type]
        for key, value in extra.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value, allow_pickle=False)


__all__ = ["SPLITS", "EncodeResult", "encode_dataset"]

"""Image files -> one uint8 array [N, C, H, W], decoded once and cached outside the user's folder.

``load_folder(DIR, (C, H, W))`` takes every image file under DIR (png, jpg/jpeg, webp, bmp; hidden
files and folders skipped), labelled by its first-level subfolder (torchvision's ``ImageFolder``
convention; files directly in DIR need no label). Each file is decoded with pillow, turned upright
(EXIF orientation), flattened onto white where it is transparent, converted to C channels (1: gray,
3: RGB; 16-bit gray is scaled to 8 bits), and scaled to cover H x W then center-cropped (Lanczos).
Files pillow cannot read are skipped and counted.

The decoded array is written once into the cache (``$VAE_DEPLOY_CACHE``, else
``$XDG_CACHE_HOME/vae-deploy``, else ``~/.cache/vae-deploy``), one file per (folder, shape),
atomically, and read back memory-mapped: epochs never decode a file again. The cache entry records a
fingerprint of the file list (paths, sizes, modification times) and of the decoding rule; any change
to the folder decodes it again. Decoding streams in bounded chunks on a thread pool (pillow
releases the GIL while it decodes and resizes). numpy + pillow only (torch-free).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vae_deploy.errors import DataError, first_line, printable
from vae_deploy.files import atomic_write, sweep_temp_files
from vae_deploy.resources import gib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_ENV = "VAE_DEPLOY_CACHE"
DECODE_RULE = "v1: exif-upright, alpha over white, 16-bit>>8, cover + center-crop, Lanczos"
CHUNK_BYTES = 64 << 20  # decoded images held at once while the cache is written
MAX_CHUNK = 1024
_MAGIC = b"VAEDIMG1"
_HEADER_LIMIT = 64 << 20


@dataclass(frozen=True)
class FileList:
    """The image files of a folder (relative paths, in byte order of their names) and their labels."""

    root: Path
    files: tuple[str, ...]
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]  # label -> first-level subfolder name; () when DIR has no subfolders
    stats: tuple[tuple[int, int], ...]  # (size, mtime_ns) per file: the cache's fingerprint
    ignored: int = 0  # files that are not images by their suffix


@dataclass(frozen=True)
class DecodedImages:
    """Decoded images [N, C, H, W] uint8 (memory-mapped from the cache) with labels and provenance."""

    images: np.ndarray
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]
    files: tuple[str, ...]  # relative path of each image
    kept: np.ndarray  # int64 [N]: index of each image in the file list it was decoded from
    total: int  # files tried
    skipped: int  # unreadable files (not in ``images``)
    skipped_example: str  # "name: reason" of the first one, or ""
    cache: Path
    fresh: bool  # decoded by this call (else read from the cache)

    def describe(self) -> str:
        """One line: how many images, and what was skipped."""
        text = f"{len(self.images):,} images"
        if self.skipped:
            files = "file" if self.skipped == 1 else "files"
            text += f"; {self.skipped:,} unreadable {files} skipped (e.g. {self.skipped_example})"
        return text


# --- listing ------------------------------------------------------------------------------------


def _name_key(rel: str) -> bytes:
    return os.fsencode(rel)


def list_images(root: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> FileList:
    """Every image file under ``root`` (symlinks followed, each folder once), sorted by name bytes."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"no such folder: {printable(str(root))} (expected a folder of images)")
    if not root.is_dir():
        raise DataError(f"{printable(str(root))} is a file; expected a folder of images (--data-root DIR)")
    found: list[tuple[bytes, str, int, int]] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(folder, d))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:  # a symlink loop or a second link to a folder
                seen.add((st.st_dev, st.st_ino))
                keep.append(d)
        dirs[:] = keep
        for name in names:
            if name.startswith("."):
                continue
            if not name.lower().endswith(tuple(suffixes)):
                ignored += 1
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: counted as unreadable when decoded
                st = None
            rel = os.path.relpath(path, root)
            found.append((_name_key(rel), rel, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    if not found:
        other = f"; it holds {ignored:,} other file{'s' * (ignored != 1)}" if ignored else ""
        raise DataError(
            f"{printable(str(root))} holds no image files ({', '.join(suffixes)}, in it or its subfolders){other}"
        )
    found.sort()
    firsts = [rel.split(os.sep)[0] if os.sep in rel else None for _, rel, _, _ in found]
    named = sorted({f for f in firsts if f is not None}, key=_name_key)
    classes = tuple(([] if all(firsts) or not named else ["."]) + named)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(f if f is not None else ".", 0) for f in firsts], dtype=np.int64)
    return FileList(
        root,
        tuple(rel for _, rel, _, _ in found),
        labels,
        classes,
        tuple((size, mtime) for _, _, size, mtime in found),
        ignored,
    )


# --- decoding one file --------------------------------------------------------------------------


def decode_image(path: str | os.PathLike, shape: Sequence[int]) -> np.ndarray:
    """One image file as uint8 [C, H, W]: upright, C channels, covering H x W, center-cropped."""
    from PIL import Image, ImageOps

    c, h, w = shape
    with Image.open(path) as im:
        side = max(w, h)  # either orientation (EXIF may turn it): decode a JPEG at a scale >= the target
        im.draft("RGB" if c == 3 else "L", (side, side))
        im = ImageOps.exif_transpose(im)
        im = _to_channels(im, c)
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.LANCZOS, box=_cover_box(im.size, (w, h)), reducing_gap=3.0)
        pixels = np.asarray(im, dtype=np.uint8)
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def _to_channels(im: object, c: int) -> object:
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit gray: keep the top 8 bits of 16
        values = np.asarray(im, dtype=np.float64)
        scale = 1.0 if values.size == 0 or values.max() <= 255 else 257.0
        im = Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), "L")
    if "A" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("L" if c == 1 else "RGB")


def _cover_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centered crop of ``size`` with ``target``'s aspect ratio (what scaling to cover keeps)."""
    (iw, ih), (tw, th) = size, target
    if iw * th > ih * tw:  # wider than the target: crop the sides
        cw = ih * tw / th
        return ((iw - cw) / 2, 0.0, (iw + cw) / 2, float(ih))
    ch = iw * th / tw
    return (0.0, (ih - ch) / 2, float(iw), (ih + ch) / 2)


def _try_decode(path: str, shape: Sequence[int]) -> np.ndarray | str:
    try:
        return decode_image(path, shape)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, with its reason
        return first_line(exc, 120)


# --- the cache ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where decoded folders are cached: $VAE_DEPLOY_CACHE, else $XDG_CACHE_HOME/vae-deploy, else
    ~/.cache/vae-deploy (each entry is a file ``images-*.u8``; deleting any of them is safe)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vae-deploy"


def _fingerprint(listing: FileList, shape: Sequence[int], tag: str) -> str:
    h = hashlib.sha256(f"{DECODE_RULE}|{list(shape)}|{tag}|{len(listing.files)}".encode())
    for rel, (size, mtime), label in zip(listing.files, listing.stats, listing.labels.tolist()):
        h.update(_name_key(rel) + b"\0" + f"{size}:{mtime}:{label}\n".encode())
    h.update(json.dumps(listing.classes).encode())
    return h.hexdigest()


def _cache_path(root: Path, shape: Sequence[int], tag: str) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(root)) + f"|{list(shape)}|{tag}".encode()).hexdigest()
    return cache_dir() / f"images-{key[:32]}.u8"


def _read_cache(path: Path, fingerprint: str, shape: Sequence[int]) -> tuple[np.ndarray, ...] | None:
    """(images memmap, labels, kept, header) from a cache file with this fingerprint, else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 16))
            trailer = f.read(16)
            if len(trailer) != 16 or trailer[8:] != _MAGIC:
                return None
            n = int.from_bytes(trailer[:8], "little")
            if not 0 < n <= min(_HEADER_LIMIT, size - 16):
                return None
            f.seek(size - 16 - n)
            header = json.loads(f.read(n))
            count, row = int(header["count"]), int(np.prod(shape))
            if header.get("fingerprint") != fingerprint or list(header.get("shape", [])) != list(shape):
                return None
            if count * row + 16 * count + n + 16 != size:
                return None
            f.seek(count * row)
            tail = np.frombuffer(f.read(16 * count), dtype="<i8")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if count == 0:
        return np.zeros((0, *shape), np.uint8), tail[:0].astype(np.int64), tail[:0].astype(np.int64), header
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, *shape))
    return images, tail[:count].astype(np.int64), tail[count:].astype(np.int64), header


def _write_cache(path: Path, listing: FileList, shape: Sequence[int], fingerprint: str, workers: int) -> None:
    """Decode every file of ``listing`` into ``path`` (atomically): images, labels, kept indexes,
    then a JSON header and a trailer (its length and a magic number)."""
    from tqdm.auto import tqdm

    row = int(np.prod(shape))
    chunk = max(1, min(MAX_CHUNK, CHUNK_BYTES // row))
    paths = [str(listing.root / rel) for rel in listing.files]

    def write(f: BinaryIO) -> None:
        kept: list[int] = []
        failures: list[str] = []
        bar = tqdm(total=len(paths), desc="decoding images", unit="img", leave=False, disable=None)
        with ThreadPoolExecutor(max_workers=workers) as pool, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pillow's notes on odd files; unreadable ones are counted
            for start in range(0, len(paths), chunk):
                for i, out in enumerate(pool.map(_try_decode, paths[start : start + chunk], [shape] * chunk)):
                    if isinstance(out, str):
                        failures.append(f"{printable(listing.files[start + i])}: {out}")
                    else:
                        f.write(np.ascontiguousarray(out).tobytes())
                        kept.append(start + i)
                bar.update(min(chunk, len(paths) - start))
        bar.close()
        index = np.array(kept, dtype="<i8")
        f.write(listing.labels[index].astype("<i8").tobytes() if len(index) else b"")
        f.write(index.tobytes())
        header = {
            "format": "vae-deploy-decoded-images",
            "fingerprint": fingerprint,
            "shape": list(shape),
            "count": len(kept),
            "total": len(paths),
            "skipped": len(failures),
            "skipped_example": failures[0] if failures else "",
            "rule": DECODE_RULE,
        }
        raw = json.dumps(header).encode()
        f.write(raw + len(raw).to_bytes(8, "little") + _MAGIC)

    atomic_write(path, write)


def decode_listing(
    listing: FileList, shape: Sequence[int], *, tag: str = "folder", workers: int | None = None
) -> DecodedImages:
    """The images of ``listing`` decoded to ``shape`` (C, H, W): from the cache when its fingerprint
    matches, else decoded now and cached. ``tag`` keeps caches of different datasets apart."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise DataError(f"image files decode to 1 (gray) or 3 (RGB) channels: expected (1|3, H, W), got {shape}")
    path = _cache_path(listing.root, shape, tag)
    fingerprint = _fingerprint(listing, shape, tag)
    cached = _read_cache(path, fingerprint, shape)
    fresh = cached is None
    if fresh:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sweep_temp_files(path.parent)
            _write_cache(path, listing, shape, fingerprint, workers or min(8, os.cpu_count() or 1))
        except OSError as exc:
            raise DataError(
                f"cannot write the decoded-image cache {printable(str(path))} ({exc.strerror or exc}); "
                f"set {CACHE_ENV} to a writable folder with room for {gib(len(listing.files) * np.prod(shape))}"
            ) from None
        cached = _read_cache(path, fingerprint, shape)
        if cached is None:
            raise DataError(f"the decoded-image cache {printable(str(path))} was changed while it was written")
    images, labels, kept, header = cached
    return DecodedImages(
        images,
        labels,
        listing.classes,
        tuple(listing.files[i] for i in kept.tolist()),
        kept,
        int(header["total"]),
        int(header["skipped"]),
        str(header.get("skipped_example", "")),
        path,
        fresh,
    )


def load_folder(root: str | os.PathLike, shape: Sequence[int], *, workers: int | None = None) -> DecodedImages:
    """Every image under ``root`` decoded to ``shape`` (C, H, W); an empty or image-less folder is a
    DataError, and so is one where no file could be read."""
    listing = list_images(root)
    decoded = decode_listing(listing, shape, workers=workers)
    if len(decoded.images) == 0:
        raise DataError(
            f"none of the {decoded.total:,} image files under {printable(str(listing.root))} could be read "
            f"(e.g. {decoded.skipped_example})"
        )
    return decoded


__all__ = [
    "CACHE_ENV",
    "IMAGE_SUFFIXES",
    "DecodedImages",
    "FileList",
    "cache_dir",
    "decode_image",
    "decode_listing",
    "list_images",
    "load_folder",
]

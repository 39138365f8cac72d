"""The shard folder's format: what decides a run's bytes (:class:`ShardSpec`), its ``index.json``
(:class:`ShardIndex`), and the output-folder rule. shards.py describes the layout; numpy only.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy import inputs
from vae_deploy.contract import DECODER, MANIFEST, PRECISION_FORMAT, SAMPLE_BLOCK_ROWS, SAMPLE_STREAM_VERSION, Manifest
from vae_deploy.errors import DataError, UsageError
from vae_deploy.files import read_json, sha256_file

INDEX = "index.json"
INDEX_FORMAT = "vae-deploy-samples"
INDEX_VERSION = 1
BATCH_ROWS = 4096  # default rows per decode batch while writing shards ...
BATCH_BYTES = 16 << 20  # ... unless the images of a batch would pass this (large images)
MAX_INDEX_BYTES = 64 << 20  # an index is ~120 bytes per shard: ~500,000 shards
SHARD_BYTES = 128 << 20  # default shard size: the largest power-of-two row count within this
KEEP_NAMES = frozenset({"README.md", ".gitignore", ".gitkeep"})  # a folder holding only these is free
_SHARD_NAME = re.compile(r"shard-\d{5,}\.npy")


def default_batch_rows(row_bytes: int) -> int:
    """Rows decoded per batch when writing shards, locally or per Ray call: ``BATCH_ROWS``, fewer
    when a batch of images would pass ``BATCH_BYTES`` (measured: 4096 rows wrote MNIST-sized
    shards ~1.3x faster per CPU-second than the runtime's 256; benchmarks/results/shards-*)."""
    return max(1, min(BATCH_ROWS, BATCH_BYTES // max(1, row_bytes)))


def default_shard_rows(row_bytes: int) -> int:
    """The largest power of two whose rows of ``row_bytes`` fit in ``SHARD_BYTES`` (at least 1)."""
    return 1 << max(0, (SHARD_BYTES // max(1, row_bytes)).bit_length() - 1)


# --- what a run writes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """Everything that decides the bytes of a run's shards; a run with an equal spec resumes."""

    n: int
    seed: int
    shard_rows: int
    image_shape: tuple[int, ...]
    bernoulli: bool
    provider: str
    precision: str
    manifest_sha256: str
    decoder_sha256: str
    stream_version: int = SAMPLE_STREAM_VERSION
    block_rows: int = SAMPLE_BLOCK_ROWS
    dtype: str = "float32"

    @property
    def count(self) -> int:
        return -(-self.n // self.shard_rows)

    @property
    def row_bytes(self) -> int:
        return 4 * math.prod(self.image_shape)

    def name(self, i: int) -> str:
        return f"shard-{i:0{max(5, len(str(self.count - 1)))}d}.npy"

    def bounds(self, i: int) -> tuple[int, int]:
        """Rows [start, stop) of shard i."""
        return i * self.shard_rows, min(self.n, (i + 1) * self.shard_rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "seed": self.seed,
            "shard_rows": self.shard_rows,
            "shape": [self.n, *self.image_shape],
            "dtype": self.dtype,
            "bernoulli": self.bernoulli,
            "provider": self.provider,
            "precision": self.precision,
            "stream": {"version": self.stream_version, "block_rows": self.block_rows},
            "export": {"manifest_sha256": self.manifest_sha256, "decoder_sha256": self.decoder_sha256},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardSpec:
        shape, stream, export = d["shape"], d["stream"], d["export"]
        spec = cls(
            n=_int(d["n"], 1),
            seed=_int(d["seed"], 0),
            shard_rows=_int(d["shard_rows"], 1),
            image_shape=tuple(_int(v, 1) for v in shape[1:]),
            bernoulli=_bool(d["bernoulli"]),
            provider=str(d["provider"]),
            precision=str(d["precision"]),
            manifest_sha256=str(export["manifest_sha256"]),
            decoder_sha256=str(export["decoder_sha256"]),
            stream_version=_int(stream["version"], 1),
            block_rows=_int(stream["block_rows"], 1),
            dtype=str(d["dtype"]),
        )
        if _int(shape[0], 1) != spec.n or len(spec.image_shape) < 1 or spec.dtype != "float32":
            raise ValueError("shape/dtype disagree with n or are not float32")
        return spec


def shard_spec(
    manifest: Manifest,
    export_dir: str | os.PathLike,
    n: int,
    seed: int,
    shard_rows: int | None,
    image_shape: tuple[int, ...],
    bernoulli: bool,
    provider: str,
    precision: str = "fp32",
) -> ShardSpec:
    """The spec of a run over an export (its manifest as read, the decoder of ``precision``)."""
    entry = manifest.entry(DECODER, PRECISION_FORMAT[precision])
    if entry is None:
        raise UsageError(f"{export_dir} has no {precision} ONNX decoder")
    if not all(isinstance(d, int) for d in image_shape):
        raise UsageError(f"shards need a fixed image shape; this export's is {list(image_shape)}")
    row_bytes = 4 * math.prod(image_shape)
    rows = default_shard_rows(row_bytes) if shard_rows is None else inputs.count(shard_rows, "shard_rows")
    return ShardSpec(
        n=n,
        seed=seed,
        shard_rows=rows,
        image_shape=tuple(image_shape),
        bernoulli=bool(bernoulli),
        provider=provider,
        precision=precision,
        manifest_sha256=sha256_file(Path(export_dir) / MANIFEST),
        decoder_sha256=entry.sha256,
    )


def check_seed(seed: Any) -> int:
    """A non-negative int seed (None: a fresh one, so every run can be repeated), else a UsageError."""
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    return inputs.index(seed, "seed")


# --- the index ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardEntry:
    """One shard file: its name, first row, row count and sha256 (None while not yet written)."""

    file: str
    start: int
    rows: int
    sha256: str | None


@dataclass(frozen=True)
class ShardIndex:
    """A parsed ``index.json``."""

    spec: ShardSpec
    shards: tuple[ShardEntry, ...]
    complete: bool
    raw: dict[str, Any] = field(compare=False, repr=False)

    def paths(self, out_dir: str | os.PathLike) -> list[Path]:
        """The shard files in order: ``np.concatenate([np.load(p) for p in paths])`` is the sample."""
        return [Path(out_dir) / e.file for e in self.shards]


def _int(v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"expected an integer >= {low}, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def parse_index(data: Any, where: str) -> ShardIndex:
    """Check an index's JSON and return it parsed; DataError naming the folder otherwise."""
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise DataError(f"{where} is not a vae-deploy shard index (expected format={INDEX_FORMAT!r})")
    if data.get("version") != INDEX_VERSION:
        version = data.get("version")
        raise DataError(f"{where} has shard index version {version!r}; this vae-deploy reads {INDEX_VERSION}")
    try:
        spec = ShardSpec.from_dict(data)
        shards = []
        for i, e in enumerate(data["shards"]):
            entry = ShardEntry(str(e["file"]), _int(e["start"], 0), _int(e["rows"], 1), e.get("sha256"))
            if not _SHARD_NAME.fullmatch(entry.file) or (spec.name(i), *spec.bounds(i)) != (
                entry.file,
                entry.start,
                entry.start + entry.rows,
            ):
                raise ValueError(f"shard {i} is {entry.file!r} rows {entry.start}+{entry.rows}, not the layout's")
            if entry.sha256 is not None and not (isinstance(entry.sha256, str) and len(entry.sha256) == 64):
                raise ValueError(f"shard {entry.file} has a bad sha256")
            shards.append(entry)
        if len(shards) != spec.count:
            raise ValueError(f"{len(shards)} shards listed, the layout has {spec.count}")
        complete = _bool(data["complete"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DataError(f"{where} is not a valid shard index: {exc}") from None
    if complete and any(e.sha256 is None for e in shards):
        raise DataError(f"{where} says complete but lists shards without a sha256")
    return ShardIndex(spec, tuple(shards), complete, data)


def read_index(out_dir: str | os.PathLike, complete: bool = True) -> ShardIndex:
    """The index of a shard folder; with ``complete`` (default) refuse an unfinished run."""
    path = Path(out_dir) / INDEX
    try:
        data = read_json(path, MAX_INDEX_BYTES)
    except FileNotFoundError:
        raise DataError(f"{out_dir} has no {INDEX}: not a vae-deploy shard folder") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read as JSON: {exc}") from None
    except ValueError as exc:
        raise DataError(f"{path} {exc}") from None
    index = parse_index(data, str(path))
    if complete and not index.complete:
        done = sum(e.sha256 is not None for e in index.shards)
        raise DataError(
            f"{out_dir} holds an unfinished run ({done} of {len(index.shards)} shards written); "
            "run the same command again to finish it"
        )
    return index


def check_out_dir(out_dir: str | os.PathLike) -> ShardIndex | None:
    """Whether we may write shards into ``out_dir``: its index if it is ours, None if it is absent,
    empty or holds only README.md/.gitignore/.gitkeep; a one-line UsageError for anything else."""
    path = Path(out_dir)
    if not path.exists():
        if path.is_symlink():
            raise UsageError(f"--out-dir {path} is a dangling link; expected a folder")
        return None
    if not path.is_dir():
        raise UsageError(f"--out-dir {path} is a file; expected a folder")
    index = path / INDEX
    if index.is_file() and not index.is_symlink():
        try:
            return parse_index(read_json(index, MAX_INDEX_BYTES), str(index))
        except (DataError, OSError, ValueError):
            raise UsageError(
                f"--out-dir {path} has an {INDEX} that is not a vae-deploy shard index; choose another folder"
            ) from None
    foreign = sorted(p.name for p in path.iterdir() if p.name not in KEEP_NAMES)
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(
            f"--out-dir {path} holds files that are not vae-deploy shards ({shown}); choose a new or empty folder"
        )
    return None

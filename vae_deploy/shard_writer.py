"""Writing a shard run: rows in any order, each shard to a temp file at their offsets, hashed as
they become contiguous, renamed into place when complete; the index first, as shards complete, and
last. shards.py describes the layout and the rules; numpy only.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy import __version__, inputs
from vae_deploy.errors import DataError, ResourceError, UsageError
from vae_deploy.files import atomic_write_text, sha256_file, sweep_temp_files, temp_path
from vae_deploy.resources import gib
from vae_deploy.shard_index import INDEX, INDEX_FORMAT, INDEX_VERSION, ShardIndex, ShardSpec, check_out_dir, parse_index

INDEX_EVERY_S = 2.0  # progress index rewrites at most this often (a run of 30k shards stays linear)
READ_BACK = 8 << 20  # bytes read per call when hashing rows that arrived out of order


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes for a C-ordered float32 array of ``shape``."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def lock_folder(out_dir: Path) -> int | None:
    """An exclusive flock on the folder itself (no lock file), or a UsageError if another run holds
    it; None where the platform has no flock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"another run is writing shards into {out_dir}; wait for it or use another folder") from None
    return fd


def require_disk(out_dir: Path, need: int, n: int) -> None:
    """Refuse, before writing anything, a run whose shards would not fit on the disk of ``out_dir``."""
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ResourceError(
            f"{n:,} samples need {gib(need)} on the disk of {out_dir}, which has {gib(free)} free; "
            "free space, choose another folder or sample fewer"
        )


def index_text(data: dict[str, Any]) -> str:
    """An index as JSON for people too: one key per line, one shard per line."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k != "shards"]
    shards = ",\n".join(f"    {json.dumps(e)}" for e in data["shards"])
    return "{\n" + ",\n".join([*lines, f'  "shards": [\n{shards}\n  ]']) + "\n}\n"


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class _OpenShard:
    """One shard being written: a temp file, rows at their offsets, the sha256 so far."""

    def __init__(self, path: Path, rows: int, row_shape: tuple[int, ...]) -> None:
        self.path, self.rows = path, rows
        self.row_bytes = 4 * math.prod(row_shape)
        self.tmp = temp_path(path)
        header = npy_header((rows, *row_shape))
        self.header_len = len(header)
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        _pwrite_all(self.fd, memoryview(header), 0)
        self.hash = hashlib.sha256(header)
        self.hashed = 0  # rows [0, hashed) are in the hash
        self.pending: dict[int, int] = {}  # rows written out of order: start -> stop
        self.written = 0

    def write(self, row: int, data: np.ndarray) -> None:
        stop = row + len(data)
        if row < self.hashed or any(a < stop and row < b for a, b in self.pending.items()):
            raise UsageError(f"rows {row}..{stop - 1} of {self.path.name} were written twice")
        view = memoryview(data).cast("B")
        _pwrite_all(self.fd, view, self.header_len + row * self.row_bytes)
        self.written += len(data)
        if row != self.hashed:
            self.pending[row] = stop
            return
        self.hash.update(view)
        self.hashed = stop
        while self.hashed in self.pending:  # rows that came early: read back once, in order
            end = self.pending.pop(self.hashed)
            offset, last = self.header_len + self.hashed * self.row_bytes, self.header_len + end * self.row_bytes
            while offset < last:
                chunk = os.pread(self.fd, min(READ_BACK, last - offset), offset)
                self.hash.update(chunk)
                offset += len(chunk)
            self.hashed = end

    @property
    def complete(self) -> bool:
        return self.written == self.rows

    def close(self) -> str:
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, self.path)
        return self.hash.hexdigest()

    def discard(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Receives rows of a run in any order and writes them into shards (see the module docstring).

    ``ShardWriter.open(out_dir, spec)`` claims the folder; ``todo()`` says which row ranges are
    still missing; ``put(start, images)`` writes rows; ``finish()`` writes the final index. Used as
    a context manager, an exception removes the unfinished shards' temp files and records the
    finished ones, so the same run resumes. One writer per folder at a time.
    """

    def __init__(
        self,
        out_dir: Path,
        spec: ShardSpec,
        done: dict[int, str],
        info: dict[str, Any],
        fresh: str = "",
        lock: int | None = None,
    ) -> None:
        self.out_dir, self.spec, self.info = out_dir, spec, info
        self._lock = lock  # the folder's flock, held until finish() or abort()
        self._fresh = fresh  # "dir": we created the folder; "index": it had no index of ours before
        self._done = dict(done)
        self._open: dict[int, _OpenShard] = {}
        self._last_index = 0.0
        self.shards_kept = len(done)  # verified shards of an interrupted run with the same spec
        self.rows_kept = sum(spec.bounds(i)[1] - spec.bounds(i)[0] for i in done)
        self.rows_written = 0
        self._finished = False
        self._write_index(force=True)  # claims the folder before any shard is written

    @classmethod
    def open(
        cls, out_dir: str | os.PathLike, spec: ShardSpec, *, resume: bool = True, info: dict[str, Any] | None = None
    ) -> ShardWriter:
        out_dir = Path(out_dir)
        old = check_out_dir(out_dir)
        fresh = "index" if old is None else ""
        if not out_dir.exists():
            fresh = "dir"
        done: dict[int, str] = {}
        if old is not None and resume and old.spec == spec:  # an interrupted (or finished) run of this spec
            for i, entry in enumerate(old.shards):
                path = out_dir / entry.file
                if entry.sha256 and path.is_file() and not path.is_symlink() and sha256_file(path) == entry.sha256:
                    done[i] = entry.sha256
        kept_rows = sum(spec.bounds(i)[1] - spec.bounds(i)[0] for i in done)
        require_disk(out_dir, (spec.n - kept_rows) * spec.row_bytes + 128 * (spec.count - len(done)), spec.n)
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_folder(out_dir)
        sweep_temp_files(out_dir)
        if old is not None:
            names = {spec.name(i) for i in range(spec.count)}
            for entry in old.shards:
                path = out_dir / entry.file
                if entry.file not in names and (path.is_file() or path.is_symlink()):
                    path.unlink()  # a shard of an earlier run with another layout: ours, listed in our index
        return cls(out_dir, spec, done, dict(info or {}), fresh, lock)

    def todo(self) -> list[tuple[int, int]]:
        """Row ranges [start, stop) not yet written, merged, in order."""
        ranges: list[tuple[int, int]] = []
        for i in range(self.spec.count):
            if i in self._done:
                continue
            start, stop = self.spec.bounds(i)
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((start, stop))
        return ranges

    def put(self, start: int, images: np.ndarray) -> None:
        """Write rows [start, start + len(images)) (float32 [k, C, H, W]); they may span shards."""
        spec = self.spec
        if not isinstance(images, np.ndarray) or images.dtype != np.float32 or images.shape[1:] != spec.image_shape:
            got = f"{getattr(images, 'dtype', type(images).__name__)} {list(getattr(images, 'shape', []))}"
            raise UsageError(f"shard rows must be float32 [k, {', '.join(map(str, spec.image_shape))}], got {got}")
        start = inputs.index(start, "start")
        if start + len(images) > spec.n:
            raise UsageError(f"rows {start}..{start + len(images) - 1} are beyond the run's n={spec.n}")
        images = np.ascontiguousarray(images)
        at = 0
        while at < len(images):
            row = start + at
            i = row // spec.shard_rows
            lo, hi = spec.bounds(i)
            m = min(len(images) - at, hi - row)
            if i in self._done:
                raise UsageError(f"rows {row}..{row + m - 1} belong to {spec.name(i)}, which is already written")
            shard = self._open.get(i)
            if shard is None:
                shard = self._open[i] = _OpenShard(self.out_dir / spec.name(i), hi - lo, spec.image_shape)
            shard.write(row - lo, images[at : at + m])
            if shard.complete:
                self._done[i] = self._open.pop(i).close()
                self._write_index()
            at += m
        self.rows_written += len(images)

    def finish(self) -> ShardIndex:
        """Write the final index (``complete: true``) once every shard is written; it is returned."""
        missing = [self.spec.name(i) for i in range(self.spec.count) if i not in self._done]
        if missing:
            raise DataError(f"{self.out_dir}: {len(missing)} shards are not written yet (first: {missing[0]})")
        data = self._index_dict(complete=True)
        atomic_write_text(self.out_dir / INDEX, index_text(data))
        self._finished = True
        self._unlock()
        return parse_index(data, str(self.out_dir / INDEX))

    def abort(self) -> None:
        """Drop unfinished shards (their temp files) and record the finished ones for a resume; a
        run that finished no shard in a folder that was not ours leaves it as it found it."""
        for shard in self._open.values():
            shard.discard()
        self._open.clear()
        try:
            if self._done or not self._fresh:
                self._write_index(force=True)
                return
            (self.out_dir / INDEX).unlink(missing_ok=True)
            if self._fresh == "dir" and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()
        except OSError:
            pass  # the error that stopped the run is the one to report
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._finished:  # an exception, or a run left unfinished
            self.abort()

    def _index_dict(self, complete: bool) -> dict[str, Any]:
        shards = []
        for i in range(self.spec.count):
            start, stop = self.spec.bounds(i)
            entry = {"file": self.spec.name(i), "start": start, "rows": stop - start, "sha256": self._done.get(i)}
            shards.append(entry)
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "complete": complete,
            **self.spec.to_dict(),
            "producer_version": __version__,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **self.info,
            "shards": shards,
        }

    def _write_index(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_index >= INDEX_EVERY_S:
            atomic_write_text(self.out_dir / INDEX, index_text(self._index_dict(complete=False)))
            self._last_index = now

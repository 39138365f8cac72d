"""Files written and read safely: the one atomic writer, the one bounded JSON reader, sha256,
folders swapped in as a unit, and stale temp-file cleanup.

Every file vae-deploy writes (checkpoints, metrics, manifests, PNG/NPY outputs, reports) goes
through :func:`atomic_write`: a temp file in the same folder, fsync, then rename, so a reader (or a
process killed half-way) never sees half a file. Temp files are named ``.NAME.PID.RANDOM.tmp`` so
:func:`sweep_temp_files` can remove those whose process is gone. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temp-file name beside ``path`` (``.NAME.PID.RANDOM.tmp``), for writers that keep a
    file open across many writes before renaming it into place; :func:`sweep_temp_files` knows it."""
    return _temp_name(Path(path))


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, or a function that writes into a binary file) to ``path`` atomically.

    The file gets the usual permissions (umask applied), is fsynced before the rename, and a
    failure at any point leaves ``path`` as it was and no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` for UTF-8 text."""
    return atomic_write(path, text.encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, max_bytes: int) -> Any:
    """The JSON value in a file of at most ``max_bytes``: every small JSON file vae-deploy reads back
    (manifests, markers, configs, plan caches, shard indexes) may have been written by someone else.

    Raises OSError where the file cannot be read, and ValueError whose message completes "PATH ..."
    where it is no JSON we take: "is larger than N bytes", "is not valid JSON (JSONDecodeError)"
    (also for non-UTF-8 bytes), "is nested too deeply" (json's RecursionError, caught here once).
    """
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"is larger than {max_bytes:,} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"is not valid JSON ({type(exc).__name__})") from None
    except RecursionError:
        raise ValueError("is nested too deeply") from None


def pid_alive(pid: int) -> bool:
    """Whether a process exists (POSIX); elsewhere assume it does, so nothing of it is removed."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove temp files left in ``folder`` by killed writers (their process is gone); their names."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        found = _TEMP.fullmatch(entry.name)
        if found and entry.is_file() and not entry.is_symlink() and not pid_alive(int(found["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported,
    so the caller falls back to two renames."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# --- folders swapped in as a unit (exports, Triton model folders) -------------------------------------

FOLDER_WORK = ("export", "staging", "old")  # what a sibling folder named by folder_sibling holds


def folder_sibling(target: str | os.PathLike, what: str) -> Path:
    """A sibling of ``target`` for a folder being built (``export``, ``staging``) or set aside
    (``old``): ``.NAME.WHAT-PID-RANDOM``, on the same filesystem so moves are renames, and named
    so :func:`sweep_folder_leftovers` can tell whose process is gone."""
    if what not in FOLDER_WORK:
        raise ValueError(f"what must be one of {FOLDER_WORK}, got {what!r}")
    target = Path(target)
    return target.with_name(f".{target.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def swap_folder_in(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder ``staging`` at ``target`` as a unit: ``target`` holds the old folder
    or the new one, never a mix and never neither, whenever the process is killed. After the call
    ``staging`` holds the old folder (if there was one) for the caller to remove. Without an atomic
    exchange (not Linux, or the filesystem lacks it) it is two renames with the old folder set
    aside as ``.NAME.old-PID-RANDOM``, which :func:`sweep_folder_leftovers` puts back after a kill."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    if exchange(staging, target):
        return
    aside = folder_sibling(target, "old")
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def sweep_folder_leftovers(target: str | os.PathLike) -> None:
    """Remove the sibling folders of ``target`` that killed writers left (their process is gone),
    and put back an old folder that a kill between :func:`swap_folder_in`'s two renames set aside."""
    target = Path(target)
    pattern = re.compile(re.escape(f".{target.name}.") + rf"(?P<what>{'|'.join(FOLDER_WORK)})-(?P<pid>\d+)-[0-9a-f]+")
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or entry.is_symlink() or not entry.is_dir() or pid_alive(int(found["pid"])):
            continue
        if found["what"] == "old" and not target.exists():
            os.replace(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)

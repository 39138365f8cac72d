"""One rule for output folders (runs, exports, demos): write only where we may, delete nothing else.

A folder is *ours* when it carries our marker file (:data:`MARKER`, naming its kind), or, for folders
made before markers existed, when it holds what only vae-deploy writes: a vae-deploy checkpoint (a
run) or a vae-deploy ``manifest.json`` (an export). We write into a folder only when it is ours (of
the same kind), absent, empty, or holds nothing but :data:`KEEP_FILES`; anything else is refused
with :class:`~vae_deploy.errors.OutputDirError`. Inside a folder of ours, callers replace only their
own files and never delete anything else. A single output file the user names may be replaced.

Torch-free: the checkpoint test reads only the zip directory and the (bounded) pickle's bytes.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from vae_deploy.errors import OutputDirError
from vae_deploy.files import atomic_write_text, read_json

MARKER = ".vae-deploy"
KINDS = ("run", "export")
KEEP_FILES = ("README.md", ".gitignore", ".gitkeep")  # may sit in an output folder before we write
MARKER_FORMAT = "vae-deploy-output"
CHECKPOINT_FORMAT = "vae-deploy-checkpoint"  # == checkpoint.FORMAT (kept here to stay torch-free)
_MARKER_LIMIT = 4096
_PICKLE_LIMIT = 8 << 20

__all__ = [
    "KEEP_FILES",
    "KINDS",
    "MARKER",
    "check_output_dir",
    "claim_output_dir",
    "is_ours",
    "marker_kind",
]


def marker_kind(path: str | os.PathLike) -> str | None:
    """The kind named by ``PATH/.vae-deploy``, or None when there is no valid marker."""
    try:
        data = read_json(Path(path) / MARKER, _MARKER_LIMIT)
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("format") == MARKER_FORMAT and data.get("kind") in KINDS:
        return data["kind"]
    return None


def _holds_checkpoint(folder: Path) -> bool:
    """Whether ``folder/checkpoint.pt`` is a torch zip whose pickle names the vae-deploy format."""
    path = folder / "checkpoint.pt"
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [i for i in zf.infolist() if i.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > _PICKLE_LIMIT:
                return False
            with zf.open(pickles[0]) as f:
                return CHECKPOINT_FORMAT.encode() in f.read(_PICKLE_LIMIT)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


def _holds_manifest(folder: Path) -> bool:
    from vae_deploy.errors import ExportError
    from vae_deploy.manifest import MANIFEST, read_manifest

    if not (folder / MANIFEST).is_file():
        return False
    try:
        read_manifest(folder)
    except ExportError:
        return False
    return True


_RECOGNISE = {"run": _holds_checkpoint, "export": _holds_manifest}


def is_ours(path: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether ``path`` is a vae-deploy output folder (of ``kind``, when given)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    found = marker_kind(folder)
    if found is not None:
        return kind is None or found == kind
    kinds = KINDS if kind is None else (kind,)
    return any(_RECOGNISE[k](folder) for k in kinds if k in _RECOGNISE)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError as exc:
        raise OutputDirError(f"cannot read output folder {folder}: {exc.strerror or exc}") from None


def check_output_dir(path: str | os.PathLike, kind: str, *, resume: bool = False) -> bool:
    """Raise ``OutputDirError`` unless we may write a ``kind`` folder at ``path``; writes nothing.

    Returns whether the folder is already ours (False: absent, empty, or only ``KEEP_FILES``).
    ``resume=True`` also requires it to be ours already (there must be something to continue).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    folder = Path(path)
    if folder.is_symlink() and not folder.is_dir():
        raise OutputDirError(f"cannot write to {folder}: it is a broken symbolic link")
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"cannot write to {folder}: it exists and is not a folder")
    if not folder.exists():
        if resume:
            raise OutputDirError(f"nothing to resume: {folder} does not exist")
        return False
    found = marker_kind(folder)
    if found is not None and found != kind:
        raise OutputDirError(
            f"refusing to write {_a(kind)} into {folder}: it is a vae-deploy {found} folder; choose another --out"
        )
    if is_ours(folder, kind):
        return True
    names = _entries(folder)
    foreign = [n for n in names if n not in KEEP_FILES]
    if resume:
        raise OutputDirError(f"nothing to resume: {folder} is not a vae-deploy {kind} folder")
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputDirError(
            f"refusing to write into {folder}: it is not a vae-deploy {kind} folder and not empty "
            f"(it holds {shown}); choose another --out or empty it yourself"
        )
    return False


def claim_output_dir(path: str | os.PathLike, kind: str, *, resume: bool = False) -> Path:
    """Check ``path`` as :func:`check_output_dir` does, create it if needed and mark it as ours.

    Call it once everything else is validated: it is the first write. Returns the folder.
    """
    folder = Path(path)
    check_output_dir(folder, kind, resume=resume)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if marker_kind(folder) != kind:
            atomic_write_text(folder / MARKER, json.dumps({"format": MARKER_FORMAT, "kind": kind}) + "\n")
    except OSError as exc:
        where = exc.filename or folder
        raise OutputDirError(f"cannot write output folder {folder}: {exc.strerror or exc} ({where})") from None
    return folder

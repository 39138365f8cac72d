"""An export folder's integrity: read its manifest, and hand out only files that are what it lists.

Rules (docs/CONTRACT.md): a listed file is a plain name of a regular file inside the folder (no
paths, no links); its bytes must match the manifest's sha256, and the bytes that were hashed are
the bytes that are used (:func:`read_verified` returns them, the runtime builds its sessions from
them), so nothing can be swapped in between. Errors name the file but never print a digest or
anything else about what a file holds. Torch-free and onnx-free (the external-data walk of
:func:`check_manifest` imports onnx only where it is installed).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from vae_deploy.contract import MANIFEST, FileEntry, Manifest, parse_manifest
from vae_deploy.errors import ExportError, IntegrityError
from vae_deploy.files import read_json, sha256_bytes, sha256_file

MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few KB; refuse to parse megabytes of JSON
MAX_GRAPH_BYTES = 16 << 30  # far above any VAE (the SD decoder is ~200 MB)


def read_manifest(export_dir: str | os.PathLike) -> Manifest:
    """Parse and check ``DIR/manifest.json`` (its fields, not yet the files' hashes)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ExportError(f"export folder not found: {export_dir} (create one with `vae-deploy export`)")
    path = export_dir / MANIFEST
    if not path.is_file():
        raise ExportError(
            f"{export_dir} is not a vae-deploy export folder: it has no {MANIFEST} "
            "(create one with `vae-deploy export CHECKPOINT --out DIR`)"
        )
    try:
        data = read_json(path, MAX_MANIFEST_BYTES)
    except OSError as exc:
        raise ExportError(f"{path} cannot be read ({type(exc).__name__}); re-export the folder") from None
    except ValueError as exc:
        raise ExportError(f"{path} {exc}; re-export the folder") from None
    return parse_manifest(data, str(path))


def listed_path(export_dir: str | os.PathLike, entry: FileEntry) -> Path:
    """The path of a listed file: a plain name inside the folder, a regular file, not a link."""
    export_dir = Path(export_dir)
    name = entry.file
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise IntegrityError(f"manifest lists {name!r}: expected a plain file name inside {export_dir}")
    path = export_dir / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise IntegrityError(f"{name} is missing from {export_dir} (listed for {entry.graph} {entry.format})") from None
    except OSError as exc:
        raise IntegrityError(f"{name} in {export_dir} cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
        kind = "a link" if stat.S_ISLNK(mode) else "not a regular file"
        raise IntegrityError(f"{name} in {export_dir} is {kind}; export files must be regular files")
    return path


def read_verified(export_dir: str | os.PathLike, entry: FileEntry) -> bytes:
    """The bytes of one listed file, read once (no links followed) and checked against its sha256."""
    path = listed_path(export_dir, entry)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise IntegrityError(f"{entry.file} in {path.parent} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_GRAPH_BYTES:
            raise IntegrityError(f"{entry.file} in {path.parent} is not a regular file of a sane size")
        data = f.read()
    if sha256_bytes(data) != entry.sha256:
        raise _mismatch(path, entry)
    return data


def check_file(export_dir: str | os.PathLike, entry: FileEntry) -> Path:
    """Check one listed file's sha256 without keeping its bytes (for files torch will open)."""
    path = listed_path(export_dir, entry)
    if sha256_file(path) != entry.sha256:
        raise _mismatch(path, entry)
    return path


def _mismatch(path: Path, entry: FileEntry) -> IntegrityError:
    return IntegrityError(
        f"{path.name} in {path.parent} does not match its sha256 in {MANIFEST} (listed for "
        f"{entry.graph} {entry.format}): the file was modified or corrupted; re-export"
    )


def check_manifest(export_dir: str | os.PathLike) -> Manifest:
    """Load the manifest and check every listed file (regular file, sha256, self-contained ONNX).

    ``ExportError`` for a missing/garbage manifest, ``IntegrityError`` naming the file otherwise.
    """
    manifest = read_manifest(export_dir)
    for entry in manifest.files:
        if entry.format.startswith("onnx"):
            check_onnx_self_contained(read_verified(export_dir, entry), entry.file)
        else:
            check_file(export_dir, entry)
    return manifest


def check_onnx_self_contained(model: bytes, name: str) -> None:
    """Refuse ONNX bytes that are not a model or keep any tensor in an external-data file.

    Where ``onnx`` is not installed (the runtime-only install) only the loader's check applies:
    onnxruntime refuses external data in a model created from bytes.
    """
    try:
        import onnx
    except ImportError:
        return
    try:
        proto = onnx.ModelProto.FromString(model)
    except Exception as exc:  # noqa: BLE001 - truncated or non-ONNX bytes
        raise IntegrityError(f"{name} is not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node or not proto.graph.output:  # e.g. an empty file parses as an empty model
        raise IntegrityError(f"{name} is not a readable ONNX model (it holds no graph)")
    for tensor in _all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise IntegrityError(
                f"{name} keeps tensor {tensor.name[:60]!r} in external file {where[:80]!r}; vae-deploy "
                "exports are single self-contained files, so this one is refused"
            )


def _all_tensors(model: Any):  # -> Iterator[onnx.TensorProto]
    """Every TensorProto a model can hold: initializers, sparse ones (values and indices), node
    attributes (tensors, sparse tensors, subgraphs), functions, and training-info graphs."""

    def sparse(sp: Any):
        yield sp.values
        yield sp.indices

    def graph_tensors(graph: Any):
        yield from graph.initializer
        for sp in graph.sparse_initializer:
            yield from sparse(sp)
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node: Any):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from sparse(attr.sparse_tensor)
            for sp in attr.sparse_tensors:
                yield from sparse(sp)
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for g in attr.graphs:
                yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from node_tensors(node)
    for info in model.training_info:
        yield from graph_tensors(info.initialization)
        yield from graph_tensors(info.algorithm)


def source_checkpoint(export_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """The checkpoint an export was made from, found the same way from any working folder: the
    recorded path relative to the export folder (version 2), else the absolute path recorded; its
    sha256 must still be the recorded one. ExportError/IntegrityError say what to pass instead."""
    source = manifest.model.source
    if source.get("kind", "checkpoint") != "checkpoint" or not source.get("path"):
        raise ExportError("the manifest names no source checkpoint; pass --checkpoint CKPT")
    export_dir = Path(export_dir)
    candidates = []
    recorded = Path(str(source["path"]))
    if manifest.format_version >= 2 or recorded.is_absolute():
        candidates.append(recorded if recorded.is_absolute() else export_dir / recorded)
    if source.get("abs_path"):
        candidates.append(Path(str(source["abs_path"])))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ExportError(
            f"the checkpoint this export was made from ({candidates[0] if candidates else recorded}) "
            "is not there; pass --checkpoint CKPT"
        )
    if not isinstance(source.get("sha256"), str) or sha256_file(path) != source["sha256"]:
        raise IntegrityError(
            f"{path} has changed since this export was made (its sha256 differs from the manifest's); "
            "re-export it, or pass --checkpoint to compare against it anyway"
        )
    return path

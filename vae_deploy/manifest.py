"""The export folder's index (manifest.json) and the integrity checks every consumer runs first.

Torch-free on purpose: verify, the onnxruntime-only runtime and bench all call ``check_manifest``
before loading a single graph. It refuses a folder whose manifest is missing or garbage, any
listed file that is missing or whose sha256 differs, any file name that points outside the folder,
and ONNX files that pull weights from external-data files (exports are self-contained).
See docs/CONTRACT.md for the schema.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vae_deploy.errors import ExportError, IntegrityError
from vae_deploy.files import sha256_file

FORMAT = "vae-deploy-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Every file name an export may contain (docs/CONTRACT.md); anything else in the folder is not ours.
EXPORT_FILES = (
    MANIFEST,
    "encoder.onnx",
    "decoder.onnx",
    "decoder.fp16.onnx",
    "encoder.torchscript",
    "decoder.torchscript",
    "encoder.pt2",
    "decoder.pt2",
)

# ONNX metadata_props keys (all values are strings).
META_GRAPH = "vae_deploy.graph"
META_LATENT_DIM = "vae_deploy.latent_dim"
META_IMAGE_SHAPE = "vae_deploy.image_shape"
META_VALUE_RANGE = "vae_deploy.value_range"
META_PRECISION = "vae_deploy.precision"
META_PRODUCER_VERSION = "vae_deploy.producer_version"
META_FORMAT_VERSION = "vae_deploy.format_version"
METADATA_KEYS = (
    META_GRAPH,
    META_LATENT_DIM,
    META_IMAGE_SHAPE,
    META_VALUE_RANGE,
    META_PRECISION,
    META_PRODUCER_VERSION,
    META_FORMAT_VERSION,
)


def read_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse ``DIR/manifest.json`` and check its format and shape (not the files' hashes)."""
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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); re-export the folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not a vae-deploy export manifest (expected format={FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"{path} has no valid format_version (expected an integer >= 1)")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{path} has export format {version}, newer than this vae-deploy understands "
            f"({FORMAT_VERSION}); upgrade vae-deploy"
        )
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise ExportError(f"{path} lists no graphs (expected graphs -> encoder/decoder -> format)")
    for graph, formats in graphs.items():
        if not isinstance(formats, dict) or not formats:
            raise ExportError(f"{path}: graph {graph!r} lists no files")
        for fmt, entry in formats.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise ExportError(f"{path}: graphs.{graph}.{fmt} has no 'file'")
            if not isinstance(entry.get("sha256"), str):
                raise ExportError(f"{path}: graphs.{graph}.{fmt} has no 'sha256'")
    return manifest


def manifest_files(manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(graph, format, entry)`` for every file the manifest lists, in manifest order."""
    return [(g, fmt, e) for g, formats in manifest["graphs"].items() for fmt, e in formats.items()]


def _safe_name(export_dir: Path, name: str) -> Path:
    """A listed file must be a plain file name inside the folder (no paths, no ``..``)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise IntegrityError(f"manifest lists {name!r}: expected a plain file name inside {export_dir}")
    return export_dir / name


def check_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Load the manifest and check every listed file (present, sha256, self-contained) before use.

    Raises ``ExportError`` for a missing/garbage manifest or a folder that is not an export, and
    ``IntegrityError`` naming the file for a missing or modified file.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    for graph, fmt, entry in manifest_files(manifest):
        path = _safe_name(export_dir, entry["file"])
        if not path.is_file():
            raise IntegrityError(f"{path.name} is missing from {export_dir} (listed for {graph} {fmt})")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise IntegrityError(
                f"{path.name} in {export_dir} does not match the manifest (sha256 {digest[:12]}..., "
                f"expected {entry['sha256'][:12]}...): the file was modified or corrupted; re-export"
            )
        if path.suffix == ".onnx":
            check_onnx_self_contained(path)
    return manifest


def check_onnx_self_contained(path: str | os.PathLike) -> None:
    """Refuse an ONNX file with any tensor stored in an external-data file (exports never have one)."""
    import onnx  # torch-free; loaded only here so ``import vae_deploy.manifest`` stays light

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - truncated or non-ONNX bytes
        raise IntegrityError(f"{path.name} is not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node or not model.graph.output:  # e.g. an empty file parses as an empty model
        raise IntegrityError(f"{path.name} is not a readable ONNX model (it holds no graph)")
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise IntegrityError(
                f"{path.name} keeps tensor {tensor.name!r} in external file {where!r}; vae-deploy "
                "exports are single self-contained files, so this one is refused"
            )


def _all_tensors(model: Any):  # -> Iterator[onnx.TensorProto]
    """Every TensorProto in a model: initializers, sparse ones, and node attributes, in subgraphs too."""

    def graph_tensors(graph: Any):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node: Any):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for g in attr.graphs:
                yield from graph_tensors(g)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from node_tensors(node)

"""``vae-deploy triton``: an export folder as models of an NVIDIA Triton Inference Server repository.

    write_repository("exported", "model_repository", TritonOptions(name="vae", max_batch_size=256))

writes, for each graph of the export (decoder, and the encoder where there is one)::

    REPO/vae_decoder/config.pbtxt     platform "onnxruntime_onnx", tensors by the contract's names,
                                      -1 for dynamic sizes, dynamic_batching, instance_group,
                                      optional TensorRT accelerator
    REPO/vae_decoder/1/model.onnx     the export's verified bytes (read once, sha256-checked)
    REPO/vae_decoder/.vae-deploy      marks the folder as ours, with the model's contract

Other models in REPO are never touched. A model folder is replaced only when it is ours (its
marker), empty, or holds nothing but README.md/.gitignore/.gitkeep (which are kept); anything else
is refused in one line. Each folder is built beside its target and swapped in as a unit, so a
server (or a killed writer) sees the old model or the new one, never half of one. Torch-free, and
needs no tritonclient: the config text is written by hand; tests parse it with Triton's own schema.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vae_deploy import __version__
from vae_deploy.contract import DECODER, ENCODER, GRAPHS, PRECISION_FORMAT, GraphSpec, TensorSpec
from vae_deploy.errors import ExportError, UsageError
from vae_deploy.files import (
    atomic_write,
    folder_sibling,
    read_json,
    sha256_bytes,
    swap_folder_in,
    sweep_folder_leftovers,
)
from vae_deploy.manifest import read_manifest, read_verified

PLATFORM = "onnxruntime_onnx"
KINDS = ("gpu", "cpu")
TENSORRT_PRECISIONS = ("fp32", "fp16")
VERSION = "1"
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
MARKER = ".vae-deploy"  # the output-folder marker every vae-deploy output folder carries
MARKER_FORMAT = "vae-deploy-output"
MARKER_KIND = "triton-model"
KEEP_FILES = ("README.md", ".gitignore", ".gitkeep")
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
TRT_WORKSPACE_BYTES = 1 << 30


@dataclass(frozen=True)
class TritonOptions:
    """How the models are configured.

    ``name``: models are ``<name>_decoder`` and ``<name>_encoder``. ``max_batch_size``: the largest
    batch Triton forms or accepts (0: Triton does not batch; each request's full shape is given).
    ``instances``/``kind``: model instances per GPU (or on the CPU). ``tensorrt``: run through
    onnxruntime's TensorRT provider (GPU only) in ``tensorrt_precision``, with optimisation
    profiles for batch 1..max_batch_size where the other sizes are fixed. ``precision``: which
    decoder file (``fp16``: the export's ``decoder.fp16.onnx``). ``max_queue_delay_us``: how long
    dynamic batching waits to fill a batch. ``graphs``: which graphs (default: all the export has).
    ``warmup``: one zero-filled request at load, so the first client does not pay for setup.
    """

    name: str = "vae"
    max_batch_size: int = 256
    instances: int = 1
    kind: str = "gpu"
    tensorrt: bool = False
    tensorrt_precision: str = "fp32"
    precision: str = "fp32"
    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()
    graphs: tuple[str, ...] | None = None
    warmup: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not MODEL_NAME.fullmatch(self.name):
            raise UsageError(f"name must be letters, digits, '_', '.', '-' (up to 100), got {self.name!r}")

        def integer(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")

        integer("max_batch_size", self.max_batch_size, 0)
        integer("instances", self.instances, 1)
        integer("max_queue_delay_us", self.max_queue_delay_us, 0)
        for size in self.preferred_batch_sizes:
            integer("a preferred batch size", size, 1)
            if size > self.max_batch_size:
                raise UsageError(f"preferred batch size {size} is above max_batch_size {self.max_batch_size}")
        if self.preferred_batch_sizes and self.max_batch_size == 0:
            raise UsageError("preferred batch sizes need dynamic batching (max_batch_size >= 1)")
        if self.kind not in KINDS:
            raise UsageError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.tensorrt and self.kind != "gpu":
            raise UsageError("TensorRT runs on GPUs only; drop --tensorrt or use --kind gpu")
        if self.tensorrt_precision not in TENSORRT_PRECISIONS:
            raise UsageError(
                f"tensorrt_precision must be one of {TENSORRT_PRECISIONS}, got {self.tensorrt_precision!r}"
            )
        if self.precision not in PRECISION_FORMAT:
            raise UsageError(f"precision must be one of {tuple(PRECISION_FORMAT)}, got {self.precision!r}")
        if self.graphs is not None and (not self.graphs or any(g not in GRAPHS for g in self.graphs)):
            raise UsageError(f"graphs must be some of {GRAPHS}, got {self.graphs!r}")

    def model_name(self, graph: str) -> str:
        return f"{self.name}_{graph}"


@dataclass(frozen=True)
class TritonModel:
    """One model written: its Triton name, graph, folder and config text."""

    name: str
    graph: str
    path: Path
    config: str


# --- config.pbtxt -------------------------------------------------------------------------------


def _dims(shape: tuple) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def _tensor(t: TensorSpec, batched: bool) -> str:
    shape = t.row_shape if batched else t.shape
    return f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_TYPES[t.dtype]}\n    dims: {_dims(shape)}\n  }}'


def _tensorrt(spec: GraphSpec, options: TritonOptions) -> str:
    params = {
        "precision_mode": options.tensorrt_precision.upper(),
        "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"/tmp/triton_trt_cache/{options.model_name(spec.name)}",
    }
    if options.max_batch_size and all(t.static_rows for t in spec.inputs):
        # one optimisation profile over every batch size Triton may send: no engine rebuilds
        opt = max(options.preferred_batch_sizes or (options.max_batch_size,))
        for key, batch in (("min", 1), ("opt", opt), ("max", options.max_batch_size)):
            shapes = ",".join(f"{t.name}:" + "x".join(map(str, (batch, *t.row_shape))) for t in spec.inputs)
            params[f"trt_profile_{key}_shapes"] = shapes
    lines = "".join(f'\n        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
        f'      {{\n        name: "tensorrt"{lines}\n      }}\n    ]\n  }}\n}}\n'
    )


def _warmup(spec: GraphSpec, batched: bool) -> str:
    if not all(t.static_rows for t in spec.inputs):
        return ""  # a zero request needs every size; dynamic image sizes have none to pick
    inputs = ""
    for t in spec.inputs:
        dims = _dims(t.row_shape if batched else (1, *t.row_shape))
        inputs += (
            f'\n    inputs {{\n      key: "{t.name}"\n      value: {{\n        data_type: {TRITON_TYPES[t.dtype]}\n'
            f"        dims: {dims}\n        zero_data: true\n      }}\n    }}"
        )
    return f'model_warmup [\n  {{\n    name: "zeros"\n    batch_size: 1{inputs}\n  }}\n]\n'


def model_config(spec: GraphSpec, options: TritonOptions, comment: str = "") -> str:
    """The ``config.pbtxt`` text of one graph (protobuf text format, Triton's ``ModelConfig``)."""
    batched = options.max_batch_size > 0
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    inputs = ",\n".join(_tensor(t, batched) for t in spec.inputs)
    outputs = ",\n".join(_tensor(t, batched) for t in spec.outputs)
    text = (
        f'{head}name: "{options.model_name(spec.name)}"\nplatform: "{PLATFORM}"\n'
        f"max_batch_size: {options.max_batch_size}\ninput [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
    )
    if batched:
        preferred = ""
        if options.preferred_batch_sizes:
            preferred = f"  preferred_batch_size: [ {', '.join(map(str, options.preferred_batch_sizes))} ]\n"
        text += f"dynamic_batching {{\n{preferred}  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n"
    kind = "KIND_GPU" if options.kind == "gpu" else "KIND_CPU"
    text += f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {kind}\n  }}\n]\n"
    if options.tensorrt:
        text += _tensorrt(spec, options)
    if options.warmup:
        text += _warmup(spec, batched)
    return text


# --- writing the repository ---------------------------------------------------------------------


def write_repository(
    export_dir: str | os.PathLike, repo: str | os.PathLike, options: TritonOptions | None = None
) -> list[TritonModel]:
    """Add (or replace) this export's models in the Triton model repository ``repo``; their list.

    Every file is checked against the manifest before anything is written, and the ONNX bytes
    copied are the bytes that were checked.
    """
    options = options or TritonOptions()
    export_dir, repo = Path(export_dir), Path(repo)
    manifest = read_manifest(export_dir)
    wanted = options.graphs or tuple(g for g in (DECODER, ENCODER) if manifest.formats(g))
    entries = []
    for graph in wanted:
        fmt = PRECISION_FORMAT[options.precision] if graph == DECODER else "onnx"
        entry = manifest.entry(graph, fmt)
        if entry is None:
            raise ExportError(f"{export_dir} has no {graph} {fmt!r} file to serve (it has {manifest.formats(graph)})")
        entries.append(entry)
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"--repo {repo} exists and is not a folder")
    targets = [repo / options.model_name(e.graph) for e in entries]
    keep = [_check_target(t) for t in targets]  # refuse before writing anything
    blobs = [read_verified(export_dir, e) for e in entries]
    repo.mkdir(parents=True, exist_ok=True)
    models = []
    for entry, target, kept, blob in zip(entries, targets, keep, blobs):
        sweep_folder_leftovers(target)
        comment = (
            f"Written by vae-deploy {__version__} from {export_dir.resolve()} ({entry.graph}, {entry.precision}).\n"
            f"Contract: {entry.spec.signature()}; value range {list(manifest.model.value_range)}."
        )
        config = model_config(entry.spec, options, comment)
        marker = {
            "format": MARKER_FORMAT,
            "kind": MARKER_KIND,
            "graph": entry.graph,
            "model_name": target.name,
            "files": [CONFIG_FILE, f"{VERSION}/{MODEL_FILE}"],
            "sha256": sha256_bytes(blob),
            "export": str(export_dir.resolve()),
            "contract": {k: v for k, v in manifest.model.to_dict().items() if k != "source"},
            "producer_version": __version__,
        }
        _install(target, kept, {f"{VERSION}/{MODEL_FILE}": blob, CONFIG_FILE: config.encode(),
                                MARKER: json.dumps(marker, indent=1).encode()})  # fmt: skip
        models.append(TritonModel(target.name, entry.graph, target, config))
    return models


def _is_ours(folder: Path) -> bool:
    try:
        data = read_json(folder / MARKER, 1 << 16)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == MARKER_FORMAT and data.get("kind") == MARKER_KIND


def _check_target(target: Path) -> list[str]:
    """Refuse a model folder that is not ours to replace; the user's files in it that we keep."""
    if not target.exists() and not target.is_symlink():
        return []
    if target.is_symlink() or not target.is_dir():
        raise ExportError(f"refusing to write model {target.name}: {target} exists and is not a folder")
    names = sorted(p.name for p in target.iterdir())
    ours = {MARKER, CONFIG_FILE, VERSION} if _is_ours(target) else set()
    if VERSION in ours and sorted(p.name for p in (target / VERSION).iterdir()) not in ([], [MODEL_FILE]):
        ours.discard(VERSION)  # someone put their own files into our version folder
    foreign = [n for n in names if n not in ours and n not in KEEP_FILES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        why = "holds files vae-deploy did not write" if ours else f"was not written by vae-deploy (no {MARKER})"
        raise ExportError(
            f"refusing to replace model folder {target}: it {why} ({shown}); choose another --name or move them away"
        )
    return [n for n in names if n in KEEP_FILES]


def _install(target: Path, kept: list[str], files: dict[str, bytes]) -> None:
    """Build the model folder beside ``target`` and swap it in as a unit (old or new, never a mix)."""
    staging = folder_sibling(target, "staging")
    try:
        staging.mkdir()
        for rel, data in files.items():
            atomic_write(staging / rel, data)
        for name in kept:  # the user's README etc.: linked (else copied) into the new folder
            try:
                os.link(target / name, staging / name)
            except OSError:
                shutil.copy2(target / name, staging / name)
        swap_folder_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old folder after an exchange, or a failed build


def docker_command(repo: str | os.PathLike, kind: str = "gpu", tag: str = "25.01-py3") -> str:
    """The one ``docker run`` line that serves ``repo`` with NVIDIA's Triton container."""
    gpus = "--gpus all " if kind == "gpu" else ""
    return (
        f"docker run {gpus}--rm -p 8000:8000 -p 8001:8001 -p 8002:8002 "
        f"-v {Path(repo).resolve()}:/models nvcr.io/nvidia/tritonserver:{tag} "
        "tritonserver --model-repository=/models"
    )

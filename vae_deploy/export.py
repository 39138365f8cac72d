"""Export a checkpoint's encoder and decoder as separate graphs (ONNX, TorchScript, torch.export).

Each graph's I/O (names, shapes, dynamic batch axis, example inputs) is declared once, in a
``GraphSpec``; every format and the manifest are generated from it. The export is built in a
temporary folder next to the target, verified there against eager PyTorch, given its manifest
last, and only then moved into place: a failed or broken export never replaces or resembles a
good one. See docs/CONTRACT.md for the folder layout and exported/README.md for the I/O contract.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vae_deploy import __version__
from vae_deploy.checkpoint import model_from_state, read_checkpoint
from vae_deploy.config import ModelConfig, to_dict
from vae_deploy.errors import ExportError, ParityError, UsageError
from vae_deploy.files import sha256_file
from vae_deploy.manifest import (
    EXPORT_FILES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META_FORMAT_VERSION,
    META_GRAPH,
    META_IMAGE_SHAPE,
    META_LATENT_DIM,
    META_PRECISION,
    META_PRODUCER_VERSION,
    META_VALUE_RANGE,
    read_manifest,
)
from vae_deploy.model import VAE

FORMATS = ("onnx", "torchscript", "pt2")
DEFAULT_FORMATS = ("onnx", "torchscript")
EXAMPLE_BATCH = 2  # torch.export specialises example sizes 0 and 1, so trace with 2
VALUE_RANGE = (0.0, 1.0)
MIN_OPSET = 18  # the dynamo exporter implements opset >= 18; its down-conversion to 17 breaks Split
KEEP_FILES = ("README.md", ".gitignore", ".gitkeep")  # may sit in an output folder before any export
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript", "pt2": ".pt2"}


# --- the I/O declaration of each graph ----------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. ``shape[0]`` is the dynamic axis ``"batch"``; ``value_range`` is None
    for unbounded values (latents), else the closed interval the values lie in."""

    name: str
    shape: tuple[str | int, ...]
    value_range: tuple[float, float] | None = None
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.value_range is not None:
            out["range"] = list(self.value_range)
        return out

    def example(self, batch: int, generator: torch.Generator) -> Tensor:
        """An example value: uniform in ``value_range``, else standard normal (latents)."""
        size = (batch, *self.shape[1:])
        if self.value_range is None:
            return torch.randn(size, generator=generator)
        lo, hi = self.value_range
        return lo + (hi - lo) * torch.rand(size, generator=generator)


@dataclass(frozen=True)
class GraphSpec:
    """Everything every exporter and the manifest need to know about one graph, in one place."""

    name: str  # "encoder" | "decoder": also the VAE attribute holding the module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def module(self, model: VAE) -> nn.Module:
        return getattr(model, self.name)

    def example_inputs(self, batch: int = EXAMPLE_BATCH, seed: int = 0) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(t.example(batch, g) for t in self.inputs)

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """torch.export dynamic shapes: axis 0 of every input is the shared, named batch axis."""
        batch = torch.export.Dim("batch", min=1)
        return tuple({0: batch} for _ in self.inputs)

    def io(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def graph_specs(cfg: ModelConfig) -> tuple[GraphSpec, GraphSpec]:
    """The encoder and decoder declarations of a model config."""
    image = ("batch", *cfg.image_shape)
    latent = ("batch", cfg.latent_dim)
    encoder = GraphSpec(
        "encoder",
        inputs=(TensorSpec("x", image, VALUE_RANGE),),
        outputs=(TensorSpec("mu", latent), TensorSpec("logvar", latent)),
    )
    decoder = GraphSpec(
        "decoder",
        inputs=(TensorSpec("z", latent),),
        outputs=(TensorSpec("x_hat", image, VALUE_RANGE),),
    )
    return encoder, decoder


# --- one function per format --------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep exporter chatter (deprecation warnings, opset-conversion logs) out of users' faces."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR + 10)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _metadata(model: Any, spec: GraphSpec, cfg: ModelConfig, precision: str) -> None:
    """Set the contract's metadata_props so an app with only onnxruntime can read them."""
    props = {
        META_GRAPH: spec.name,
        META_LATENT_DIM: str(cfg.latent_dim),
        META_IMAGE_SHAPE: json.dumps(list(cfg.image_shape)),
        META_VALUE_RANGE: json.dumps(list(VALUE_RANGE)),
        META_PRECISION: precision,
        META_PRODUCER_VERSION: __version__,
        META_FORMAT_VERSION: str(FORMAT_VERSION),
    }
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"vae-deploy {spec.name} ({precision}): {_signature(spec)}"


def _signature(spec: GraphSpec) -> str:
    def fmt(ts: tuple[TensorSpec, ...]) -> str:
        return ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in ts)

    return f"{fmt(spec.inputs)} -> {fmt(spec.outputs)}"


def _save_onnx(model: Any, path: Path) -> None:
    """Write one self-contained file (weights inside) and run the full ONNX checker on it."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ExportError(f"{path.name} failed the ONNX checker: {first[:200]}") from None


def export_onnx(
    module: nn.Module, spec: GraphSpec, cfg: ModelConfig, path: Path, opset: int | None = None
) -> Any:
    """Export with the dynamo (torch.export-based) exporter; return the ONNX ModelProto written."""
    try:
        with _quiet():
            program = torch.onnx.export(
                module,
                spec.example_inputs(),
                dynamo=True,
                dynamic_shapes=spec.dynamic_shapes(),
                input_names=spec.input_names,
                output_names=spec.output_names,
                opset_version=opset,
                verbose=False,
            )
        model = program.model_proto
    except Exception as exc:  # noqa: BLE001 - exporter internals raise many types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export of the {spec.name} failed: {msg[:300]}") from None
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and got != opset:
        raise ExportError(
            f"the ONNX exporter could not produce opset {opset} for the {spec.name} (it made {got}); "
            f"use --opset {got} or higher"
        )
    _metadata(model, spec, cfg, "fp32")
    _save_onnx(model, path)
    return model


def export_onnx_fp16(model_fp32: Any, spec: GraphSpec, cfg: ModelConfig, path: Path) -> None:
    """Half-precision weights and arithmetic inside, float32 I/O (a drop-in for the fp32 file)."""
    import onnx
    import onnx_ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        half = convert_float_to_float16(
            onnx.ModelProto.FromString(model_fp32.SerializeToString()), keep_io_types=True
        )
        ir_model = onnx_ir.from_proto(half)
        ir_model.graph.sort()  # the converter appends its input Casts after their users
        half = onnx_ir.to_proto(ir_model)
    _metadata(half, spec, cfg, "fp16")
    _save_onnx(half, path)


def export_torchscript(module: nn.Module, spec: GraphSpec, path: Path) -> None:
    """Trace to TorchScript (deprecated upstream, still asked for); its FutureWarnings stay quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module, spec.example_inputs(), check_trace=False)
        torch.jit.save(traced, str(path))


def export_pt2(module: nn.Module, spec: GraphSpec, path: Path) -> None:
    """torch.export ExportedProgram with a dynamic batch axis (TorchScript's supported successor)."""
    with _quiet():
        program = torch.export.export(module, spec.example_inputs(), dynamic_shapes=spec.dynamic_shapes())
        torch.export.save(program, str(path))


# --- the export as a whole ----------------------------------------------------------------------


@dataclass
class ExportResult:
    """Where the export went, its manifest, the verification report (None with verify=False) and
    seconds taken per file (``"decoder.onnx"``-style keys) and for ``"verify"``."""

    out_dir: Path
    manifest: dict[str, Any]
    report: Any = None  # vae_deploy.parity.VerifyReport | None
    seconds: dict[str, float] = field(default_factory=dict)


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike = "exported",
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    opset: int | None = None,
    fp16: bool = False,
    verify: bool = True,
    data_root: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export a checkpoint's encoder and decoder to ``out`` (atomically) and verify them.

    Raises ``ParityError`` (and leaves ``out`` as it was) when an exported graph does not match
    eager PyTorch within tolerance.
    """
    formats = _check_formats(formats, fp16, opset)
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)
    model = model_from_state(state, str(checkpoint))
    cfg = model.config
    out_dir = Path(out)
    target = out_dir.resolve()
    _check_target(target)
    # A sibling of the target (same filesystem, so the final moves are renames); mkdir, not
    # mkdtemp, so the folder gets the user's usual permissions rather than 0700. The pid in the
    # name lets a later export sweep the staging folders of killed ones (_sweep_leftovers).
    staging = target.with_name(f".{target.name}.export-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    _sweep_leftovers(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        graphs, seconds, opset_used = _write_graphs(model, formats, opset, fp16, staging, log)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "producer": "vae-deploy",
            "producer_version": __version__,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "latent_dim": cfg.latent_dim,
            "image_shape": list(cfg.image_shape),
            "value_range": list(VALUE_RANGE),
            "model_config": to_dict(cfg),
            "checkpoint": {
                "path": str(checkpoint),
                "abs_path": str(checkpoint.resolve()),
                "sha256": sha256_file(checkpoint),
            },
            "training": {
                k: (state.get("train_config") or {}).get(k) for k in ("dataset", "binarize", "loss")
            },
            "opset": opset_used,
            "torch_version": torch.__version__,
            "graphs": graphs,
        }
        report = None
        if verify:
            from vae_deploy.parity import compare

            t0 = time.perf_counter()
            report = compare(
                staging, manifest, model, train_config=state.get("train_config"), data_root=data_root, log=log
            )
            seconds["verify"] = time.perf_counter() - t0
            if not report.passed:
                raise ParityError(
                    f"export failed verification ({report.summary()}); {out_dir} was not changed"
                )
            manifest["verification"] = {"passed": True, "summary": report.summary()}
        else:
            manifest["verification"] = {"passed": None, "summary": "not verified (--no-verify)"}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")  # last
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = sum(len(entries) for entries in graphs.values())
    took = sum(v for k, v in seconds.items() if k != "verify")
    checked = f", verified in {seconds['verify']:.1f} s" if "verify" in seconds else ", not verified"
    log(f"exported {files} files ({', '.join(formats)}) to {out_dir} in {took:.1f} s{checked}")
    return ExportResult(out_dir, manifest, report, seconds)


def _check_formats(formats: Sequence[str] | str, fp16: bool, opset: int | None) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [f for f in formats.replace(" ", "").split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UsageError(f"formats must be a non-empty subset of {', '.join(FORMATS)}; got {list(formats)}")
    if fp16 and "onnx" not in formats:
        raise UsageError("--fp16 adds a half-precision ONNX decoder, so it needs the onnx format")
    if opset is not None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
            raise UsageError(f"opset must be an integer from {MIN_OPSET} to {newest}; got {opset!r}")
    return tuple(f for f in FORMATS if f in formats)


def _write_graphs(
    model: VAE,
    formats: tuple[str, ...],
    opset: int | None,
    fp16: bool,
    folder: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, float], int | None]:
    """Write every requested file of both graphs into ``folder``; return their manifest entries."""
    cfg = model.config
    graphs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    opset_used = None
    for spec in graph_specs(cfg):
        module = spec.module(model)
        entries: dict[str, Any] = {}
        for fmt in formats:
            path = folder / f"{spec.name}{SUFFIX[fmt]}"
            t0 = time.perf_counter()
            if fmt == "onnx":
                onnx_model = export_onnx(module, spec, cfg, path, opset)
                opset_used = next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
            elif fmt == "torchscript":
                export_torchscript(module, spec, path)
            else:
                export_pt2(module, spec, path)
            seconds[f"{spec.name}.{fmt}"] = time.perf_counter() - t0
            entries[fmt] = _entry(path, spec, "fp32")
            if fmt == "onnx" and fp16 and spec.name == "decoder":
                path16 = folder / f"{spec.name}.fp16.onnx"
                t0 = time.perf_counter()
                export_onnx_fp16(onnx_model, spec, cfg, path16)
                seconds[f"{spec.name}.onnx-fp16"] = time.perf_counter() - t0
                entries["onnx-fp16"] = _entry(path16, spec, "fp16")
        graphs[spec.name] = entries
        timed = [f"{e['file']} {seconds[f'{spec.name}.{k}']:.1f} s" for k, e in entries.items()]
        log(f"{spec.name}: {', '.join(timed)}")
    return graphs, seconds, opset_used


def _entry(path: Path, spec: GraphSpec, precision: str) -> dict[str, Any]:
    return {"file": path.name, "sha256": sha256_file(path), "precision": precision, **spec.io()}


# --- atomic install -----------------------------------------------------------------------------


def _check_target(out: Path) -> None:
    """Only replace what we made: an absent or empty folder, an earlier export, or a fresh
    ``exported/`` holding just its README. Anything else is the user's and is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"cannot export to {out}: it exists and is not a folder")
    names = sorted(p.name for p in out.iterdir())
    if MANIFEST in names:
        try:
            read_manifest(out)
        except ExportError:
            raise ExportError(
                f"refusing to replace {out}: its {MANIFEST} is not a vae-deploy export manifest; "
                "choose another --out or remove the folder yourself"
            ) from None
        return
    foreign = [n for n in names if n not in KEEP_FILES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ExportError(
            f"refusing to export into {out}: it is not empty and has no {MANIFEST}, so it is not a "
            f"vae-deploy export folder (it holds {shown}); choose another --out or empty it"
        )


def _install(staging: Path, out: Path) -> None:
    """Swap the finished export into place as a unit: DIR holds either the old export or the new
    one, never a mix and never neither, even if the process is killed at any moment. Files in DIR
    that are not export files (e.g. README.md) are carried over: linked into the new export first.
    After the swap ``staging`` holds the old export (the caller removes it)."""
    if not out.exists():
        os.replace(staging, out)
        return
    for entry in sorted(out.iterdir()):
        if entry.name not in EXPORT_FILES:
            _carry(entry, staging / entry.name)
    if _exchange(staging, out):
        return
    # No atomic exchange (not Linux, or the filesystem lacks it): two renames. A kill between them
    # leaves the old export in the '.old-' folder, and the next export puts it back.
    aside = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(out, aside)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _carry(src: Path, dst: Path) -> None:
    """Put a user's file (or folder) in the new export too: a hard link where possible, else a copy."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
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


_LEFTOVER = re.compile(r"\.(export|old)-(\d+)-[0-9a-f]+")


def _sweep_leftovers(target: Path) -> None:
    """Remove the staging folders of killed exports beside ``target`` (their process is gone), and
    put back an old export that a kill between the two fallback renames left aside."""
    prefix = f".{target.name}"
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = _LEFTOVER.fullmatch(entry.name[len(prefix) :]) if entry.name.startswith(prefix) else None
        if found is None or not entry.is_dir() or _alive(int(found.group(2))):
            continue
        if found.group(1) == "old" and not target.exists():
            os.replace(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process exists (POSIX); elsewhere assume it does, so nothing is swept."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True

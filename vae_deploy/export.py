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
from vae_deploy.contract import (
    DECODER,
    GRAPHS,
    MANIFEST,
    PRECISION,
    FileEntry,
    GraphSpec,
    ModelSpec,
    TensorSpec,
    file_name,
    manifest_dict,
)
from vae_deploy.errors import ExportError, OutputDirError, ParityError, UsageError, first_line
from vae_deploy.files import atomic_write_text, pid_alive, sha256_file
from vae_deploy.manifest import read_manifest
from vae_deploy.model import VAE
from vae_deploy.outdir import check_output_dir
from vae_deploy.parity import compare

FORMATS = ("onnx", "torchscript", "pt2")
DEFAULT_FORMATS = ("onnx", "torchscript")
EXAMPLE_BATCH = 2  # torch.export specialises example sizes 0 and 1, so trace with 2
VALUE_RANGE = (0.0, 1.0)
MIN_OPSET = 18  # the dynamo exporter implements opset >= 18; its down-conversion to 17 breaks Split


# --- the contract of our models, and what torch needs from it -----------------------------------


def model_spec(cfg: ModelConfig, source: dict[str, Any] | None = None) -> ModelSpec:
    """The export contract of one of our models: vector latents, images in [0, 1]."""
    return ModelSpec((cfg.latent_dim,), tuple(cfg.image_shape), VALUE_RANGE, source=source or {})


def module_of(model: VAE, spec: GraphSpec) -> nn.Module:
    return getattr(model, spec.name)


def example_inputs(spec: GraphSpec, batch: int = EXAMPLE_BATCH, seed: int = 0) -> tuple[Tensor, ...]:
    """Example values: uniform in an input's value range (images), else standard normal (latents)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(_example(t, batch, g) for t in spec.inputs)


def _example(t: TensorSpec, batch: int, g: torch.Generator) -> Tensor:
    size = (batch, *t.row_shape)
    if t.value_range is None:
        return torch.randn(size, generator=g)
    lo, hi = t.value_range
    return lo + (hi - lo) * torch.rand(size, generator=g)


def dynamic_shapes(spec: GraphSpec) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes: axis 0 of every input is the shared, named batch axis."""
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in spec.inputs)


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


def _set_metadata(model: Any, spec: GraphSpec, contract: ModelSpec) -> None:
    """Set the contract's metadata_props so an app with only onnxruntime can read them."""
    props = contract.metadata(spec.name, spec.precision, __version__)
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"vae-deploy {spec.name} ({spec.precision}): {spec.signature()}"


def _save_onnx(model: Any, path: Path) -> None:
    """Write one self-contained file (weights inside) and run the full ONNX checker on it."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} failed the ONNX checker: {first_line(exc, 200)}") from None


def export_onnx(module: nn.Module, spec: GraphSpec, contract: ModelSpec, path: Path, opset: int | None = None) -> Any:
    """Export with the dynamo (torch.export-based) exporter; return the ONNX ModelProto written."""
    try:
        with _quiet():
            program = torch.onnx.export(
                module,
                example_inputs(spec),
                dynamo=True,
                dynamic_shapes=dynamic_shapes(spec),
                input_names=spec.input_names,
                output_names=spec.output_names,
                opset_version=opset,
                verbose=False,
            )
        model = program.model_proto
    except Exception as exc:  # noqa: BLE001 - exporter internals raise many types
        raise ExportError(f"ONNX export of the {spec.name} failed: {first_line(exc, 300)}") from None
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and got != opset:
        raise ExportError(
            f"the ONNX exporter could not produce opset {opset} for the {spec.name} (it made {got}); "
            f"use --opset {got} or higher"
        )
    _set_metadata(model, spec, contract)
    _save_onnx(model, path)
    return model


def export_onnx_fp16(model_fp32: Any, spec: GraphSpec, contract: ModelSpec, path: Path) -> None:
    """Half-precision weights and arithmetic inside, float32 I/O (a drop-in for the fp32 file)."""
    import onnx
    import onnx_ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        half = convert_float_to_float16(onnx.ModelProto.FromString(model_fp32.SerializeToString()), keep_io_types=True)
        ir_model = onnx_ir.from_proto(half)
        ir_model.graph.sort()  # the converter appends its input Casts after their users
        half = onnx_ir.to_proto(ir_model)
    _set_metadata(half, spec, contract)
    _save_onnx(half, path)


def export_torchscript(module: nn.Module, spec: GraphSpec, path: Path) -> None:
    """Trace to TorchScript (deprecated upstream, still asked for); its FutureWarnings stay quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example_inputs(spec), check_trace=False)
        torch.jit.save(traced, str(path))


def export_pt2(module: nn.Module, spec: GraphSpec, path: Path) -> None:
    """torch.export ExportedProgram with a dynamic batch axis (TorchScript's supported successor)."""
    with _quiet():
        program = torch.export.export(module, example_inputs(spec), dynamic_shapes=dynamic_shapes(spec))
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
    int8: bool | Any = False,  # True or a vae_deploy.quantize.Int8Gate; None/False: no int8 file
    verify: bool = True,
    data_root: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export a checkpoint's encoder and decoder to ``out`` (atomically) and verify them.

    ``int8`` (True or a ``vae_deploy.quantize.Int8Gate``) also writes ``decoder.int8.onnx``,
    checked against the fp32 decoder by the gate (vae_deploy.quantize). Raises ``ParityError`` (and
    leaves ``out`` as it was) when an exported graph does not match eager PyTorch within tolerance
    or the int8 decoder fails its gate.
    """
    formats = _check_formats(formats, fp16 or bool(int8), opset)
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)
    model = model_from_state(state, str(checkpoint))
    out_dir = Path(out)
    target = out_dir.resolve()
    new_files = {file_name(g, f) for g in GRAPHS for f in formats} | (
        {file_name(DECODER, "onnx-fp16")} if fp16 else set()
    )
    if int8:
        from vae_deploy.quantize import Int8Gate, add_int8_decoder

        gate = int8 if isinstance(int8, Int8Gate) else Int8Gate()
        new_files.add(file_name(DECODER, "onnx-int8"))
    _sweep_leftovers(target)  # first: it may put back an old export a killed install left aside
    ours = _check_target(target, new_files)
    source = {
        "kind": "checkpoint",
        "path": os.path.relpath(checkpoint.resolve(), target),  # found from the export folder
        "abs_path": str(checkpoint.resolve()),
        "sha256": sha256_file(checkpoint),
    }
    contract = model_spec(model.config, source)
    # A sibling of the target (same filesystem, so the final moves are renames); mkdir, not
    # mkdtemp, so the folder gets the user's usual permissions rather than 0700. The pid in the
    # name lets a later export sweep the staging folders of killed ones (_sweep_leftovers).
    staging = target.with_name(f".{target.name}.export-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        files, seconds, opset_used = _write_graphs(model, contract, formats, opset, fp16, staging, log)
        extra = {}
        if int8:  # quantized from the fp32 decoder just written, gated against it, verified with the rest
            t0 = time.perf_counter()
            entry, check = add_int8_decoder(staging, files, contract, gate, log)
            files.append(entry)
            seconds[f"{DECODER}.onnx-int8"] = time.perf_counter() - t0
            extra["int8"] = check.to_dict()
        manifest = manifest_dict(
            contract,
            files,
            producer="vae-deploy",
            producer_version=__version__,
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            model_config=to_dict(model.config),
            training={k: (state.get("train_config") or {}).get(k) for k in ("dataset", "binarize", "loss")},
            opset=opset_used,
            torch_version=torch.__version__,
            **extra,
        )
        report = None
        if verify:
            t0 = time.perf_counter()
            report = compare(
                staging, files, model, train_config=state.get("train_config"), data_root=data_root, log=log
            )
            seconds["verify"] = time.perf_counter() - t0
            if not report.passed:
                raise ParityError(f"export failed verification ({report.summary()}); {out_dir} was not changed")
            manifest["verification"] = {"passed": True, "summary": report.summary()}
        else:
            manifest["verification"] = {"passed": None, "summary": "not verified (--no-verify)"}
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last
        _install(staging, target, ours)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    took = sum(v for k, v in seconds.items() if k != "verify")
    checked = f", verified in {seconds['verify']:.1f} s" if "verify" in seconds else ", not verified"
    log(f"exported {len(files)} files ({', '.join(formats)}) to {out_dir} in {took:.1f} s{checked}")
    return ExportResult(out_dir, manifest, report, seconds)


def _check_formats(formats: Sequence[str] | str, fp16: bool, opset: int | None) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [f for f in formats.replace(" ", "").split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UsageError(f"formats must be a non-empty subset of {', '.join(FORMATS)}; got {list(formats)}")
    if fp16 and "onnx" not in formats:
        raise UsageError("--fp16 and --int8 derive a decoder from the ONNX one, so each needs the onnx format")
    if opset is not None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
            raise UsageError(f"opset must be an integer from {MIN_OPSET} to {newest}; got {opset!r}")
    return tuple(f for f in FORMATS if f in formats)


def _write_graphs(
    model: VAE,
    contract: ModelSpec,
    formats: tuple[str, ...],
    opset: int | None,
    fp16: bool,
    folder: Path,
    log: Callable[[str], None],
) -> tuple[list[FileEntry], dict[str, float], int | None]:
    """Write every requested file of both graphs into ``folder``; return their manifest entries."""
    files: list[FileEntry] = []
    seconds: dict[str, float] = {}
    opset_used = None
    for graph in (contract.encoder(), contract.decoder()):
        module = module_of(model, graph)
        wanted = [f for f in formats] + (["onnx-fp16"] if fp16 and graph.name == DECODER else [])
        for fmt in wanted:
            spec = contract.graph(graph.name, PRECISION[fmt])
            path = folder / file_name(graph.name, fmt)
            t0 = time.perf_counter()
            if fmt == "onnx":
                onnx_model = export_onnx(module, spec, contract, path, opset)
                opset_used = next(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx"))
            elif fmt == "onnx-fp16":
                export_onnx_fp16(onnx_model, spec, contract, path)
            elif fmt == "torchscript":
                export_torchscript(module, spec, path)
            else:
                export_pt2(module, spec, path)
            seconds[f"{graph.name}.{fmt}"] = time.perf_counter() - t0
            files.append(FileEntry(graph.name, fmt, path.name, sha256_file(path), spec))
        timed = [f"{e.file} {seconds[f'{graph.name}.{e.format}']:.1f} s" for e in files if e.graph == graph.name]
        log(f"{graph.name}: {', '.join(timed)}")
    return files, seconds, opset_used


# --- atomic install -----------------------------------------------------------------------------


def _check_target(out: Path, new_files: set[str]) -> set[str]:
    """The one output-folder rule (vae_deploy.outdir): only an absent or empty folder, an earlier
    export, or one holding just README.md/.gitignore/.gitkeep. Returns the names the earlier export
    owns (its listed files and manifest): everything else in the folder is the user's, is kept,
    and may not share a name with a file the new export writes."""
    if not check_output_dir(out, "export"):
        return set()
    ours = {e.file for e in read_manifest(out).files} | {MANIFEST}
    clash = sorted((set(p.name for p in out.iterdir()) - ours) & (new_files | {MANIFEST}))
    if clash:
        raise OutputDirError(
            f"refusing to export into {out}: {', '.join(clash)} there is not a file of the earlier export "
            "(it is not in its manifest), and the new export would replace it; move it away first"
        )
    return ours


def _install(staging: Path, out: Path, ours: set[str]) -> None:
    """Swap the finished export into place as a unit: DIR holds either the old export or the new
    one, never a mix and never neither, even if the process is killed at any moment. Everything in
    DIR that the old export did not own (README.md, the user's notes) is carried over: linked into
    the new export first. After the swap ``staging`` holds the old export (the caller removes it)."""
    if not out.exists():
        os.replace(staging, out)
        return
    for entry in sorted(out.iterdir()):
        if entry.name not in ours:
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
        if found is None or not entry.is_dir() or pid_alive(int(found.group(2))):
            continue
        if found.group(1) == "old" and not target.exists():
            os.replace(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)

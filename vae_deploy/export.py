"""Export a checkpoint's encoder and decoder as separate graphs (ONNX, TorchScript, torch.export),
and the one pipeline every exporter goes through (:func:`write_export`).

Each graph's I/O (names, shapes, dynamic axes) is declared once, in a ``GraphSpec``; every format
and the manifest are generated from it (the writers are in graph_files.py). The export is built in
a temporary folder next to the target, verified there against eager PyTorch, given its manifest
last, and only then moved into place: a failed or broken export never replaces or resembles a
good one. Other VAEs (any torch modules, diffusers folders, factories) come through
export_modules.py onto the same pipeline. See docs/CONTRACT.md for the folder layout.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from vae_deploy import __version__, graph_files
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
    Tolerance,
    file_name,
    manifest_dict,
)
from vae_deploy.errors import ExportError, OutputDirError, ParityError, UsageError
from vae_deploy.files import atomic_write_text, folder_sibling, sha256_file, swap_folder_in, sweep_folder_leftovers
from vae_deploy.graph_files import KeepFp32, Traced, batch_dynamic, example_inputs
from vae_deploy.manifest import read_manifest
from vae_deploy.model import VAE
from vae_deploy.outdir import check_output_dir
from vae_deploy.parity import checkpoint_reference, compare

FORMATS = ("onnx", "torchscript", "pt2")
DEFAULT_FORMATS = ("onnx", "torchscript")
VALUE_RANGE = (0.0, 1.0)
MIN_OPSET = 18  # the dynamo exporter implements opset >= 18; its down-conversion to 17 breaks Split

Verifier = Callable[[Path, list[FileEntry], dict[str, Any]], Any]  # (staging, files, export notes) -> VerifyReport
KeepRule = KeepFp32 | Callable[[Any], KeepFp32]  # fixed, or from the fp32 decoder's ModelProto


# --- the contract of our models, and what torch needs from it -----------------------------------


def model_spec(cfg: ModelConfig, source: dict[str, Any] | None = None) -> ModelSpec:
    """The export contract of one of our models: vector latents, images in [0, 1]."""
    return ModelSpec((cfg.latent_dim,), tuple(cfg.image_shape), VALUE_RANGE, source=source or {})


def traced_graph(model: VAE, spec: GraphSpec) -> Traced:
    """One of our model's graphs with example inputs and a dynamic batch axis."""
    return Traced(getattr(model, spec.name), example_inputs(spec), batch_dynamic(spec))


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
    int8: bool | Any = False,
    verify: bool = True,
    data_root: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export a checkpoint's encoder and decoder to ``out`` (atomically) and verify them.

    ``int8`` (True or a ``vae_deploy.quantize.Int8Gate``) also writes ``decoder.int8.onnx``,
    quantized from the fp32 decoder and gated against it. Raises ``ParityError`` (and leaves ``out``
    as it was) when an exported graph does not match eager PyTorch within tolerance, or the int8
    decoder fails its gate.
    """
    formats = check_formats(formats, fp16 or bool(int8), opset)
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)
    model = model_from_state(state, str(checkpoint)).eval()
    source = {
        "kind": "checkpoint",
        **source_paths(checkpoint, out),
        "sha256": sha256_file(checkpoint),
    }
    contract = model_spec(model.config, source)
    graphs = {g: traced_graph(model, contract.graph(g)) for g in GRAPHS}

    def check(folder: Path, files: list[FileEntry], notes: dict[str, Any]) -> Any:
        reference = checkpoint_reference(model, state.get("train_config"), data_root)
        return compare(folder, files, reference, log=log)

    extra = {
        "model_config": to_dict(model.config),
        "training": {k: (state.get("train_config") or {}).get(k) for k in ("dataset", "binarize", "loss")},
    }
    return write_export(
        out, contract, graphs, formats=formats, opset=opset, fp16=fp16, int8=int8,
        verify=check if verify else None, extra=extra, log=log,
    )  # fmt: skip


def source_paths(path: Path, out: str | os.PathLike) -> dict[str, str]:
    """A source file or folder as the manifest records it: relative to the export folder (found
    from any working folder) and absolute (the fallback)."""
    return {"path": os.path.relpath(path.resolve(), Path(out).resolve()), "abs_path": str(path.resolve())}


def write_export(
    out: str | os.PathLike,
    contract: ModelSpec,
    graphs: dict[str, Traced],
    *,
    formats: Sequence[str] = ("onnx",),
    opset: int | None = None,
    fp16: bool = False,
    fp16_keep: KeepRule = KeepFp32(),
    int8: bool | Any = False,
    tolerances: dict[tuple[str, str], Tolerance] | None = None,
    verify: Verifier | None = None,
    extra: dict[str, Any] | None = None,
    verification: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """The pipeline every exporter shares: write ``graphs`` (name -> Traced) in ``formats`` into a
    staging folder beside ``out``, run ``verify`` there (a failing report raises ParityError and
    leaves ``out`` as it was), write the manifest last and swap the folder in atomically.

    ``tolerances`` maps (precision, graph) to the tolerance recorded for those files (else the
    contract's defaults); ``extra`` adds manifest fields; ``verification`` adds to its record.
    """
    formats = check_formats(formats, fp16 or bool(int8), opset)
    if (fp16 or int8) and DECODER not in graphs:
        raise UsageError("--fp16 and --int8 derive a decoder from the ONNX one, so they need a decoder")
    out_dir = Path(out)
    target = out_dir.resolve()
    new_files = {file_name(g, f) for g in graphs for f in formats}
    if fp16:
        new_files.add(file_name(DECODER, "onnx-fp16"))
    if int8:
        from vae_deploy.quantize import Int8Gate, add_int8_decoder

        gate = int8 if isinstance(int8, Int8Gate) else Int8Gate()
        new_files.add(file_name(DECODER, "onnx-int8"))
    sweep_folder_leftovers(target)  # first: it may put back an old export a killed install left aside
    ours = _check_target(target, new_files)
    # A sibling of the target (same filesystem, so the final moves are renames); mkdir, not
    # mkdtemp, so the folder gets the user's usual permissions rather than 0700. The pid in the
    # name lets a later export sweep the staging folders of killed ones (sweep_folder_leftovers).
    staging = folder_sibling(target, "export")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise ExportError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        written = _write_graphs(contract, graphs, formats, opset, fp16, fp16_keep, tolerances or {}, staging, log)
        if int8:  # quantized from the fp32 decoder just written, gated against it, verified with the rest
            t0 = time.perf_counter()
            entry, check = add_int8_decoder(staging, written.files, contract, gate, log)
            written.files.append(entry)
            written.seconds[f"{DECODER}.onnx-int8"] = time.perf_counter() - t0
            written.notes["int8"] = check.to_dict()
        manifest = manifest_dict(
            contract,
            written.files,
            producer="vae-deploy",
            producer_version=__version__,
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **(extra or {}),
            opset=written.opset,
            torch_version=torch.__version__,
        )
        if written.notes:
            manifest.setdefault("export", {}).update(written.notes)
        seconds = written.seconds
        report = None
        if verify is not None:
            t0 = time.perf_counter()
            report = verify(staging, written.files, written.notes)
            seconds["verify"] = time.perf_counter() - t0
            if not report.passed:
                raise ParityError(f"export failed verification ({report.summary()}); {out_dir} was not changed")
            manifest["verification"] = {"passed": True, "summary": report.summary(), **(verification or {})}
        else:
            manifest["verification"] = {
                "passed": None, "summary": "not verified (--no-verify)", **(verification or {})
            }  # fmt: skip
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last
        _install(staging, target, ours)
    finally:  # the manifest first: a half-removed folder must never look like an export
        (staging / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    took = sum(v for k, v in seconds.items() if k != "verify")
    checked = f", verified in {seconds['verify']:.1f} s" if "verify" in seconds else ", not verified"
    log(f"exported {len(written.files)} files ({', '.join(formats)}) to {out_dir} in {took:.1f} s{checked}")
    return ExportResult(out_dir, manifest, report, seconds)


def check_formats(formats: Sequence[str] | str, fp16: bool, opset: int | None) -> tuple[str, ...]:
    """The formats asked for, in canonical order (UsageError for unknown ones or a bad opset)."""
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


@dataclass
class _Written:
    files: list[FileEntry]
    seconds: dict[str, float]
    opset: int | None
    notes: dict[str, Any]  # the manifest's "export" record: proved ranges, fp32-kept nodes


def _write_graphs(
    contract: ModelSpec,
    graphs: dict[str, Traced],
    formats: tuple[str, ...],
    opset: int | None,
    fp16: bool,
    fp16_keep: KeepRule,
    tolerances: dict[tuple[str, str], Tolerance],
    folder: Path,
    log: Callable[[str], None],
) -> _Written:
    """Write every requested file of each graph into ``folder``; return their manifest entries."""
    done = _Written([], {}, None, {})
    for name in (g for g in GRAPHS if g in graphs):
        traced = graphs[name]
        wanted = list(formats) + (["onnx-fp16"] if fp16 and name == DECODER else [])
        onnx_file = None
        for fmt in wanted:
            precision = PRECISION[fmt]
            spec = contract.graph(name, precision, tolerances.get((precision, name)))
            path = folder / file_name(name, fmt)
            t0 = time.perf_counter()
            ranges = {}
            if fmt == "onnx":
                onnx_file = graph_files.export_onnx(traced, spec, contract, path, opset)
                done.opset, ranges = onnx_file.opset, onnx_file.proved_ranges
            elif fmt == "onnx-fp16":
                keep = fp16_keep(onnx_file.model) if callable(fp16_keep) else fp16_keep
                graph_files.export_onnx_fp16(onnx_file.model, spec, contract, path, keep)
                if keep:
                    done.notes["fp16_keep_fp32"] = keep.to_dict()
                    log(f"{path.name}: {len(keep.nodes)} nodes and ops {list(keep.op_types)} kept in fp32")
            elif fmt == "torchscript":
                graph_files.export_torchscript(traced, spec, path)
            else:
                ranges = graph_files.export_pt2(traced, spec, path)
            done.seconds[f"{name}.{fmt}"] = time.perf_counter() - t0
            done.files.append(FileEntry(name, fmt, path.name, sha256_file(path), spec))
            if ranges:
                done.notes.setdefault("proved_ranges", {})[path.name] = {k: list(v) for k, v in ranges.items()}
                shown = ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in ranges.items())
                log(f"{path.name}: torch.export proved the graph for {shown} only (the model branches on that size)")
        timed = [f"{e.file} {done.seconds[f'{name}.{e.format}']:.1f} s" for e in done.files if e.graph == name]
        log(f"{name}: {', '.join(timed)}")
    return done


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
    """Swap the finished export into place as a unit (``files.swap_folder_in``: DIR holds either the
    old export or the new one, whenever a kill comes). Everything in DIR that the old export did
    not own (README.md, the user's notes) is carried over: linked into the new export first. After
    the swap ``staging`` holds the old export (the caller removes it)."""
    if out.exists():
        for entry in sorted(out.iterdir()):
            if entry.name not in ours:
                _carry(entry, staging / entry.name)
    swap_folder_in(staging, out)


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

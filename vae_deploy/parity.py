"""Prove that exported graphs compute what eager PyTorch computes: ``vae-deploy verify``.

Every file in an export folder runs on every backend that can run it (ONNX on onnxruntime's CPU
provider and, where a CUDA session really runs, its CUDA provider; TorchScript; torch.export) on
real inputs at several batch sizes (and, for exports with dynamic height and width, several image
sizes), and each output is compared with the eager model rebuilt from the export's source
(references.py: our checkpoint, a diffusers folder, or a factory and its weights). The manifest's
sha256s are checked before anything is loaded.

fp16 files are also checked for overflow: the activations of the fp32 graph on the same inputs
that the fp16 file stores in fp16 must stay below 65504 (fp16_range.py), and non-finite outputs
fail; both name the ways out (fp32, an fp16-safe VAE, or ops kept in fp32).

Pass rule per output: ``|exported - eager| <= atol + rtol * |eager|`` element-wise (numpy
``allclose``), with the tolerances below. ``max_rel`` in the report is the largest absolute error
divided by the largest ``|eager|`` value of that output (a scale-free error that stays meaningful
for the many near-zero pixels of a sigmoid output).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_deploy import references, sessions
from vae_deploy.contract import TORCH_FORMATS, FileEntry, Tolerance
from vae_deploy.errors import ExportError, ProviderError
from vae_deploy.files import atomic_write_text
from vae_deploy.manifest import check_manifest, read_verified
from vae_deploy.references import DEFAULT_BATCH_SIZES, Reference, checkpoint_reference

__all__ = ["VerifyReport", "VerifyRow", "checkpoint_reference", "compare", "verify"]


# --- the report ---------------------------------------------------------------------------------


@dataclass
class VerifyRow:
    """One comparison: a graph file on one backend/provider at one batch size, for one output."""

    graph: str  # encoder | decoder
    format: str  # onnx | onnx-fp16 | torchscript | pt2
    backend: str  # onnxruntime | torch.jit | torch.export
    precision: str  # fp32 | fp16
    provider: str  # CPUExecutionProvider | CUDAExecutionProvider | torch-cpu
    output: str  # output name, "*" when the backend did not run
    atol: float
    rtol: float
    status: str  # pass | fail | skipped
    batch_size: int | None = None  # None for a skipped or failed-to-load backend
    max_abs: float | None = None
    max_rel: float | None = None
    reason: str = ""  # why skipped or failed, or a note on what a pass means
    size: str = ""  # image HxW, for exports with dynamic height and width


@dataclass
class VerifyReport:
    """All comparisons of one export folder. ``passed``: nothing failed and something ran."""

    passed: bool
    rows: list[VerifyRow]
    export_dir: str = ""
    checkpoint: str = ""
    inputs: str = ""
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    notes: list[str] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)  # image sizes compared at (dynamic-size exports)

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "skipped": 0}
        for row in self.rows:
            out[row.status] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        text = f"{c['pass']} checks passed, {c['fail']} failed, {c['skipped']} skipped"
        failed: dict[str, str] = {}
        for r in self.rows:
            where = f"{r.graph} {r.format} on {r.provider}"
            if r.status == "fail" and where not in failed:
                failed[where] = f"{where}: {r.reason[:120]}" if r.reason else where
        return text + (f" (failed: {'; '.join(failed.values())})" if failed else "")

    def table(self) -> str:
        """One line per graph/format/provider/output (and image size), worst case over the batch sizes."""
        sized = any(r.size for r in self.rows)
        groups: dict[tuple, list[VerifyRow]] = {}
        for r in self.rows:
            groups.setdefault((r.graph, r.format, r.precision, r.provider, r.output, r.size), []).append(r)
        head = tuple("graph format prec provider output size batches max_abs max_rel tolerance status".split())
        lines = [head]
        for (graph, fmt, prec, provider, output, size), rows in groups.items():
            status = "fail" if any(r.status == "fail" for r in rows) else rows[0].status
            ran = [r for r in rows if r.max_abs is not None]
            batches = ",".join(str(r.batch_size) for r in rows if r.batch_size is not None) or "-"
            max_abs = f"{max(r.max_abs for r in ran):.2e}" if ran else "-"
            max_rel = f"{max(r.max_rel for r in ran):.2e}" if ran else "-"
            tol = str(Tolerance(rows[0].atol, rows[0].rtol))
            provider = provider.replace("ExecutionProvider", "")
            stats = (batches, max_abs, max_rel, tol, status.upper())
            lines.append((graph, fmt, prec, provider, output, size or "-", *stats))
        if not sized:  # fixed-size models: no size column
            lines = [line[:5] + line[6:] for line in lines]
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
        text = ["  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        by_reason: dict[str, list[str]] = {}
        for r in self.rows:
            where = f"{r.graph} {r.format} on {r.provider.replace('ExecutionProvider', '')}"
            if r.reason and where not in by_reason.setdefault(r.reason, []):
                by_reason[r.reason].append(where)
        notes = [f"{', '.join(where)}: {reason}" for reason, where in by_reason.items()]
        footer = [
            f"inputs: {self.inputs}",
            *self.notes,
            *notes,
            f"result: {'PASS' if self.passed else 'FAIL'}: {self.summary()}",
        ]
        return "\n".join(text + footer)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_sizes"] = list(self.batch_sizes)
        out["summary"] = self.summary()
        return out


# --- backends -----------------------------------------------------------------------------------

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class _Backend:
    backend: str
    provider: str
    run: Runner | None = None
    skipped: str = ""  # why it cannot run here (not a failure)
    error: str = ""  # why it failed to load (a failure)
    note: str = ""


def _onnx_backends(export_dir: Path, entry: FileEntry) -> list[_Backend]:
    """The CPU session, and a CUDA session only if one really runs (TF32 off: fp32 is checked)."""
    name = f"{entry.file} in {export_dir}"
    model = read_verified(export_dir, entry)

    def runner(session: Any) -> Runner:
        names = entry.spec.output_names
        return lambda feeds: dict(zip(names, session.run(names, feeds)))

    cpu_note = (
        "onnxruntime's CPU provider computes fp16 nodes in fp32 (it inserts Casts), so this checks "
        "the file and its fp16-rounded weights, not fp16 arithmetic"
        if entry.precision == "fp16"
        else ""
    )
    out = []
    try:
        cpu = sessions.cpu_session(model, name)
        sessions.check_signature(cpu, entry.spec, name)
        out.append(_Backend("onnxruntime", sessions.CPU, runner(cpu), note=cpu_note))
    except ExportError as exc:
        out.append(_Backend("onnxruntime", sessions.CPU, error=str(exc)))
    cuda = _Backend("onnxruntime", sessions.CUDA)
    try:
        cuda.run = runner(sessions.cuda_session(model, name, tf32=False))
    except ProviderError as exc:
        cuda.skipped = exc.reason
    out.append(cuda)
    return out


def _torch_backend(path: Path, fmt: str, entry: FileEntry) -> _Backend:
    backend = "torch.jit" if fmt == "torchscript" else "torch.export"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "torchscript":
                module = torch.jit.load(str(path), map_location="cpu")
            else:
                module = torch.export.load(str(path)).module()
    except Exception as exc:  # noqa: BLE001
        return _Backend(backend, "torch-cpu", error=f"cannot load it: {str(exc).strip()[:200]}")
    in_names, out_names = entry.spec.input_names, entry.spec.output_names

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            result = module(*(torch.from_numpy(feeds[n]) for n in in_names))
        result = result if isinstance(result, (tuple, list)) else (result,)
        return {n: r.numpy() for n, r in zip(out_names, result)}

    return _Backend(backend, "torch-cpu", run)


def _backends(export_dir: Path, entry: FileEntry) -> list[_Backend]:
    if entry.format.startswith("onnx"):
        return _onnx_backends(export_dir, entry)
    if entry.format in ("torchscript", "pt2"):
        return [_torch_backend(export_dir / entry.file, entry.format, entry)]
    return [_Backend("?", "?", skipped=f"unknown format {entry.format!r} (newer vae-deploy?)")]


# --- comparisons ---------------------------------------------------------------------------------


def _compare_output(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> tuple[float, float, bool, str]:
    if got.shape != ref.shape:
        return float("inf"), float("inf"), False, f"shape {list(got.shape)} != eager {list(ref.shape)}"
    if not np.all(np.isfinite(got)):
        return float("inf"), float("inf"), False, "non-finite values in the output"
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(err.max(initial=0.0))
    max_rel = max_abs / max(float(np.abs(ref).max(initial=0.0)), 1e-12)
    ok = bool(np.all(err <= tol.atol + tol.rtol * np.abs(ref)))
    return max_abs, max_rel, ok, ""


Feeds = dict[tuple[str, int], tuple[dict, dict]]


def _check(entry: FileEntry, backend: _Backend, feeds: Feeds, reference: Reference) -> list[VerifyRow]:
    """The rows of one file on one backend: each case x each output (or one skip/fail row)."""
    tol = entry.spec.tolerance
    fp16 = entry.precision == "fp16"

    def row(output: str = "*", **kw: Any) -> VerifyRow:
        where = dict(graph=entry.graph, format=entry.format, backend=backend.backend, precision=entry.precision)
        return VerifyRow(**where, provider=backend.provider, output=output, atol=tol.atol, rtol=tol.rtol, **kw)

    if backend.run is None:
        return [row(status="fail" if backend.error else "skipped", reason=backend.error or backend.skipped)]
    rows = []
    limit = reference.proved_ranges.get(entry.file, {}).get("batch", [1, None])[1]
    for i, case in enumerate(reference.cases):
        if (entry.graph, i) not in feeds:
            continue  # a case for the other graph
        at = dict(batch_size=case.batch, size=case.label)
        if entry.format in TORCH_FORMATS and limit is not None and case.batch > limit:
            why = f"torch.export proved this file for batch <= {limit} only, and it refuses larger batches"
            rows.append(row(**at, status="skipped", reason=why))
            continue
        inputs, expected = feeds[(entry.graph, i)]
        try:
            got = backend.run(inputs)
        except Exception as exc:  # noqa: BLE001 - a graph that cannot run at this batch size fails
            rows.append(row(**at, status="fail", reason=f"run failed: {sessions.ort_message(exc)}"))
            continue
        for name in entry.spec.output_names:
            if name not in got or name not in expected:
                rows.append(row(name, **at, status="fail", reason=f"no output {name!r}"))
                continue
            max_abs, max_rel, ok, why = _compare_output(got[name], expected[name], tol)
            if why and fp16 and "non-finite" in why:
                from vae_deploy.fp16_range import CHOICES

                why = f"non-finite values in the fp16 output (fp16 overflow); {CHOICES}"
            stats = dict(max_abs=max_abs, max_rel=max_rel)
            rows.append(row(name, **at, **stats, status="pass" if ok else "fail", reason=why or backend.note))
    return rows


def _fp16_range_rows(
    export_dir: Path, entry: FileEntry, files: Sequence[FileEntry], feeds: Feeds, reference: Reference
) -> list[VerifyRow]:
    """Per case, for an fp16 file: do the activations it stores in fp16 stay within fp16's range?
    (Measured on the fp32 graph, so the verdict does not depend on the device.)"""
    from vae_deploy import fp16_range

    row = dict(graph=entry.graph, format=entry.format, backend="onnxruntime", precision="fp16",
               provider="fp32 activations", output="range", atol=fp16_range.FP16_MAX, rtol=0.0)  # fmt: skip
    fp32 = next((e for e in files if e.graph == entry.graph and e.format == "onnx"), None)
    if fp32 is None:
        return [VerifyRow(**row, status="skipped", reason="no fp32 ONNX file to measure activations on")]
    probe = fp16_range.ActivationProbe(read_verified(export_dir, fp32), fp32.file)
    in_fp16 = fp16_range.fp16_tensors(read_verified(export_dir, entry))
    rows = []
    for i, case in enumerate(reference.cases):
        if (entry.graph, i) not in feeds:
            continue
        peaks = probe.peaks(feeds[(entry.graph, i)][0])
        found = fp16_range.overflows(peaks, in_fp16)
        top = found[0].peak if found else max((p.peak for p in peaks if p.tensor in in_fp16), default=0.0)
        why = fp16_range.advice(found) if found else (
            "peak |activation| stored in fp16 (fp16 overflows above 65504; max_rel is the share of that)"
        )  # fmt: skip
        stats = dict(batch_size=case.batch, size=case.label, max_abs=top, max_rel=top / fp16_range.FP16_MAX)
        rows.append(VerifyRow(**row, **stats, status="fail" if found else "pass", reason=why))
    return rows


# --- verify -------------------------------------------------------------------------------------


def compare(
    export_dir: str | os.PathLike,
    files: Sequence[FileEntry],
    reference: Reference,
    *,
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Compare every listed file in ``export_dir`` with the eager ``reference`` on its cases, each
    against the tolerance its entry records (and fp16 files against fp16's range).

    Does not check integrity (``verify`` does, first; ``export`` compares files it just wrote).
    """
    export_dir = Path(export_dir)
    feeds = reference.feeds()
    rows = [
        row
        for entry in files
        for backend in _backends(export_dir, entry)
        for row in _check(entry, backend, feeds, reference)
    ]
    for entry in files:
        if entry.precision == "fp16" and entry.format.startswith("onnx"):
            rows += _fp16_range_rows(export_dir, entry, files, feeds, reference)
    ran = any(r.status == "pass" for r in rows)
    passed = ran and not any(r.status == "fail" for r in rows)
    batches = tuple(dict.fromkeys(c.batch for c in reference.cases))
    report = VerifyReport(passed, rows, str(export_dir), inputs=reference.inputs, batch_sizes=batches)
    report.sizes = list(dict.fromkeys(c.label for c in reference.cases if c.label))
    report.checkpoint = reference.source
    if not ran:
        report.notes.append("nothing could be run, so nothing was verified")
    log(report.table())
    return report


def verify(
    export_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
    modules: tuple[Any, Any] | None = None,
    json_path: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Check the folder's integrity, then compare every exported graph with eager PyTorch.

    The eager model is rebuilt from the manifest's source (``checkpoint`` overrides it: another
    checkpoint, diffusers folder or weights file; ``modules=(encoder, decoder)`` gives it directly).
    ``batch_sizes`` and ``sizes`` (image (H, W) pairs, for dynamic-size exports) default to our
    models' (1, 7, 256), or to those recorded at export. Returns the report (``report.passed``);
    raises ``IntegrityError``/``ExportError`` for a tampered or unusable folder. ``json_path``
    also writes ``report.to_dict()`` as JSON.
    """
    manifest = check_manifest(export_dir)  # before anything is loaded
    reference = references.for_export(
        export_dir, manifest, override=checkpoint, data_root=data_root, batch_sizes=batch_sizes, sizes=sizes,
        modules=modules,
    )  # fmt: skip
    if reference.note:
        log(reference.note)
    report = compare(export_dir, manifest.files, reference, log=log)
    if reference.note:
        report.notes.append(reference.note)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    return report

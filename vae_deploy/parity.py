"""Prove that exported graphs compute what eager PyTorch computes: ``vae-deploy verify``.

Every file in an export folder runs on every backend that can run it (ONNX on onnxruntime's CPU
provider and, where a CUDA session really runs, its CUDA provider; TorchScript; torch.export) on
real inputs at several batch sizes, and each output is compared with the eager model from the
source checkpoint. The manifest's sha256s are checked before anything is loaded.

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

from vae_deploy import sessions
from vae_deploy.checkpoint import model_from_state, read_checkpoint
from vae_deploy.config import to_dict
from vae_deploy.contract import DECODER, ENCODER, FileEntry, Tolerance
from vae_deploy.errors import ExportError, ProviderError, UsageError
from vae_deploy.files import atomic_write_text, sha256_file
from vae_deploy.manifest import check_manifest, read_verified, source_checkpoint
from vae_deploy.model import VAE

__all__ = ["VerifyReport", "VerifyRow", "compare", "verify"]

DEFAULT_BATCH_SIZES = (1, 7, 256)
SEED = 0


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
        """One line per graph/format/provider/output (worst case over the batch sizes)."""
        groups: dict[tuple, list[VerifyRow]] = {}
        for r in self.rows:
            groups.setdefault((r.graph, r.format, r.precision, r.provider, r.output), []).append(r)
        head = tuple("graph format prec provider output batches max_abs max_rel tolerance status".split())
        lines = [head]
        for (graph, fmt, prec, provider, output), rows in groups.items():
            status = "fail" if any(r.status == "fail" for r in rows) else rows[0].status
            ran = [r for r in rows if r.max_abs is not None]
            batches = ",".join(str(r.batch_size) for r in rows if r.batch_size is not None) or "-"
            max_abs = f"{max(r.max_abs for r in ran):.2e}" if ran else "-"
            max_rel = f"{max(r.max_rel for r in ran):.2e}" if ran else "-"
            tol = str(Tolerance(rows[0].atol, rows[0].rtol))
            provider = provider.replace("ExecutionProvider", "")
            lines.append((graph, fmt, prec, provider, output, batches, max_abs, max_rel, tol, status.upper()))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
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


# --- inputs and eager references ----------------------------------------------------------------


def _images(n: int, model: VAE, train_config: dict | None, data_root: Any) -> tuple[torch.Tensor, str]:
    """n real validation images of the checkpoint's dataset at the model's shape (MNIST for synthetic
    or unknown data), else seeded noise, with a line saying which and why."""
    from vae_deploy.config import DATASETS, NATIVE_SHAPES
    from vae_deploy.data import load_splits, resolve_data_root
    from vae_deploy.errors import VaeDeployError, printable

    shape = tuple(model.config.image_shape)
    trained = train_config or {}
    dataset = trained.get("dataset")
    dataset = dataset if dataset in DATASETS and dataset != "synthetic" else "mnist"
    if dataset == "folder":  # the folder it was trained on, unless another is given
        folder = data_root or trained.get("data_root")
        root = Path(folder) if folder else None
    else:
        root = resolve_data_root(data_root)
    why = "no data root (pass --data-root or set VAE_DEPLOY_DATA)"
    if dataset in NATIVE_SHAPES and NATIVE_SHAPES[dataset] != shape:
        why = f"model image shape {list(shape)} is not {dataset}'s"
    elif root is not None or dataset == "digits":
        try:
            splits = load_splits(dataset, root, image_shape=shape, train_limit=n, val_limit=n)
            pool = torch.cat([splits.val_x, splits.train_x])
            reps = -(-n // len(pool))
            where = f" from {printable(str(root))}" if root is not None else ""
            return pool.repeat(reps, 1, 1, 1)[:n].contiguous(), f"{dataset} images{where}"
        except VaeDeployError as exc:
            why = f"{dataset} not readable under {printable(str(root))}: {str(exc)[:120]}"
    g = torch.Generator().manual_seed(SEED)
    return torch.rand((n, *shape), generator=g), f"seeded uniform random images (seed {SEED}; {why})"


def _feeds(model: VAE, images: torch.Tensor, batch_sizes: Sequence[int]) -> dict[tuple[str, int], tuple[dict, dict]]:
    """Per (graph, batch): the named inputs and eager outputs. Decoder latents are the encoder
    means of the images (half) plus seeded N(0, I) draws (the other half)."""
    from vae_deploy.contract import IMAGE, LATENT, LOGVAR, MEAN, RECON

    g = torch.Generator().manual_seed(SEED)
    draws = torch.randn(max(batch_sizes), model.latent_dim, generator=g)
    out = {}
    with torch.no_grad():
        for b in batch_sizes:
            x = images[:b]
            mu, logvar = model.encoder(x)
            k = (b + 1) // 2
            z = torch.cat([mu[:k], draws[: b - k]])
            x_hat = model.decoder(z)
            out[(ENCODER, b)] = ({IMAGE: x.numpy()}, {MEAN: mu.numpy(), LOGVAR: logvar.numpy()})
            out[(DECODER, b)] = ({LATENT: z.numpy()}, {RECON: x_hat.numpy()})
    return out


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


def _check(
    entry: FileEntry,
    backend: _Backend,
    feeds: dict[tuple[str, int], tuple[dict, dict]],
    batch_sizes: Sequence[int],
) -> list[VerifyRow]:
    """The rows of one file on one backend: each batch size x each output (or one skip/fail row)."""
    tol = entry.spec.tolerance

    def row(output: str = "*", **kw: Any) -> VerifyRow:
        where = dict(graph=entry.graph, format=entry.format, backend=backend.backend, precision=entry.precision)
        return VerifyRow(**where, provider=backend.provider, output=output, atol=tol.atol, rtol=tol.rtol, **kw)

    if backend.run is None:
        return [row(status="fail" if backend.error else "skipped", reason=backend.error or backend.skipped)]
    rows = []
    for b in batch_sizes:
        inputs, expected = feeds[(entry.graph, b)]
        try:
            got = backend.run(inputs)
        except Exception as exc:  # noqa: BLE001 - a graph that cannot run at this batch size fails
            rows.append(row(batch_size=b, status="fail", reason=f"run failed: {sessions.ort_message(exc)}"))
            continue
        for name in entry.spec.output_names:
            if name not in got or name not in expected:
                rows.append(row(name, batch_size=b, status="fail", reason=f"no output {name!r}"))
                continue
            max_abs, max_rel, ok, why = _compare_output(got[name], expected[name], tol)
            stats = dict(batch_size=b, max_abs=max_abs, max_rel=max_rel)
            rows.append(row(name, **stats, status="pass" if ok else "fail", reason=why or backend.note))
    return rows


# --- verify -------------------------------------------------------------------------------------


def compare(
    export_dir: str | os.PathLike,
    files: Sequence[FileEntry],
    model: VAE,
    *,
    train_config: dict | None = None,
    data_root: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Compare every listed file in ``export_dir`` with the eager ``model``, each against the
    tolerance its entry records.

    Does not check integrity (``verify`` does, first; ``export`` compares files it just wrote).
    """
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be positive integers; got {list(batch_sizes)}")
    export_dir = Path(export_dir)
    model = model.eval().cpu()
    images, inputs_desc = _images(max(batch_sizes), model, train_config, data_root)
    feeds = _feeds(model, images, batch_sizes)
    rows = [
        row
        for entry in files
        for backend in _backends(export_dir, entry)
        for row in _check(entry, backend, feeds, batch_sizes)
    ]
    ran = any(r.status == "pass" for r in rows)
    passed = ran and not any(r.status == "fail" for r in rows)
    report = VerifyReport(passed, rows, str(export_dir), inputs=inputs_desc, batch_sizes=batch_sizes)
    if not ran:
        report.notes.append("nothing could be run, so nothing was verified")
    log(report.table())
    return report


def _source_model(
    export_dir: str | os.PathLike, manifest: Any, checkpoint: str | os.PathLike | None
) -> tuple[VAE, dict, str, str]:
    """The eager model to compare with: the given checkpoint, else the one the manifest names
    (found relative to the export folder, and still the file that was exported)."""
    recorded = manifest.model.source
    note = ""
    if checkpoint is None:
        path = source_checkpoint(export_dir, manifest)
    else:
        path = Path(checkpoint)
        if path.is_file() and recorded.get("sha256") and sha256_file(path) != recorded["sha256"]:
            note = f"note: {path} is not the checkpoint this export was made from (sha256 differs)"
    state = read_checkpoint(path)
    model = model_from_state(state, str(path))
    want, got = manifest.raw.get("model_config"), to_dict(model.config)
    if isinstance(want, dict) and want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ExportError(
            f"{path} does not have the exported model's architecture (differs in {', '.join(diff)}); "
            "pass the checkpoint the export was made from"
        )
    return model, state, str(path), note


def verify(
    export_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    json_path: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Check the folder's integrity, then compare every exported graph with eager PyTorch.

    Returns the report (``report.passed``); raises ``IntegrityError``/``ExportError`` for a
    tampered or unusable folder. ``json_path`` also writes ``report.to_dict()`` as JSON.
    """
    manifest = check_manifest(export_dir)  # before anything is loaded
    model, state, source, note = _source_model(export_dir, manifest, checkpoint)
    if note:
        log(note)
    report = compare(
        export_dir,
        manifest.files,
        model,
        train_config=state.get("train_config"),
        data_root=data_root,
        batch_sizes=batch_sizes,
        log=log,
    )
    report.checkpoint = source
    if note:
        report.notes.append(note)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    return report

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

import contextlib
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_deploy.checkpoint import model_from_state, read_checkpoint
from vae_deploy.config import to_dict
from vae_deploy.errors import DataError, ExportError, IntegrityError, UsageError
from vae_deploy.export import graph_specs
from vae_deploy.files import atomic_write_text, sha256_file
from vae_deploy.manifest import check_manifest, manifest_files
from vae_deploy.model import VAE

__all__ = ["Tolerance", "VerifyReport", "VerifyRow", "check_manifest", "compare", "tolerance_for", "verify"]

DEFAULT_BATCH_SIZES = (1, 7, 256)
SEED = 0


# --- tolerances ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol {self.atol:.0e}" + (f" rtol {self.rtol:.0e}" if self.rtol else "")


# (precision, bounded output?) -> tolerance. Bounded: x_hat in [0,1]; unbounded: mu, logvar.
# fp32, measured on MNIST-trained mlp and conv models (onnxruntime CPU vs eager, batch 1-256):
# x_hat <= 2.4e-7, mu/logvar <= 1.2e-6 (float32 re-association in fused kernels); TorchScript and
# pt2 match exactly. The tolerances leave 40-80x headroom yet catch any real bug (a wrong weight,
# op or layout moves outputs by 1e-3 or more). fp16: an 11-bit significand (~5e-4 relative); the
# fp16 decoder's x_hat measured <= 1.5e-4 (fp16-rounded weights); sigmoid's slope (<= 1/4) keeps
# fp16 arithmetic on GPUs well inside 1e-2.
TOLERANCES: dict[tuple[str, bool], Tolerance] = {
    ("fp32", True): Tolerance(atol=1e-5, rtol=0.0),
    ("fp32", False): Tolerance(atol=1e-4, rtol=1e-5),
    ("fp16", True): Tolerance(atol=1e-2, rtol=0.0),
    ("fp16", False): Tolerance(atol=5e-2, rtol=1e-2),
}


def tolerance_for(precision: str, output: dict[str, Any]) -> Tolerance:
    """The tolerance for one manifest output entry (bounded outputs carry a ``range``)."""
    return TOLERANCES[("fp16" if precision == "fp16" else "fp32", "range" in output)]


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
        out["tolerances"] = [
            {
                "precision": p,
                "output": "bounded [0,1] (x_hat)" if b else "unbounded (mu, logvar)",
                **asdict(t),
            }
            for (p, b), t in TOLERANCES.items()
        ]
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


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Capture what onnxruntime's C++ side writes straight to fd 2 (provider-load errors in red),
    so it becomes a one-line skip reason instead of console spam."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", "replace"))


def _ort_reason(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    found = re.findall(r"with error: (.+)", text)
    if found:
        return f"CUDA provider failed to load ({found[0].strip()[:160]})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"session fell back to CPU ({lines[0][-160:]})" if lines else "session fell back to CPU"


def _ort_error(exc: Exception) -> str:
    """onnxruntime's exception text without its error-code prefix, model path and C++ location."""
    text = str(exc).strip()
    text = (
        text.split(" failed:", 1)[1]
        if " failed:" in text
        else re.sub(r"^\[ONNXRuntimeError\][ :\w]*: ", "", text)
    )
    return re.sub(r"^/\S+:\d+ .*?\) ", "", text.strip())[:200]


def _onnx_backends(path: Path, entry: dict[str, Any]) -> list[_Backend]:
    """The CPU session, and a CUDA session only if one really runs (onnxruntime silently falls back)."""
    import onnxruntime as ort

    def options() -> Any:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return so

    def runner(session: Any) -> Runner:
        names = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(zip(names, session.run(names, feeds)))

    def io_mismatch(session: Any) -> str:
        got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        want = ([i["name"] for i in entry["inputs"]], [o["name"] for o in entry["outputs"]])
        return "" if got == want else f"graph I/O names {got} differ from the manifest's {want}"

    fp16 = entry.get("precision") == "fp16"
    out = []
    try:
        cpu = ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
        cpu_note = (
            "onnxruntime's CPU provider computes fp16 nodes in fp32 (it inserts Casts), so this checks "
            "the file and its fp16-rounded weights, not fp16 arithmetic"
            if fp16
            else ""
        )
        bad = io_mismatch(cpu)
        out.append(
            _Backend(
                "onnxruntime", "CPUExecutionProvider", None if bad else runner(cpu), error=bad, note=cpu_note
            )
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        out.append(
            _Backend(
                "onnxruntime", "CPUExecutionProvider", error=f"onnxruntime cannot load it: {_ort_error(exc)}"
            )
        )

    cuda = _Backend("onnxruntime", "CUDAExecutionProvider")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cuda.skipped = "this onnxruntime build has no CUDA provider"
    else:
        # TF32 off: the fp32 check must see float32 arithmetic, not 10-bit-mantissa tensor cores.
        providers = [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0}), "CPUExecutionProvider"]
        try:
            with _native_stderr() as err:
                session = ort.InferenceSession(str(path), options(), providers=providers)
            if session.get_providers()[0] != "CUDAExecutionProvider":
                cuda.skipped = _ort_reason(err[0] if err else "")
            else:
                cuda.run = runner(session)
        except Exception as exc:  # noqa: BLE001
            cuda.skipped = f"CUDA session could not be created ({_ort_error(exc)})"
    out.append(cuda)
    return out


def _torch_backend(path: Path, fmt: str, entry: dict[str, Any]) -> _Backend:
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
    in_names = [i["name"] for i in entry["inputs"]]
    out_names = [o["name"] for o in entry["outputs"]]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            result = module(*(torch.from_numpy(feeds[n]) for n in in_names))
        result = result if isinstance(result, (tuple, list)) else (result,)
        return {n: r.numpy() for n, r in zip(out_names, result)}

    return _Backend(backend, "torch-cpu", run)


def _backends(path: Path, fmt: str, entry: dict[str, Any]) -> list[_Backend]:
    if fmt in ("onnx", "onnx-fp16"):
        return _onnx_backends(path, entry)
    if fmt in ("torchscript", "pt2"):
        return [_torch_backend(path, fmt, entry)]
    return [_Backend("?", "?", skipped=f"unknown format {fmt!r} (newer vae-deploy?)")]


# --- inputs and eager references ----------------------------------------------------------------


def _images(n: int, model: VAE, train_config: dict | None, data_root: Any) -> tuple[torch.Tensor, str]:
    """n real images (the checkpoint's dataset, else MNIST, from the data root) or seeded noise."""
    from vae_deploy.data import load_splits, resolve_data_root

    shape = tuple(model.config.image_shape)
    root = resolve_data_root(data_root)
    dataset = (train_config or {}).get("dataset")
    dataset = dataset if dataset in ("mnist", "fashion-mnist") else "mnist"
    why = "no data root (pass --data-root or set VAE_DEPLOY_DATA)"
    if root is not None and shape == (1, 28, 28):
        try:
            splits = load_splits(dataset, root)
            pool = torch.cat([splits.val_x, splits.train_x])
            reps = -(-n // len(pool))
            return pool.repeat(reps, 1, 1, 1)[:n].contiguous(), f"{dataset} images from {root}"
        except DataError as exc:
            why = f"{dataset} not readable under {root}: {str(exc)[:120]}"
    elif root is not None:
        why = f"model image shape {list(shape)} is not MNIST's"
    g = torch.Generator().manual_seed(SEED)
    return torch.rand((n, *shape), generator=g), f"seeded uniform random images (seed {SEED}; {why})"


def _feeds(
    model: VAE, images: torch.Tensor, batch_sizes: Sequence[int]
) -> dict[tuple[str, int], tuple[dict, dict]]:
    """Per (graph, batch): the named inputs and eager outputs. Decoder latents are the encoder
    means of the images (half) plus seeded N(0, I) draws (the other half)."""
    enc, dec = graph_specs(model.config)
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
            out[(enc.name, b)] = (
                dict(zip(enc.input_names, [x.numpy()])),
                dict(zip(enc.output_names, [mu.numpy(), logvar.numpy()])),
            )
            out[(dec.name, b)] = (
                dict(zip(dec.input_names, [z.numpy()])),
                dict(zip(dec.output_names, [x_hat.numpy()])),
            )
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
    graph: str,
    fmt: str,
    entry: dict[str, Any],
    backend: _Backend,
    feeds: dict[tuple[str, int], tuple[dict, dict]],
    batch_sizes: Sequence[int],
) -> list[VerifyRow]:
    """The rows of one file on one backend: each batch size x each output (or one skip/fail row)."""
    precision = entry.get("precision", "fp32")
    outputs = entry.get("outputs") or []

    def row(output: dict[str, Any] | None = None, **kw: Any) -> VerifyRow:
        tol = tolerance_for(precision, output or (outputs[0] if outputs else {}))
        name = output["name"] if output else "*"
        where = dict(graph=graph, format=fmt, backend=backend.backend, precision=precision)
        return VerifyRow(**where, provider=backend.provider, output=name, atol=tol.atol, rtol=tol.rtol, **kw)

    if backend.run is None:
        return [row(status="fail" if backend.error else "skipped", reason=backend.error or backend.skipped)]
    rows = []
    for b in batch_sizes:
        inputs, expected = feeds[(graph, b)]
        try:
            got = backend.run(inputs)
        except Exception as exc:  # noqa: BLE001 - a graph that cannot run at this batch size fails
            rows.append(row(batch_size=b, status="fail", reason=f"run failed: {_ort_error(exc)}"))
            continue
        for out in outputs:
            name = out["name"]
            if name not in got or name not in expected:
                rows.append(row(out, batch_size=b, status="fail", reason=f"no output {name!r}"))
                continue
            tol = tolerance_for(precision, out)
            max_abs, max_rel, ok, why = _compare_output(got[name], expected[name], tol)
            stats = dict(batch_size=b, max_abs=max_abs, max_rel=max_rel)
            rows.append(row(out, **stats, status="pass" if ok else "fail", reason=why or backend.note))
    return rows


# --- verify -------------------------------------------------------------------------------------


def compare(
    export_dir: str | os.PathLike,
    manifest: dict[str, Any],
    model: VAE,
    *,
    train_config: dict | None = None,
    data_root: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Compare every file ``manifest`` lists in ``export_dir`` with the eager ``model``.

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
        for graph, fmt, entry in manifest_files(manifest)
        for backend in _backends(export_dir / entry["file"], fmt, entry)
        for row in _check(graph, fmt, entry, backend, feeds, batch_sizes)
    ]
    ran = any(r.status == "pass" for r in rows)
    passed = ran and not any(r.status == "fail" for r in rows)
    report = VerifyReport(passed, rows, str(export_dir), inputs=inputs_desc, batch_sizes=batch_sizes)
    if not ran:
        report.notes.append("nothing could be run, so nothing was verified")
    log(report.table())
    return report


def _source_model(
    manifest: dict[str, Any], checkpoint: str | os.PathLike | None
) -> tuple[VAE, dict, str, str]:
    """The eager model to compare with: the given checkpoint, else the one the manifest names
    (which must still be the file that was exported)."""
    recorded = manifest.get("checkpoint") or {}
    note = ""
    if checkpoint is None:
        if not recorded.get("path"):
            raise ExportError("the manifest names no source checkpoint; pass --checkpoint CKPT")
        path = Path(recorded["path"])
        if not path.is_file() and recorded.get("abs_path"):
            path = Path(recorded["abs_path"])  # the export was made from another working directory
        if not path.is_file():
            raise ExportError(
                f"the checkpoint this export was made from ({path}) is not there; pass --checkpoint CKPT"
            )
        if recorded.get("sha256") and sha256_file(path) != recorded["sha256"]:
            raise IntegrityError(
                f"{path} has changed since this export was made (its sha256 differs from the manifest's); "
                "re-export it, or pass --checkpoint to compare against it anyway"
            )
    else:
        path = Path(checkpoint)
        if path.is_file() and recorded.get("sha256") and sha256_file(path) != recorded["sha256"]:
            note = f"note: {path} is not the checkpoint this export was made from (sha256 differs)"
    state = read_checkpoint(path)
    model = model_from_state(state, str(path))
    want, got = manifest.get("model_config"), to_dict(model.config)
    if want is not None and want != got:
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
    model, state, source, note = _source_model(manifest, checkpoint)
    if note:
        log(note)
    report = compare(
        export_dir,
        manifest,
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

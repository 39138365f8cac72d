"""``run_bench``: check the export, measure the machine's limits, build the backends, time them
batch size by batch size (round robin), and assemble the report. The method is in the package doc."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy.bench.backends import REFERENCES, make_backend, parse_backends
from vae_deploy.bench.budget import DEFAULT_BATCH_SIZES, QUICK_BATCH_SIZES, QUICK_BUDGET, Budget
from vae_deploy.bench.context import Backend, Context, Unavailable, find_checkpoint
from vae_deploy.bench.flops import GRAPHS, flops_per_sample, module_flops
from vae_deploy.bench.int8 import int8_error
from vae_deploy.bench.machine import (
    cpu_counters,
    cpu_matmul_gflops,
    load_avg,
    machine_info,
    measure_limits,
    other_load,
    peak_flops,
)
from vae_deploy.bench.report import BenchReport, Row
from vae_deploy.bench.timing import Point, latency_ms, paired_ratios, quantile, quiesce, timed_round, warm_up
from vae_deploy.config import model_config_from_dict
from vae_deploy.contract import MANIFEST
from vae_deploy.errors import ConfigError, UsageError, VaeDeployError
from vae_deploy.manifest import check_manifest

DYNAMIC_BATCH_SIZES, DYNAMIC_QUICK = (1, 4), (1,)  # exports that take any image size: images are large
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")
INT8 = "onnx-cpu-int8"


def run_bench(
    export_dir: str | os.PathLike,
    *,
    backends: str | Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    graph: str = "decoder",
    checkpoint: str | os.PathLike | None = None,
    image_size: tuple[int, int] | None = None,
    quick: bool = False,
    budget: Budget | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> BenchReport:
    """Benchmark ``graph`` of an export folder on each backend at each batch size (see the package doc).

    ``quick`` uses batch sizes 1 and 64 (unless given) and a small time budget: for smoke runs.
    ``checkpoint`` is the eager model (default: the export's source checkpoint, as verify finds it;
    for a diffusers or factory export its recorded source, or a folder / weights file).
    ``image_size`` (H, W) is the size to time an export that takes any size at (default: the size
    it was traced at); such exports default to batch sizes 1 and 4 (1 with ``quick``).
    """
    if graph not in GRAPHS:
        raise UsageError(f"--graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    names = parse_backends(backends)
    export_dir = Path(export_dir)
    manifest = check_manifest(export_dir)  # every listed file against its sha256 before any loads
    dynamic = manifest.model.dynamic_size
    default_sizes = (QUICK_BATCH_SIZES, DEFAULT_BATCH_SIZES) if not dynamic else (DYNAMIC_QUICK, DYNAMIC_BATCH_SIZES)
    sizes = check_batch_sizes(batch_sizes or default_sizes[0 if quick else 1])
    budget = budget or (QUICK_BUDGET if quick else Budget())
    graphs = list(dict.fromkeys(e.graph for e in manifest.files))
    if graph not in graphs:
        raise UsageError(f"{export_dir} has no {graph} graph (it has {', '.join(graphs)})")
    if dynamic and image_size is None:
        info = manifest.raw.get("export")
        traced = info.get("traced_at") if isinstance(info, dict) else None
        image_size = tuple(traced[-2:]) if isinstance(traced, list) and len(traced) == 4 else None
    ckpt = find_checkpoint(export_dir, manifest, checkpoint)
    ctx = Context(export_dir, manifest, graph, ckpt, Path("."), image_size if dynamic else None)  # tmp: set below
    model_config = manifest.raw.get("model_config")
    flops = _flops(export_dir, manifest, model_config, ctx)

    started = time.perf_counter()
    counters = cpu_counters()
    machine = machine_info()
    log(f"measuring machine limits (fp32 matmul {budget.matmul_n}^3, best of {budget.matmul_repeats}) ...")
    limits = measure_limits(budget)
    peaks = [limits["cpu_fp32_matmul_gflops"]]
    with tempfile.TemporaryDirectory(prefix="vae-deploy-bench-") as tmp:
        ctx.tmp = Path(tmp)
        ready, skipped = build_backends(names, ctx)
        errors: dict[str, dict[str, float]] = {}
        if INT8 in ready:
            fp32 = ready.get("onnx-cpu") or make_backend("onnx-cpu", ctx)
            errors[INT8] = int8_error(ctx, ready[INT8], fp32)
        results: list[Row] = []
        with progress_bar(len(sizes) * len(ready), progress) as bar:
            for batch in sizes:
                results += bench_batch(ctx, ready, batch, budget, flops, skipped, bar)
    # measured again at the end; the peak is the better sample (a passing load spike dents one)
    peaks.append(cpu_matmul_gflops(budget.matmul_n, budget.matmul_repeats))
    limits["cpu_fp32_matmul_gflops_samples"] = [round(p, 1) for p in peaks]
    limits["cpu_fp32_matmul_gflops"] = max(peaks)
    set_fractions(results, limits, {name: b.peak for name, b in ready.items()})
    for row in results:
        if row.backend in errors:
            row.extra["error_vs_fp32"] = errors[row.backend]
    machine["load_avg_end"] = load_avg()
    machine["other_load"] = other_load(counters)  # CPU others took while this ran (cores)
    settings = {
        "graph": graph,
        "export_dir": str(export_dir),
        "checkpoint": str(ckpt.path) if ckpt.path else None,
        "checkpoint_note": ckpt.note,
        "model_config": model_config,
        "image_size": list(ctx.image_size) if ctx.image_size else None,
        "flops_per_sample": flops,
        "batch_sizes": list(sizes),
        "backends": list(names),
        "budget": budget.__dict__,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
        "method": "round-robin per batch size; per-call perf_counter; median/p90/p99 over all timed calls",
        "notes": {name: b.note for name, b in ready.items() if b.note},
        "cuda": "device-resident input/output (IOBinding for onnxruntime), synchronised after each call",
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }
    return BenchReport(machine, limits, settings, results, skipped, errors)


def _flops(export_dir: Path, manifest: Any, model_config: Any, ctx: Context) -> int | None:
    """FLOPs per sample: from our model's config, else from the eager module at the bench's size
    (None where the eager model cannot be rebuilt here: the rates then go unreported)."""
    if manifest.model.source.get("kind", "checkpoint") == "checkpoint":
        try:
            if not isinstance(model_config, dict):
                raise ConfigError("it is missing")
            cfg = model_config_from_dict(model_config)
        except ConfigError as exc:
            raise UsageError(f"{export_dir}/{MANIFEST} has no valid model_config: {exc}") from None
        return flops_per_sample(cfg, ctx.graph)
    latent, image = ctx.shapes()
    try:
        return module_flops(ctx.module(), latent if ctx.graph == "decoder" else image)
    except (Unavailable, VaeDeployError):
        return None


def check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    """Sorted, distinct positive integers (UsageError otherwise)."""
    sizes = tuple(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in sizes):
        raise UsageError(f"batch sizes must be positive integers, got {list(sizes)}")
    return tuple(sorted(set(int(b) for b in sizes)))


def build_backends(names: Sequence[str], ctx: Context) -> tuple[dict[str, Backend], list[dict[str, Any]]]:
    """The backends that can run here, and a skip (with the reason) for each one that cannot."""
    ready: dict[str, Backend] = {}
    skipped: list[dict[str, Any]] = []
    for name in names:
        try:
            ready[name] = make_backend(name, ctx)
        except (Unavailable, VaeDeployError) as exc:
            skipped.append({"backend": name, "batch_size": None, "reason": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one broken backend must not stop the others
            skipped.append({"backend": name, "batch_size": None, "reason": f"{type(exc).__name__}: {exc}"})
    return ready, skipped


def bench_batch(
    ctx: Context,
    ready: dict[str, Backend],
    batch: int,
    budget: Budget,
    flops: int,
    skipped: list[dict[str, Any]],
    bar: Any,
) -> list[Row]:
    """All backends at one batch size, interleaved round by round."""
    x = ctx.inputs(batch)
    steps: dict[str, Callable[[], Any]] = {}
    for name, backend in ready.items():
        try:
            step = backend.prepare(x)
            warm_up(step, budget.warmup_s)
            steps[name] = step
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a large batch
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            skipped.append({"backend": name, "batch_size": batch, "reason": f"{type(exc).__name__}: {msg}"})
            bar.update(1)
    # Every backend runs a round in turn until all are done, so all sample the same stretch of time:
    # this VM's speed drifts over seconds even when idle, and that must hit every backend alike.
    points = {name: Point() for name in steps}
    rounds = 0
    while points and not all(p.done(budget) for p in points.values()):
        rounds += 1
        for name, step in steps.items():
            bar.set_postfix_str(f"batch {batch}, round {rounds}, {name}")
            quiesce()  # the previous backend's pool threads must stop spinning before this one runs
            points[name].add_round(timed_round(step, budget.round_s))
    bar.update(len(points))
    rows = []
    for name, point in points.items():
        p50 = quantile(sorted(point.times), 0.5)
        backend = ready[name]
        rows.append(
            Row(
                backend=name,
                graph=ctx.graph,
                batch_size=batch,
                latency_ms=latency_ms(point.times),
                samples_per_s=batch / p50,
                fraction_of_peak=None,  # set once the limits are final (see set_fractions)
                gflop_per_s=flops * batch / p50 / 1e9 if flops else None,
                peak=backend.peak,
                runs=len(point.times),
                rounds=len(point.medians),
                settled=point.settled(budget),
                threads=backend.threads(batch),
                ratios=paired_ratios(name, points, REFERENCES),
            )
        )
    return rows


def set_fractions(rows: list[Row], limits: dict[str, Any], peaks: dict[str, str]) -> None:
    """fraction_of_peak = achieved FLOP/s / the measured peak the backend is compared with (its
    precision's); CPU rows also get fraction_of_best, against the best CPU ceiling of any precision."""
    best = peak_flops(limits, "cpu_best")
    for r in rows:
        peak = peak_flops(limits, peaks[r.backend])
        r.fraction_of_peak = r.gflop_per_s * 1e9 / peak if peak and r.gflop_per_s is not None else None
        if best and peaks[r.backend].startswith("cpu") and r.gflop_per_s is not None:
            r.extra["fraction_of_best"] = r.gflop_per_s * 1e9 / best


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="bench", unit="pt", disable=not enabled, leave=False, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()

"""Choose a CPU plan by measuring it on this machine: ``vae-deploy tune EXPORT_DIR``.

    result, cached = tune_export("exported")          # ~5 s; cached for VAERuntime(..., cpu_plan="auto")
    print(result.table())

What is measured, with the bench package's timing (warm-up, rounds of single timed calls taken in
turn, quiescing between candidates, paired round-by-round ratios; vae_deploy.bench.timing):

1. Session settings per batch-size band. Each candidate (1 thread; onnxruntime's default thread
   count with and without spinning; on larger machines half the CPUs, and every CPU where that is
   not the default) runs the graph at batch sizes 1, 8, 64, 512 and 4096 (fewer where one call
   would take too long or too much memory). The large-batch session is the winner over the two
   largest sizes, the small-batch one the winner over the two smallest (geometric means of their
   speed-ups); where they differ, ``small_batch_max`` is set between the last size at which the
   small one is still as fast and the next.
2. Row chunking: with the large session, runs of 256 ... 2048 rows (or none) at the largest size.

A measurement during which other processes used more than 0.3 cores is taken again (twice at
most; the quietest kept), and a candidate replaces the default only when it is faster by more than
``margin`` (3%), so noise on a shared machine does not flip a plan; the default plan is always
among the candidates, so a tuned plan is never measurably slower than it. A plan never changes
results (tested bitwise). The winning plan is cached by vae_deploy.plans, keyed by CPU,
onnxruntime version and the file's sha256.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy import plans, sessions
from vae_deploy.bench.budget import Budget
from vae_deploy.bench.machine import cpu_counters, other_load
from vae_deploy.bench.timing import Point, quiesce, timed_round, warm_up
from vae_deploy.contract import DECODER, ENCODER, PRECISION_FORMAT, GraphSpec
from vae_deploy.engines import CpuEngine, CpuPlan, cpu_count
from vae_deploy.errors import ExportError, UsageError
from vae_deploy.files import sha256_bytes
from vae_deploy.manifest import read_manifest, read_verified

PROBE_SIZES = (1, 8, 64, 512, 4096)
CHUNK_SIZES = (0, 256, 512, 1024, 2048)  # 0: one run for the whole batch
DEFAULT_SECONDS = 5.0
MARGIN = 0.03  # a candidate must beat the default by more than this to replace it
MAX_PROBE_BYTES = 256 << 20  # input + output of one probe call
BUSY_CORES = 0.3  # other processes using more cores than this disturb a measurement
RETRIES = 2  # a measurement they disturbed is taken again (up to this many times), the quietest kept
SETTLE = Budget(warmup_s=0.02, round_s=0.01, min_rounds=4, max_s=1.0, settle=0.02)


@dataclass(frozen=True)
class Sessions:
    """One candidate session setting: intra-op threads (0: onnxruntime's default) and spinning."""

    threads: int
    spinning: bool

    def label(self) -> str:
        n = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else f"default ({cpu_count()})"
        return n if self.threads == 1 else f"{n}, {'spinning' if self.spinning else 'no spinning'}"


DEFAULT_SESSIONS = Sessions(CpuPlan().threads, CpuPlan().spinning)


def candidate_sessions(cpus: int | None = None) -> list[Sessions]:
    """The session settings worth trying on a machine with ``cpus`` CPUs (the default first)."""
    cpus = cpus or cpu_count()
    out = [DEFAULT_SESSIONS, Sessions(0, not DEFAULT_SESSIONS.spinning), Sessions(1, False)]
    if cpus >= 4:
        out.append(Sessions(cpus // 2, True))
    if cpus >= 3:
        out.append(Sessions(cpus, True))  # every CPU: onnxruntime's default counts physical cores only
    return list(dict.fromkeys(out))


@dataclass
class TuneResult:
    """The chosen plan and what was measured (median µs per call, per candidate and batch size)."""

    plan: CpuPlan
    graph: str
    seconds: float
    sessions: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> label -> µs
    speedup: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> label -> x default
    chunking: dict[str, Any] = field(default_factory=dict)  # {"batch", "us": {rows: µs}, "speedup": ...}
    cpu: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    other_cores: float | None = None  # CPU other processes used while this measured (cores)
    probe_load: dict[int, float] = field(default_factory=dict)  # batch -> cores others used (kept attempt)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "graph": self.graph,
            "seconds": round(self.seconds, 2),
            "other_cores": self.other_cores,
            "other_cores_per_batch": {str(b): round(c, 3) for b, c in self.probe_load.items()},
            "sessions_us": {str(b): v for b, v in self.sessions.items()},
            "speedup_vs_default": {str(b): v for b, v in self.speedup.items()},
            "chunking": self.chunking,
            "cpu": self.cpu,
            "notes": self.notes,
        }

    def table(self) -> str:
        """The measurements as a console table, then the chosen plan."""
        labels = list(dict.fromkeys(k for row in self.sessions.values() for k in row))
        lines = [f"{self.graph} on {self.cpu.get('model', '?')} x{self.cpu.get('cpus', '?')}: median µs per call"]
        lines.append(f"{'batch':>6s}  " + "  ".join(f"{label:>22s}" for label in labels))
        for b, row in self.sessions.items():
            cells = []
            for label in labels:
                us, x = row.get(label), self.speedup.get(b, {}).get(label)
                cells.append("-" if us is None else f"{us:,.1f} (x{x:.2f})" if x else f"{us:,.1f}")
            lines.append(f"{b:6d}  " + "  ".join(f"{c:>22s}" for c in cells))
        if self.chunking:
            ch = self.chunking
            runs = ", ".join(
                f"{'one run' if r == '0' else r + ' rows'} {us / 1e3:.2f} ms" for r, us in ch["us"].items()
            )
            lines.append(f"rows per run at batch {ch['batch']}: {runs}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"plan: {self.plan} (tuned in {self.seconds:.1f} s)")
        return "\n".join(lines)


def probe_input(spec: GraphSpec, batch: int) -> np.ndarray:
    """A seeded input: z ~ N(0, I) for the decoder, values uniform in the input's range otherwise."""
    t = spec.inputs[0]
    if not t.static_rows:
        raise UsageError(f"tune needs fixed {spec.name} input sizes; this graph takes {list(t.shape)}")
    rng = np.random.default_rng(batch)
    shape = (batch, *t.row_shape)
    if t.value_range is None:
        return rng.standard_normal(shape, dtype=np.float32)
    lo, hi = t.value_range
    return (lo + (hi - lo) * rng.random(shape, dtype=np.float32)).astype(np.float32)


def _row_bytes(spec: GraphSpec) -> int:
    return 4 * sum(math.prod(t.row_shape) for t in (*spec.inputs, *spec.outputs) if t.static_rows)


def _race(
    steps: dict[str, Callable[[], Any]], seconds: float, retries: int = RETRIES
) -> tuple[dict[str, Point], float]:
    """:func:`_race_once`, run again (up to ``retries`` times) while other processes used more than
    ``BUSY_CORES`` during it; the quietest attempt and the cores others used during it."""
    best: dict[str, Point] = {}
    best_cores = math.inf
    for _ in range(retries + 1):
        counters = cpu_counters()
        points = _race_once(steps, seconds)
        load = other_load(counters)
        cores = load["other_cores"] if load else 0.0
        if cores < best_cores:
            best, best_cores = points, cores
        if cores <= BUSY_CORES:
            break
    return best, best_cores


def _race_once(steps: dict[str, Callable[[], Any]], seconds: float) -> dict[str, Point]:
    """Interleaved rounds of every step (as vae-deploy bench times backends) for about ``seconds``."""
    budget = replace(SETTLE, max_s=max(seconds / max(len(steps), 1), 1e-3))
    for step in steps.values():
        warm_up(step, budget.warmup_s)
    points = {name: Point() for name in steps}
    end = time.perf_counter() + seconds
    while not all(p.done(budget) for p in points.values()) and time.perf_counter() < end:
        for name, step in steps.items():
            quiesce(0.05)  # the previous candidate's pool must stop spinning first
            points[name].add_round(timed_round(step, budget.round_s))
    return points


def _speedups(points: dict[str, Point], reference: str) -> dict[str, float]:
    """Each candidate's speed over ``reference``, paired round by round (median of the ratios)."""
    ref = points[reference].round_medians
    return {
        name: statistics.median(r / m for r, m in zip(ref, p.round_medians)) if p.round_medians else 0.0
        for name, p in points.items()
    }


def _pick(speedup: dict[Any, float], default: Any, margin: float) -> Any:
    """The fastest candidate, if it beats ``default`` by more than ``margin``; else ``default``."""
    best = max(speedup, key=lambda k: speedup[k])
    return best if best != default and speedup[best] > 1 + margin else default


def _band(speedup: dict[int, dict[Sessions, float]], sizes: list[int]) -> dict[Sessions, float]:
    """Each candidate's geometric-mean speed-up over some batch sizes."""
    return {c: math.exp(statistics.fmean(math.log(max(speedup[b][c], 1e-9)) for b in sizes)) for c in speedup[sizes[0]]}


def choose_sessions(
    speedup: dict[int, dict[Sessions, float]], margin: float = MARGIN, default: Sessions = DEFAULT_SESSIONS
) -> CpuPlan:
    """The session part of a plan from each candidate's speed over ``default`` per batch size.

    The large-batch session is the winner over the two largest sizes measured, the small-batch one
    the winner over the two smallest (geometric means: one size disturbed by another process does
    not decide alone); where they differ, the small one serves every size up to the last at which
    it is at least as fast as the large one, and the boundary goes halfway (geometrically) to the
    next size measured.
    """
    sizes = sorted(speedup)
    large = _pick(_band(speedup, sizes[-2:] if len(sizes) > 2 else sizes[-1:]), default, margin)
    small = _pick(_band(speedup, sizes[:2] if len(sizes) > 3 else sizes[:1]), default, margin)
    plan = CpuPlan(threads=large.threads, spinning=large.spinning)
    if small == large:
        return plan
    upto = 0
    for b in sizes:
        if speedup[b][small] < speedup[b][large]:
            break
        upto = b
    if upto == 0:  # small won the smallest sizes only within noise of large: one session
        return plan
    nxt = next((b for b in sizes if b > upto), None)
    boundary = upto if nxt is None else int(math.sqrt(upto * nxt))
    return replace(plan, small_batch_max=boundary, small_threads=small.threads, small_spinning=small.spinning)


def tune_plan(
    model: bytes,
    spec: GraphSpec,
    *,
    name: str = "model",
    seconds: float = DEFAULT_SECONDS,
    batch_sizes: Sequence[int] = PROBE_SIZES,
    candidates: Sequence[Sessions] | None = None,
    margin: float = MARGIN,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Measure the candidate plans for one ONNX graph (its verified bytes) and return the fastest."""
    if not (isinstance(seconds, (int, float)) and 0.2 <= seconds <= 600):
        raise UsageError(f"tune seconds must be between 0.2 and 600, got {seconds!r}")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise UsageError(f"tune batch sizes must be positive integers, got {list(batch_sizes)}")
    started, counters = time.perf_counter(), cpu_counters()
    say = log or (lambda _: None)
    cands = list(dict.fromkeys(candidates or candidate_sessions()))
    if DEFAULT_SESSIONS not in cands:
        cands.insert(0, DEFAULT_SESSIONS)
    labels = {c: c.label() for c in cands}
    default = labels[DEFAULT_SESSIONS]
    made = {
        c: sessions.cpu_session(model, name, sessions.cpu_options(c.threads, c.spinning, sessions.LOG_ERRORS_ONLY))
        for c in cands
    }
    for sess in made.values():
        sessions.check_signature(sess, spec, name)
    outputs, input_name = spec.output_names, spec.input_names[0]
    result = TuneResult(CpuPlan(), spec.name, 0.0, cpu=plans.cpu_identity())

    static = all(t.static_rows and t.dtype == "float32" for t in spec.outputs)
    chunk_share = 0.3 if static and sizes[-1] > CpuPlan().max_rows else 0.0
    per_probe = seconds * (1 - chunk_share) / len(sizes)
    per_row = 0.0  # seconds per row of the fastest candidate at the last probe
    for b in sizes:
        # a probe whose calls would not fit its share of the time (or memory) ends the sweep
        if per_row * b * len(cands) * 2 * SETTLE.min_rounds > per_probe and b > sizes[0]:
            result.notes.append(f"stopped before batch {b}: one call would take ~{per_row * b * 1e3:.0f} ms")
            break
        if b * _row_bytes(spec) > MAX_PROBE_BYTES:
            result.notes.append(f"stopped before batch {b}: a call would move more than {MAX_PROBE_BYTES >> 20} MiB")
            break
        x = probe_input(spec, b)
        feed = {input_name: x}
        steps = {labels[c]: (lambda s=s, f=feed: s.run(outputs, f)) for c, s in made.items()}
        points, result.probe_load[b] = _race(steps, per_probe)
        result.sessions[b] = {k: statistics.median(p.times) * 1e6 for k, p in points.items()}
        result.speedup[b] = _speedups(points, default)
        per_row = min(result.sessions[b].values()) / 1e6 / b
        best = _pick(result.speedup[b], default, margin)
        say(f"batch {b}: {best} ({result.speedup[b][best]:.2f}x the default)")
    measured = list(result.sessions)
    plan = choose_sessions({b: {c: result.speedup[b][labels[c]] for c in cands} for b in measured}, margin)

    big = measured[-1]
    if chunk_share and big <= CpuPlan().max_rows:
        result.notes.append(f"row chunking not measured (needs a batch above {CpuPlan().max_rows}); default kept")
    elif chunk_share:
        rows = [r for r in CHUNK_SIZES if r < big]
        x = probe_input(spec, big)
        engines = {str(r): CpuEngine(model, name, spec, replace(plan, max_rows=r, small_batch_max=0), 3) for r in rows}
        points, cores = _race({r: (lambda e=e: e.run(x)) for r, e in engines.items()}, seconds * chunk_share)
        reference = str(CpuPlan().max_rows)
        speed = _speedups(points, reference)
        best = _pick(speed, reference, margin)
        result.chunking = {
            "batch": big,
            "us": {r: statistics.median(p.times) * 1e6 for r, p in points.items()},
            "speedup": speed,
            "chosen": int(best),
            "other_cores": round(cores, 3),
        }
        plan = replace(plan, max_rows=int(best))
        say(f"batch {big}: {'one run' if best == '0' else best + ' rows per run'} ({speed[best]:.2f}x {reference})")
    result.plan = plan
    result.seconds = time.perf_counter() - started
    load = other_load(counters)
    result.other_cores = load["other_cores"] if load else None
    kept = max([*result.probe_load.values(), result.chunking.get("other_cores", 0.0)])
    if kept > BUSY_CORES:
        result.notes.append(
            f"other processes used up to {kept:.2f} cores during the measurements kept (after retries): "
            "the plan suits a machine that busy; tune again when it is quiet if it usually is"
        )
    return result


def tune_export(
    export_dir: str | os.PathLike,
    *,
    graph: str = DECODER,
    precision: str = "fp32",
    seconds: float = DEFAULT_SECONDS,
    save: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[TuneResult, plans.CachedPlan | None]:
    """Tune the plan of one graph file of an export folder (checked against its sha256) and cache
    it for this machine (``save``); ``VAERuntime(export_dir, cpu_plan="auto")`` then uses it."""
    if graph not in (DECODER, ENCODER):
        raise UsageError(f"graph must be {DECODER!r} or {ENCODER!r}, got {graph!r}")
    if precision not in PRECISION_FORMAT:
        raise UsageError(f"precision must be one of {tuple(PRECISION_FORMAT)}, got {precision!r}")
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    fmt = PRECISION_FORMAT[precision] if graph == DECODER else "onnx"
    entry = manifest.entry(graph, fmt)
    if entry is None:
        raise ExportError(f"{export_dir} lists no {graph} {fmt!r} file; it has {manifest.formats(graph) or 'none'}")
    model = read_verified(export_dir, entry)
    result = tune_plan(model, entry.spec, name=f"{entry.file} in {export_dir}", seconds=seconds, log=log)
    cached = plans.save_plan(entry.sha256, result.plan, result.to_dict()) if save else None
    return result, cached


def tune_bytes(model: bytes, spec: GraphSpec, name: str, seconds: float = DEFAULT_SECONDS) -> plans.CachedPlan:
    """Tune and cache the plan of a model given as bytes (what ``cpu_plan="tuned"`` runs once)."""
    result = tune_plan(model, spec, name=name, seconds=seconds)
    return plans.save_plan(sha256_bytes(model), result.plan, result.to_dict())

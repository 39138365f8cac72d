"""Benchmark an export's encoder or decoder on every backend, side by side, against the machine's limit.

    report = run_bench("exported", batch_sizes=(1, 64, 4096))   # what `vae-deploy bench` runs
    print(format_table(report)); write_json(report, "out.json"); plot_throughput(report, "out.png")

Backends (names as in the JSON): ``eager`` (the checkpoint's PyTorch module, inference mode),
``torchscript``, ``pt2`` (torch.export), ``onnx-cpu`` (``VAERuntime`` on the CPU), ``onnx-cpu-bare``
(``InferenceSession.run`` on the very session ``VAERuntime`` uses at that batch size: the cost of
the wrapper, validation included), ``onnx-cpu-default`` (a bare session with onnxruntime's default
options: what tuning bought), ``onnx-cpu-int8`` (``quantize_dynamic`` QInt8 of the ONNX graph,
made in a temporary folder for this run, run through ``VAERuntime`` like ``onnx-cpu``, with its
error against fp32 reported), and on a CUDA machine ``eager-cuda``, ``onnx-cuda`` (IOBinding with
device-resident input and output), ``onnx-cuda-graph`` (the same with a captured CUDA graph) and
``onnx-cuda-fp16`` (the export's half-precision decoder). CPU rows take numpy in and give numpy
out; CUDA rows keep input and output on the device and synchronise after every call. A backend
that cannot run here is reported under ``skipped`` with the reason; it never stops the run.

Method: every batch size gets one input (seeded), shared by all backends. Each backend is warmed
up, then the backends take turns (round robin, so machine noise hits them alike) running timed
rounds of ~0.05 s of single calls, each timed alone, with the process quiesced in between (thread
pools that still spin from the previous backend would steal its cores). The rounds go on until
every backend's median latency moved less than ``settle`` (2%) over its last round after at least
``min_rounds`` rounds, or spent its time budget. Throughput is batch size / median latency. The
same run measures the machine's limits (the best large fp32 matmul in torch and numpy on the CPU,
sampled at the start, between batch sizes and at the end; on a GPU dense matmul TFLOP/s per
precision and device-copy bandwidth), and ``fraction_of_peak`` = achieved FLOP/s / that peak, with
the FLOPs per sample counted from the model config (2 x the multiply-accumulates of every Linear,
Conv2d and ConvTranspose2d; biases and activations are not counted), as in nanoGPT's MFU. The CPU
time other processes took during the run is recorded (``machine.other_load``, in cores).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy import __version__
from vae_deploy.config import ModelConfig, model_config_from_dict
from vae_deploy.errors import ConfigError, MissingExtraError, UsageError, VaeDeployError
from vae_deploy.files import atomic_write, sha256_file
from vae_deploy.manifest import MANIFEST, check_manifest

GRAPHS = ("decoder", "encoder")
CPU_BACKENDS = (
    "eager",
    "torchscript",
    "pt2",
    "onnx-cpu",
    "onnx-cpu-bare",
    "onnx-cpu-default",
    "onnx-cpu-int8",
)
CUDA_BACKENDS = ("eager-cuda", "onnx-cuda", "onnx-cuda-graph", "onnx-cuda-fp16")
BACKENDS = CPU_BACKENDS + CUDA_BACKENDS
DEFAULT_BATCH_SIZES = (1, 8, 64, 512, 4096)
QUICK_BATCH_SIZES = (1, 64)
INT8_ERROR_ROWS = 1024  # rows compared against fp32 for the int8 error figures
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")
_REFERENCES = ("eager", "onnx-cpu", "onnx-cpu-bare")  # rows others are compared with (ratios)


@dataclass(frozen=True)
class Budget:
    """How long each (backend, batch size) point is timed, and the size of the limit measurements."""

    warmup_s: float = 0.2  # untimed calls before the first round (at least 3 calls)
    round_s: float = 0.05  # timed calls per round per backend (at least 1 call)
    min_rounds: int = 10
    max_s: float = 3.0  # a point counts as done after this much timed time even if not settled
    settle: float = 0.02  # settled: the median moved less than this (relative) over the last round
    matmul_n: int = 4096  # CPU peak: best of `matmul_repeats` n x n x n fp32 matmuls
    matmul_repeats: int = 3
    gpu_matmul_n: int = 8192
    copy_mib: int = 256  # memory-bandwidth copy size

    def __post_init__(self) -> None:
        if min(self.warmup_s, self.round_s, self.max_s, self.settle) <= 0 or self.min_rounds < 1:
            raise UsageError(f"benchmark budget values must be positive: {self}")


QUICK_BUDGET = Budget(
    warmup_s=0.02,
    round_s=0.03,
    min_rounds=2,
    max_s=0.15,
    matmul_n=2048,
    matmul_repeats=2,
    gpu_matmul_n=4096,
    copy_mib=64,
)


class Unavailable(Exception):
    """A backend cannot run on this machine or with this export; the message says why."""


# --- FLOPs from the model config ----------------------------------------------------------------


def flops_per_sample(cfg: ModelConfig, graph: str = "decoder") -> int:
    """FLOPs of one sample through the encoder or decoder: 2 x MACs of Linear/Conv2d/ConvTranspose2d.

    Shapes come from running the module once on the ``meta`` device (no memory, no arithmetic),
    so any architecture the config describes is counted the same way.
    """
    import torch
    from torch import nn

    from vae_deploy.model import VAE

    if graph not in GRAPHS:
        raise UsageError(f"graph must be one of {GRAPHS}, got {graph!r}")
    with torch.device("meta"):
        model = VAE(cfg)
    module = getattr(model, graph)
    total = 0

    def count(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * output.numel()
        elif isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += 2 * (mod.in_channels // mod.groups) * kh * kw * output.numel()
        elif isinstance(mod, nn.ConvTranspose2d):  # every input pixel scatters a k x k x C_out patch
            kh, kw = mod.kernel_size
            total += 2 * inputs[0].numel() * (mod.out_channels // mod.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    try:
        x = (
            torch.empty(1, cfg.latent_dim, device="meta")
            if graph == "decoder"
            else torch.empty(1, *cfg.image_shape, device="meta")
        )
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return int(total)


# --- the machine and its limits -----------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    return []


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where there is one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_counters() -> tuple[float, float, float, float] | None:
    """(wall s, CPU-busy s of the whole machine, of it stolen by the hypervisor, this process's CPU s)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = (user + nice + system + irq + softirq + steal) / tick
    return time.perf_counter(), busy, steal / tick, time.process_time()


def other_load(start: tuple[float, float, float, float] | None) -> dict[str, float] | None:
    """Average cores that other processes (and hypervisor steal) used since ``start``: 0 is a quiet run."""
    end = _cpu_counters()
    if start is None or end is None or end[0] <= start[0]:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[3] - start[3])
    return {
        "other_cores": round(max(0.0, others) / wall, 3),
        "steal_cores": round((end[2] - start[2]) / wall, 3),
    }


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, core count, load, GPU, library versions."""
    import onnxruntime as ort
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": cpu_count(),
        "cpu_flags": _cpu_flags(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "vae_deploy": __version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_start": _load(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return info


def machine_slug(machine: dict[str, Any]) -> str:
    """A file-name-safe name for a machine: its GPU, else its CPU model and core count."""
    name = machine.get("gpu") or f"{machine.get('cpu', 'cpu')} {machine.get('cpus', '')}c"
    for junk in ("(R)", "(TM)", "CPU", "Processor", "NVIDIA"):
        name = name.replace(junk, " ")
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in slug.split("-") if p) or "machine"


def _best_time(fn: Callable[[], None], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_limits(budget: Budget = Budget(), cuda: bool | None = None) -> dict[str, Any]:
    """The machine's own ceilings, measured now: CPU fp32 matmul GFLOP/s and copy GB/s; on a GPU the
    dense matmul TFLOP/s in fp32, tf32, fp16 and bf16 and the device-copy bandwidth."""
    import torch

    n = budget.matmul_n
    limits: dict[str, Any] = {
        "cpu_fp32_matmul_gflops": cpu_matmul_gflops(n, budget.matmul_repeats),
        "cpu_matmul_n": n,
        "cpu_copy_gbps": _copy_gbps(budget.copy_mib * 2**20, "cpu", 1, 3),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        limits.update(_gpu_limits(budget))
    return limits


def cpu_matmul_gflops(n: int = 4096, repeats: int = 3) -> float:
    """fp32 GFLOP/s of the best n x n x n matmul (of ``repeats`` each) in torch (MKL) and numpy (its
    own BLAS, OpenBLAS in the wheels): the faster library is the CPU's attainable peak. On AMD CPUs
    MKL can pick slower kernels than OpenBLAS, and a "peak" a backend beats is not a peak."""
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    t_numpy = _best_time(lambda: np.matmul(a, a, out=c), repeats)
    t_torch = _matmul_seconds(n, torch.float32, "cpu", 1, repeats)
    return 2 * n**3 / min(t_numpy, t_torch) / 1e9


def _matmul_seconds(n: int, dtype: Any, device: str, calls: int, repeats: int) -> float:
    """Best time of ``calls`` back-to-back n x n x n matmuls (a warm-up call first)."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def mm() -> None:
        for _ in range(calls):
            torch.mm(a, b, out=c)

    return _best_time(mm, repeats, sync) / calls


def _copy_gbps(nbytes: int, device: str, calls: int, repeats: int) -> float:
    """Memory bandwidth of a large copy: bytes read + written per second, in GB/s."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def copy() -> None:
        for _ in range(calls):
            dst.copy_(src)

    return calls * 2 * nbytes / _best_time(copy, repeats, sync) / 1e9


def _gpu_limits(budget: Budget) -> dict[str, Any]:
    """Dense matmul TFLOP/s per precision (TF32 only where named) and device-copy bandwidth."""
    import torch

    n = budget.gpu_matmul_n
    out: dict[str, Any] = {"gpu_matmul_n": n}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, allow_tf32 in (
            ("fp32", torch.float32, False),
            ("tf32", torch.float32, True),
            ("fp16", torch.float16, False),
            ("bf16", torch.bfloat16, False),
        ):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            out[f"gpu_{key}_matmul_tflops"] = 2 * n**3 / _matmul_seconds(n, dtype, "cuda", 10, 5) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out["gpu_copy_gbps"] = _copy_gbps(4 * budget.copy_mib * 2**20, "cuda", 10, 5)
    torch.cuda.empty_cache()
    return out


def _peak_flops(limits: dict[str, Any], key: str) -> float | None:
    if key == "cpu_fp32":
        v = limits.get("cpu_fp32_matmul_gflops")
        return v * 1e9 if v else None
    v = limits.get(f"gpu_{key.removeprefix('gpu_')}_matmul_tflops")
    return v * 1e12 if v else None


# --- timing -------------------------------------------------------------------------------------


@dataclass
class _Point:
    """Per-call times of one (backend, batch size) point, round by round."""

    times: list[float] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)  # running median after each round
    round_medians: list[float] = field(default_factory=list)  # median of each round alone

    def add_round(self, times: list[float]) -> None:
        self.times += times
        self.medians.append(statistics.median(self.times))
        self.round_medians.append(statistics.median(times))

    def settled(self, budget: Budget) -> bool:
        if len(self.medians) < max(2, budget.min_rounds):
            return False
        a, b = self.medians[-2], self.medians[-1]
        return abs(b - a) <= budget.settle * a

    def done(self, budget: Budget) -> bool:
        return self.settled(budget) or sum(self.times) >= budget.max_s


def _timed_round(step: Callable[[], Any], seconds: float) -> list[float]:
    """Run ``step`` (once untimed, to re-warm after another backend ran) then time single calls."""
    step()
    clock = time.perf_counter
    times: list[float] = []
    end = clock() + seconds
    while True:
        t0 = clock()
        step()
        t1 = clock()
        times.append(t1 - t0)
        if t1 >= end:
            return times


def _quiesce(max_s: float = 0.25, window_s: float = 0.004) -> float:
    """Sleep until this process's threads stop using CPU (at most ``max_s``); returns the wait.

    Thread pools keep spinning after their last call (measured here: onnxruntime's ~40 ms, torch's
    OpenMP a few ms) and would steal a core from whichever backend runs next on a small machine.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        c0 = time.process_time()
        time.sleep(window_s)
        if time.process_time() - c0 < 0.1 * window_s:
            break
    return time.perf_counter() - start


def _warm_up(step: Callable[[], Any], seconds: float) -> None:
    end = time.perf_counter() + seconds
    calls = 0
    while calls < 3 or time.perf_counter() < end:
        step()
        calls += 1


def _quantile(sorted_times: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    return float(np.quantile(np.asarray(sorted_times), q))


# --- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured (backend, batch size) point."""

    backend: str
    graph: str
    batch_size: int
    latency_ms: dict[str, float]  # p50, p90, p99, mean, min
    samples_per_s: float
    fraction_of_peak: float | None
    gflop_per_s: float
    peak: str  # which limit fraction_of_peak is taken against
    runs: int
    rounds: int
    settled: bool
    threads: dict[str, Any]
    ratios: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


@dataclass
class BenchReport:
    """Everything one benchmark run measured; ``to_dict`` is the ``--json`` schema."""

    machine: dict[str, Any]
    limits: dict[str, Any]
    settings: dict[str, Any]
    results: list[Row]
    skipped: list[dict[str, Any]]
    errors: dict[str, dict[str, float]]  # backend -> output error against fp32 (int8)

    def row(self, backend: str, batch_size: int) -> Row | None:
        return next((r for r in self.results if r.backend == backend and r.batch_size == batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "limits": self.limits,
            "settings": self.settings,
            "results": [r.to_dict() for r in self.results],
            "skipped": self.skipped,
            "errors": self.errors,
        }


# --- backends -----------------------------------------------------------------------------------


@dataclass
class Backend:
    """A way to run one graph: ``prepare(x)`` returns a zero-argument step that runs one batch."""

    name: str
    prepare: Callable[[np.ndarray], Callable[[], Any]]
    threads: Callable[[int], dict[str, Any]]
    peak: str = "cpu_fp32"


@dataclass
class _Context:
    """What backends are built from: the checked export folder, the graph, the checkpoint, a temp dir."""

    export_dir: Path
    manifest: dict[str, Any]
    graph: str
    checkpoint: Path | None
    tmp: Path
    _model: Any = None
    _runtime: Any = None

    def file(self, fmt: str) -> Path:
        entry = self.manifest["graphs"].get(self.graph, {}).get(fmt)
        if entry is None:
            have = ", ".join(sorted(self.manifest["graphs"].get(self.graph, {}))) or "none"
            hint = " (export with --fp16)" if fmt == "onnx-fp16" else f" (export with --formats ...,{fmt})"
            raise Unavailable(f"the export has no {self.graph} {fmt} file (it has: {have}){hint}")
        return self.export_dir / entry["file"]

    def module(self) -> Any:
        """The checkpoint's encoder or decoder (eval mode), loaded once."""
        if self._model is None:
            from vae_deploy.checkpoint import load_checkpoint

            if self.checkpoint is None or not self.checkpoint.is_file():
                listed = self.manifest.get("checkpoint", {}).get("path")
                raise Unavailable(f"checkpoint not found ({self.checkpoint or listed}); pass --checkpoint for eager")
            self._model = load_checkpoint(self.checkpoint)
        return getattr(self._model, self.graph)

    def runtime(self) -> Any:
        if self._runtime is None:
            from vae_deploy.runtime import VAERuntime

            self._runtime = VAERuntime(self.export_dir, "cpu")
        return self._runtime


def _torch_threads(_: int) -> dict[str, Any]:
    import torch

    return {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()}


def _torch_backend(name: str, load: Callable[[], Any]) -> Backend:
    import torch

    module = load()

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        xt = torch.from_numpy(x)

        def step() -> Any:
            with torch.inference_mode():
                out = module(xt)
            return out.numpy() if isinstance(out, torch.Tensor) else [o.numpy() for o in out]

        return step

    return Backend(name, prepare, _torch_threads)


def _load_torchscript(path: Path) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _load_pt2(path: Path) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path)).module()


def _graph_of(rt: Any, graph: str) -> Any:
    return rt._decoder if graph == "decoder" else rt._encoder_graph()


def runtime_session(rt: Any, graph: str, batch_size: int) -> Any:
    """The onnxruntime session ``VAERuntime`` runs a CPU batch of this size on (for ``onnx-cpu-bare``)."""
    g = _graph_of(rt, graph)
    small, small_max = getattr(g, "small", None), getattr(g, "small_max", 0)
    return small if small is not None and batch_size <= small_max else g.session


def runtime_threads(rt: Any, graph: str, batch_size: int) -> dict[str, Any]:
    """The options of the session behind a batch size: intra/inter-op threads, spinning, optimization."""
    sess = runtime_session(rt, graph, batch_size)
    cfg = sess.get_session_options()
    intra = cfg.intra_op_num_threads
    spin = cfg.get_session_config_entry("session.intra_op.allow_spinning") if _has_entry(cfg) else None
    return {
        "ort_intra_op": intra if intra > 0 else f"default ({cpu_count()})",
        "ort_inter_op": cfg.inter_op_num_threads or "default",
        "spinning": {"0": False, "1": True}.get(spin, "default (on)"),
        "optimization": str(cfg.graph_optimization_level).rsplit(".", 1)[-1],
    }


def _runtime_backend_threads(rt: Any, graph: str) -> Callable[[int], dict[str, Any]]:
    """runtime_threads plus how VAERuntime splits a large batch into runs (CpuPlan.max_rows)."""

    def threads(batch_size: int) -> dict[str, Any]:
        out = runtime_threads(rt, graph, batch_size)
        rows = getattr(rt.cpu_plan, "max_rows", 0)
        if 0 < rows < batch_size:
            out["rows_per_run"] = rows
        return out

    return threads


def _has_entry(cfg: Any) -> bool:
    try:
        cfg.get_session_config_entry("session.intra_op.allow_spinning")
        return True
    except Exception:  # noqa: BLE001 - onnxruntime raises when the entry was never set
        return False


def _run_step(rt: Any, graph: str, x: np.ndarray) -> Callable[[], Any]:
    return (lambda: rt.decode(x)) if graph == "decoder" else (lambda: rt.encode(x))


def _onnx_cpu(ctx: _Context) -> Backend:
    rt = ctx.runtime()
    _graph_of(rt, ctx.graph)  # open the encoder now, not inside the first timed call
    return Backend("onnx-cpu", lambda x: _run_step(rt, ctx.graph, x), _runtime_backend_threads(rt, ctx.graph))


def _onnx_cpu_bare(ctx: _Context) -> Backend:
    rt = ctx.runtime()

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        sess = runtime_session(rt, ctx.graph, x.shape[0])
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)

    return Backend("onnx-cpu-bare", prepare, lambda b: runtime_threads(rt, ctx.graph, b))


def _onnx_cpu_default(ctx: _Context) -> Backend:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(ctx.file("onnx")), so, providers=["CPUExecutionProvider"])

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)

    threads = {
        "ort_intra_op": f"default ({cpu_count()})",
        "ort_inter_op": "default",
        "spinning": "default (on)",
    }
    return Backend("onnx-cpu-default", prepare, lambda b: threads)


INT8_MIN_K = 64  # matmuls with a shorter reduction stay fp32 (see quantize_int8)


def quantize_int8(src: Path, dst: Path, min_k: int = INT8_MIN_K) -> list[str]:
    """Dynamic int8 quantization (QInt8 weights, MatMulInteger: VNNI on AVX-512 CPUs) of one ONNX file;
    returns the names of the matmuls kept in fp32.

    Gemm/MatMul nodes whose reduction is shorter than ``min_k`` stay fp32: such a layer is a tiny
    share of the FLOPs, so int8 buys it no speed, only error (measured on the 20-400-784 decoder:
    same speed at batch 1 to 4096, mean pixel error 0.066/255 instead of 0.135/255). The exporter's
    value_info is dropped first: the quantizer turns Gemm into MatMul with transposed weights, and
    its shape inference would trip over the stale weight shapes.
    """
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    for prop in model.metadata_props:
        if prop.key == "vae_deploy.precision":
            prop.value = "int8"
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        weight = shapes.get(node.input[1]) if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 else None
        if weight is None or len(weight) != 2 or not node.name:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if (weight[1] if trans_b else weight[0]) < min_k:
            keep.append(node.name)  # the quantizer turns Gemm X into MatMul "X_MatMul" + Add first
    excluded = keep + [f"{name}_MatMul" for name in keep]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a "consider pre-processing" warning
    try:
        quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    finally:
        root.setLevel(level)
    return keep


def _int8_export(ctx: _Context) -> Path:
    """A temporary export folder whose manifest lists the int8 graph as its ONNX file."""
    folder = ctx.tmp / "int8"
    folder.mkdir(exist_ok=True)
    name = f"{ctx.graph}.onnx"
    quantize_int8(ctx.file("onnx"), folder / name)
    manifest = json.loads(json.dumps(ctx.manifest))
    entry = dict(manifest["graphs"][ctx.graph]["onnx"])
    entry.update(file=name, sha256=sha256_file(folder / name), precision="int8")
    manifest["graphs"] = {ctx.graph: {"onnx": entry}}
    if ctx.graph == "encoder":  # VAERuntime always opens the decoder: keep the fp32 one beside it
        decoder = ctx.manifest["graphs"]["decoder"]["onnx"]
        shutil.copy(ctx.export_dir / decoder["file"], folder / decoder["file"])
        manifest["graphs"]["decoder"] = {"onnx": decoder}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def _onnx_cpu_int8(ctx: _Context) -> Backend:
    from vae_deploy.runtime import VAERuntime

    rt = VAERuntime(_int8_export(ctx), "cpu")
    _graph_of(rt, ctx.graph)
    return Backend("onnx-cpu-int8", lambda x: _run_step(rt, ctx.graph, x), _runtime_backend_threads(rt, ctx.graph))


def int8_error(ctx: _Context, backend: Backend, fp32: Backend, rows: int = INT8_ERROR_ROWS) -> dict[str, float]:
    """Mean and max absolute difference of the first output (pixels, or mu) between int8 and fp32."""
    x = _inputs(ctx, rows)
    a, b = backend.prepare(x)(), fp32.prepare(x)()
    a = a if isinstance(a, np.ndarray) else a[0]
    b = b if isinstance(b, np.ndarray) else b[0]
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    out = {"rows": rows, "mean_abs": float(diff.mean()), "max_abs": float(diff.max())}
    if ctx.graph == "decoder":  # pixels in [0, 1]: also in 8-bit levels
        out.update(mean_abs_255=out["mean_abs"] * 255, max_abs_255=out["max_abs"] * 255)
    return out


# CUDA backends: device-resident input/output, synchronised after each call --------------------


def _require_torch_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU (torch.cuda.is_available() is False)")


def _eager_cuda(ctx: _Context) -> Backend:
    import torch

    _require_torch_cuda()
    cuda_module = copy.deepcopy(ctx.module()).to("cuda")  # a copy: the CPU module stays for eager

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        xt = torch.from_numpy(x).to("cuda")

        def step() -> Any:
            with torch.inference_mode():
                out = cuda_module(xt)
            torch.cuda.synchronize()
            return out

        return step

    return Backend("eager-cuda", prepare, _torch_threads, peak="gpu_fp32")


def _ort_cuda_session(path: Path, cuda_graph: bool) -> Any:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Unavailable(f"this onnxruntime build ({ort.__version__}) has no CUDA execution provider")
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(Exception):
                ort.preload_dlls()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    options = {"device_id": "0", **({"enable_cuda_graph": "1"} if cuda_graph else {})}
    ort.set_default_logger_severity(4)  # a failed CUDA provider load is reported below, not logged red
    try:
        sess = ort.InferenceSession(
            str(path), so, providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - becomes a skip reason
        raise Unavailable(f"CUDA session creation failed: {str(exc).strip().splitlines()[0][:200]}") from None
    finally:
        ort.set_default_logger_severity(3)
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        raise Unavailable("onnxruntime could not use the CUDA execution provider (its session fell back to CPU)")
    return sess


def _np_type(ort_type: str) -> Any:
    return np.float16 if ort_type == "tensor(float16)" else np.float32


def _onnx_cuda(ctx: _Context, name: str) -> Backend:
    import onnxruntime as ort

    _require_torch_cuda()
    fp16, graph = name == "onnx-cuda-fp16", name == "onnx-cuda-graph"
    if fp16 and ctx.graph != "decoder":
        raise Unavailable("the half-precision ONNX file is decoder-only")
    path = ctx.file("onnx-fp16" if fp16 else "onnx")
    shared = None if graph else _ort_cuda_session(path, cuda_graph=False)

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        # a CUDA graph is captured for fixed shapes and addresses: one session per batch size
        sess = _ort_cuda_session(path, cuda_graph=True) if graph else shared
        meta_in = sess.get_inputs()[0]
        x_dev = ort.OrtValue.ortvalue_from_numpy(x.astype(_np_type(meta_in.type)), "cuda", 0)
        outs = [
            ort.OrtValue.ortvalue_from_shape_and_type([x.shape[0], *o.shape[1:]], _np_type(o.type), "cuda", 0)
            for o in sess.get_outputs()
        ]
        binding = sess.io_binding()
        binding.bind_ortvalue_input(meta_in.name, x_dev)
        for o, value in zip(sess.get_outputs(), outs):
            binding.bind_ortvalue_output(o.name, value)

        def step() -> Any:
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return outs

        step()  # with a CUDA graph, the first run captures it
        return step

    peak = "gpu_fp16" if fp16 else "gpu_tf32"  # onnxruntime's CUDA EP allows TF32 math by default
    return Backend(name, prepare, lambda b: {"device": "cuda:0", "iobinding": True}, peak=peak)


def _make_backend(name: str, ctx: _Context) -> Backend:
    if name == "eager":
        return _torch_backend(name, ctx.module)
    if name == "torchscript":
        path = ctx.file("torchscript")
        return _torch_backend(name, lambda: _load_torchscript(path))
    if name == "pt2":
        path = ctx.file("pt2")
        return _torch_backend(name, lambda: _load_pt2(path))
    if name == "onnx-cpu":
        return _onnx_cpu(ctx)
    if name == "onnx-cpu-bare":
        return _onnx_cpu_bare(ctx)
    if name == "onnx-cpu-default":
        return _onnx_cpu_default(ctx)
    if name == "onnx-cpu-int8":
        return _onnx_cpu_int8(ctx)
    if name == "eager-cuda":
        return _eager_cuda(ctx)
    return _onnx_cuda(ctx, name)


# --- the run ------------------------------------------------------------------------------------


def parse_backends(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Backend names from a list or a comma-separated string; None means all of them."""
    if value is None:
        return BACKENDS
    names = [v for v in value.replace(" ", "").split(",") if v] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown backend(s) {unknown or names}; expected some of: {', '.join(BACKENDS)}")
    return tuple(dict.fromkeys(names))


def _check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in sizes):
        raise UsageError(f"batch sizes must be positive integers, got {list(sizes)}")
    return tuple(sorted(set(int(b) for b in sizes)))


def _resolve_checkpoint(export_dir: Path, manifest: dict[str, Any], checkpoint: Any) -> Path | None:
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise UsageError(f"--checkpoint {path} does not exist")
        return path
    listed = manifest.get("checkpoint", {}).get("path")
    if not listed:
        return None
    for candidate in (Path(listed), export_dir / listed, export_dir.parent / listed):
        if candidate.is_file():
            return candidate
    return None


def _inputs(ctx: _Context, batch: int) -> np.ndarray:
    """The one seeded input every backend gets: z ~ N(0, I) for the decoder, pixels in [0, 1) else."""
    rng = np.random.default_rng(batch)
    if ctx.graph == "decoder":
        return rng.standard_normal((batch, int(ctx.manifest["latent_dim"])), dtype=np.float32)
    return rng.random((batch, *map(int, ctx.manifest["image_shape"])), dtype=np.float32)


@contextlib.contextmanager
def _tqdm(total: int, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="bench", unit="pt", disable=not enabled, leave=False, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def run_bench(
    export_dir: str | os.PathLike,
    *,
    backends: str | Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    graph: str = "decoder",
    checkpoint: str | os.PathLike | None = None,
    quick: bool = False,
    budget: Budget | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> BenchReport:
    """Benchmark ``graph`` of an export folder on each backend at each batch size (see module doc).

    ``quick`` uses batch sizes 1 and 64 (unless given) and a small time budget: for smoke runs.
    """
    if graph not in GRAPHS:
        raise UsageError(f"--graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    names = parse_backends(backends)
    sizes = _check_batch_sizes(batch_sizes or (QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES))
    budget = budget or (QUICK_BUDGET if quick else Budget())
    export_dir = Path(export_dir)
    manifest = check_manifest(export_dir)  # every listed file against its sha256 before any loads
    if graph not in manifest["graphs"]:
        raise UsageError(f"{export_dir} has no {graph} graph (it has {', '.join(manifest['graphs'])})")
    try:
        cfg = model_config_from_dict(manifest["model_config"])
    except (KeyError, ConfigError) as exc:
        raise UsageError(f"{export_dir}/{MANIFEST} has no valid model_config: {exc}") from None
    flops = flops_per_sample(cfg, graph)
    import torch

    started = time.perf_counter()
    counters = _cpu_counters()
    machine = machine_info()
    log(f"measuring machine limits (fp32 matmul {budget.matmul_n}^3, best of {budget.matmul_repeats}) ...")
    limits = measure_limits(budget)
    peaks = [limits["cpu_fp32_matmul_gflops"]]
    with tempfile.TemporaryDirectory(prefix="vae-deploy-bench-") as tmp:
        ckpt = _resolve_checkpoint(export_dir, manifest, checkpoint)
        ctx = _Context(export_dir, manifest, graph, ckpt, Path(tmp))
        ckpt_note = _checkpoint_note(ctx)
        ready: dict[str, Backend] = {}
        skipped: list[dict[str, Any]] = []
        for name in names:
            try:
                ready[name] = _make_backend(name, ctx)
            except (Unavailable, VaeDeployError) as exc:
                skipped.append({"backend": name, "batch_size": None, "reason": str(exc)})
            except Exception as exc:  # noqa: BLE001 - one broken backend must not stop the others
                reason = f"{type(exc).__name__}: {exc}"
                skipped.append({"backend": name, "batch_size": None, "reason": reason})
        errors: dict[str, dict[str, float]] = {}
        if "onnx-cpu-int8" in ready:
            fp32 = ready.get("onnx-cpu") or _onnx_cpu(ctx)
            errors["onnx-cpu-int8"] = int8_error(ctx, ready["onnx-cpu-int8"], fp32)
        results: list[Row] = []
        with torch.inference_mode(), _tqdm(len(sizes) * len(ready), progress) as bar:
            for batch in sizes:
                results += _bench_batch(ctx, ready, batch, budget, flops, skipped, bar)
                peaks.append(cpu_matmul_gflops(budget.matmul_n, 1))  # sampled through the run
    # the peak is the best of all its samples: one dented by a passing load spike is not the peak
    peaks.append(cpu_matmul_gflops(budget.matmul_n, budget.matmul_repeats))
    limits["cpu_fp32_matmul_gflops_samples"] = [round(p, 1) for p in peaks]
    limits["cpu_fp32_matmul_gflops"] = max(peaks)
    _set_fractions(results, limits, {name: b.peak for name, b in ready.items()})
    for row in results:
        if row.backend in errors:
            row.extra["error_vs_fp32"] = errors[row.backend]
    machine["load_avg_end"] = _load()
    machine["other_load"] = other_load(counters)  # CPU others took while this ran (cores)
    settings = {
        "graph": graph,
        "export_dir": str(export_dir),
        "checkpoint": str(ctx.checkpoint) if ctx.checkpoint else None,
        "checkpoint_note": ckpt_note,
        "model_config": manifest["model_config"],
        "flops_per_sample": flops,
        "batch_sizes": list(sizes),
        "backends": list(names),
        "budget": budget.__dict__,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
        "method": "round-robin per batch size; per-call perf_counter; median/p90/p99 over all timed calls",
        "int8": f"quantize_dynamic QInt8 of the fp32 ONNX graph (matmuls with K < {INT8_MIN_K} kept "
        "fp32) in a temporary folder, run via VAERuntime",
        "cuda": "device-resident input/output (IOBinding for onnxruntime), synchronised after each call",
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }
    return BenchReport(machine, limits, settings, results, skipped, errors)


def _checkpoint_note(ctx: _Context) -> str | None:
    listed = ctx.manifest.get("checkpoint", {}).get("sha256")
    if ctx.checkpoint is None or not listed:
        return None
    if sha256_file(ctx.checkpoint) != listed:
        return "the checkpoint differs from the one this export was made from (timings still comparable)"
    return None


def _bench_batch(
    ctx: _Context,
    ready: dict[str, Backend],
    batch: int,
    budget: Budget,
    flops: int,
    skipped: list[dict[str, Any]],
    bar: Any,
) -> list[Row]:
    """All backends at one batch size, interleaved round by round."""
    x = _inputs(ctx, batch)
    steps: dict[str, Callable[[], Any]] = {}
    for name, backend in ready.items():
        try:
            step = backend.prepare(x)
            _warm_up(step, budget.warmup_s)
            steps[name] = step
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a large batch
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            skipped.append({"backend": name, "batch_size": batch, "reason": f"{type(exc).__name__}: {msg}"})
            bar.update(1)
    # Every backend runs a round in turn until all are done, so all sample the same stretch of time:
    # this VM's speed drifts over seconds even when idle, and that must hit every backend alike.
    points = {name: _Point() for name in steps}
    rounds = 0
    while points and not all(p.done(budget) for p in points.values()):
        rounds += 1
        for name, step in steps.items():
            bar.set_postfix_str(f"batch {batch}, round {rounds}, {name}")
            _quiesce()  # the previous backend's pool threads must stop spinning before this one runs
            points[name].add_round(_timed_round(step, budget.round_s))
    bar.update(len(points))
    rows = []
    for name, point in points.items():
        t = sorted(point.times)
        p50 = _quantile(t, 0.5)
        backend = ready[name]
        achieved = flops * batch / p50
        rows.append(
            Row(
                backend=name,
                graph=ctx.graph,
                batch_size=batch,
                latency_ms={
                    "p50": p50 * 1e3,
                    "p90": _quantile(t, 0.9) * 1e3,
                    "p99": _quantile(t, 0.99) * 1e3,
                    "mean": statistics.fmean(t) * 1e3,
                    "min": t[0] * 1e3,
                },
                samples_per_s=batch / p50,
                fraction_of_peak=None,  # set once the limits are final (see _set_fractions)
                gflop_per_s=achieved / 1e9,
                peak=backend.peak,
                runs=len(t),
                rounds=len(point.medians),
                settled=point.settled(budget),
                threads=backend.threads(batch),
                ratios=_paired_ratios(name, points),
            )
        )
    return rows


def _paired_ratios(name: str, points: dict[str, _Point]) -> dict[str, float]:
    """Throughput of ``name`` relative to each reference backend, paired round by round.

    Round r of every backend ran in the same cycle, within about a second of each other, so the
    median over r of (reference round median / this round median) cancels this VM's speed drift
    (measured here: every backend 1.4x slower for stretches of seconds, even when idle), which a
    ratio of two overall medians of a two-speed mixture does not.
    """
    mine = points[name].round_medians
    out = {}
    for ref in _REFERENCES:
        if ref != name and ref in points:
            theirs = points[ref].round_medians
            out[f"vs_{ref.replace('-', '_')}"] = statistics.median(t / m for t, m in zip(theirs, mine))
    return out


def _set_fractions(rows: list[Row], limits: dict[str, Any], peaks: dict[str, str]) -> None:
    """fraction_of_peak = achieved FLOP/s / the measured peak the backend is compared with."""
    for r in rows:
        peak = _peak_flops(limits, peaks[r.backend])
        r.fraction_of_peak = r.gflop_per_s * 1e9 / peak if peak else None


# --- output: table, JSON, plot ------------------------------------------------------------------


def format_table(report: BenchReport) -> str:
    """The console table: one line per (batch size, backend), then settings, errors and skips."""
    lim = report.limits
    lines = [
        f"{report.settings['graph']} of {report.settings['export_dir']}: "
        f"{report.settings['flops_per_sample']:,} FLOP/sample; machine: {report.machine['cpu']} "
        f"x{report.machine['cpus']}" + (f", {report.machine['gpu']}" if report.machine.get("gpu") else ""),
        f"limits: cpu fp32 matmul {lim['cpu_fp32_matmul_gflops']:.1f} GFLOP/s, "
        f"copy {lim['cpu_copy_gbps']:.1f} GB/s"
        + "".join(
            f", gpu {k} {lim[f'gpu_{k}_matmul_tflops']:.1f} TFLOP/s"
            for k in ("fp32", "tf32", "fp16", "bf16")
            if f"gpu_{k}_matmul_tflops" in lim
        )
        + (f", gpu copy {lim['gpu_copy_gbps']:.0f} GB/s" if "gpu_copy_gbps" in lim else ""),
        "",
        f"{'backend':17s} {'batch':>6s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'samples/s':>12s} "
        f"{'x eager':>8s} {'% peak':>7s} {'runs':>6s}",
    ]
    for r in report.results:
        vs = r.ratios.get("vs_eager")
        frac = "-" if r.fraction_of_peak is None else f"{100 * r.fraction_of_peak:.1f}"
        lines.append(
            f"{r.backend:17s} {r.batch_size:6d} {r.latency_ms['p50']:9.4f} {r.latency_ms['p90']:9.4f} "
            f"{r.latency_ms['p99']:9.4f} {r.samples_per_s:12,.0f} {('-' if vs is None else f'{vs:.2f}'):>8s} "
            f"{frac:>7s} {r.runs:6d}" + ("" if r.settled else "  (not settled)")
        )
    lines.append("")
    lines.append("threads:")
    for name, text in threads_summary([r.to_dict() for r in report.results]).items():
        lines.append(f"  {name}: {text}")
    for name, err in report.errors.items():
        if "mean_abs_255" in err:
            lines.append(
                f"{name} vs fp32 over {err['rows']} samples: mean |error| {err['mean_abs_255']:.3f}/255, "
                f"max {err['max_abs_255']:.2f}/255"
            )
        else:
            lines.append(f"{name} vs fp32: mean |error| {err['mean_abs']:.3g}, max {err['max_abs']:.3g}")
    for s in report.skipped:
        at = f" at batch {s['batch_size']}" if s.get("batch_size") else ""
        lines.append(f"skipped {s['backend']}{at}: {s['reason']}")
    load = report.machine.get("load_avg_start"), report.machine.get("load_avg_end")
    other = report.machine.get("other_load") or {}
    lines.append(
        f"load average (1/5/15 min): start {load[0]}, end {load[1]}; other processes used "
        f"{other.get('other_cores', '?')} cores on average during the run (hypervisor steal "
        f"{other.get('steal_cores', '?')}); took {report.settings['seconds']} s"
    )
    return "\n".join(lines)


def threads_summary(results: list[dict[str, Any]]) -> dict[str, str]:
    """Per backend, its thread settings in one line: what all batch sizes share, then what differs."""
    per: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        per.setdefault(r["backend"], {})[r["batch_size"]] = r["threads"]
    out = {}
    for name, by_batch in per.items():
        settings = list(by_batch.values())
        common = {k: v for k, v in settings[0].items() if all(s.get(k, object()) == v for s in settings)}
        parts = [", ".join(f"{k}={v}" for k, v in common.items())]
        for batch, s in by_batch.items():
            extra = {k: v for k, v in s.items() if k not in common}
            if extra:
                parts.append(f"batch {batch}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        out[name] = "; ".join(p for p in parts if p)
    return out


def write_json(report: BenchReport, path: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically (temp file + rename)."""
    path = Path(path)
    atomic_write(path, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return path


def require_matplotlib() -> None:
    """Raise MissingExtraError unless matplotlib can be imported (checked before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            "--plot needs matplotlib: pip install 'vae-deploy[viz]' (or pip install matplotlib)"
        ) from None


def plot_throughput(report: BenchReport | dict[str, Any], path: str | os.PathLike) -> Path:
    """Throughput vs batch size per backend on log axes, with the compute ceiling(s) dashed."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report.to_dict() if isinstance(report, BenchReport) else report
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--plot must end in .png, .svg or .pdf, got {path.name!r}")
    by: dict[str, list[tuple[int, float]]] = {}
    for r in data["results"]:
        by.setdefault(r["backend"], []).append((r["batch_size"], r["samples_per_s"]))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, pts in by.items():
        pts.sort()
        style = "--" if "cuda" in name else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
    flops = data["settings"]["flops_per_sample"]
    lim = data["limits"]
    ceilings = [("cpu fp32 matmul peak: compute ceiling", lim.get("cpu_fp32_matmul_gflops", 0) * 1e9)]
    ceilings += [
        (f"gpu {k} peak", lim[f"gpu_{k}_matmul_tflops"] * 1e12)
        for k in ("fp32", "fp16")
        if f"gpu_{k}_matmul_tflops" in lim
    ]
    for label, peak in ceilings:
        if peak:
            ax.axhline(peak / flops, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                label,
                (0.01, peak / flops),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="grey",
                va="bottom",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    m = data["machine"]
    where = f"{m.get('gpu') or m.get('cpu')} ({m.get('cpus')} cpus)"
    ax.set_title(f"{data['settings']['graph']} throughput: {where}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


__all__ = [
    "BACKENDS",
    "BenchReport",
    "Budget",
    "QUICK_BUDGET",
    "Row",
    "flops_per_sample",
    "format_table",
    "machine_info",
    "machine_slug",
    "measure_limits",
    "plot_throughput",
    "quantize_int8",
    "run_bench",
    "write_json",
]

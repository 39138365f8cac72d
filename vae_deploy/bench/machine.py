"""The machine a benchmark runs on: what it is, how busy others keep it, and its measured limits.

Limits are the machine's own ceilings, measured now: the best large fp32 matmul on the CPU (torch
and numpy, whichever is faster), the best-precision ceilings beside it (onnxruntime's int8 matmul,
VNNI/AMX where the CPU has them; torch's bf16 matmul where it has bf16 hardware), copy bandwidth,
and on a GPU dense matmul TFLOP/s per precision. torch and onnx are imported inside the functions
that measure with them, never at import.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy import __version__, plans
from vae_deploy.bench.budget import Budget
from vae_deploy.engines import cpu_count

CpuCounters = tuple[float, float, float, float]

# --- what the machine is ------------------------------------------------------------------------


REPORTED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # without these torch's bf16 matmul is emulated (measured 0.2 GFLOP/s)


def cpu_model() -> str:
    return plans.cpu_model()


def cpu_flags() -> list[str]:
    """The vector/matrix extensions that matter for these kernels, of those the CPU has."""
    return plans.cpu_flags(REPORTED_FLAGS)


def isa_level(flags: list[str]) -> str:
    """The best matrix/vector extension in a few letters ("amx", "avx512-vnni", "avx512", "avx2", ...)."""
    for flag, name in (
        ("amx_int8", "amx"),
        ("avx512_vnni", "avx512-vnni"),
        ("avx512f", "avx512"),
        ("avx_vnni", "avx-vnni"),
        ("avx2", "avx2"),
    ):
        if flag in flags:
            return name
    return platform.machine().lower()


def load_avg() -> list[float] | None:
    """The 1/5/15-minute load averages, where the OS has them."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, core count, load, GPU, library versions."""
    import onnxruntime as ort
    import torch

    return {
        "cpu": cpu_model(),
        "cpus": cpu_count(),
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "vae_deploy": __version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_start": load_avg(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine_slug(machine: dict[str, Any]) -> str:
    """A file-name-safe name for a machine: its GPU, else its CPU model, its best vector extension
    (a KVM guest may call a Zen 3 and a Zen 4 both "AMD EPYC") and its core count."""
    isa = isa_level(machine.get("cpu_flags") or []) if "cpu_flags" in machine else ""
    name = machine.get("gpu") or f"{machine.get('cpu', 'cpu')} {isa} {machine.get('cpus', '')}c"
    for junk in ("(R)", "(TM)", "CPU", "Processor", "NVIDIA"):
        name = name.replace(junk, " ")
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in slug.split("-") if p) or "machine"


# --- how busy others keep it --------------------------------------------------------------------


def cpu_counters() -> CpuCounters | None:
    """(wall s, CPU-busy s of the whole machine, of it stolen by the hypervisor, this process's CPU s);
    None where there is no /proc/stat. Two of these make :func:`other_load`."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = (user + nice + system + irq + softirq + steal) / tick
    return time.perf_counter(), busy, steal / tick, time.process_time()


def other_load(start: CpuCounters | None) -> dict[str, float] | None:
    """Average cores that other processes (and hypervisor steal) used since ``start``: 0 is a quiet run."""
    end = cpu_counters()
    if start is None or end is None or end[0] <= start[0]:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[3] - start[3])
    return {
        "other_cores": round(max(0.0, others) / wall, 3),
        "steal_cores": round((end[2] - start[2]) / wall, 3),
    }


def others_cores(seconds: float = 3.0) -> float:
    """Cores other processes used over the next ``seconds`` (this one idles meanwhile); the 1-minute
    load average where there is no /proc/stat."""
    start = cpu_counters()
    time.sleep(seconds)
    got = other_load(start)
    return got["other_cores"] if got else (load_avg() or [0.0])[0]


def wait_quiet(
    max_other: float,
    seconds: float,
    log: Callable[[str], None] = print,
    measure: Callable[[], float] = others_cores,
) -> tuple[float | None, float]:
    """Wait (up to ``seconds``) until other processes use fewer than ``max_other`` cores, as
    ``measure()`` sees it; (their last measured use in cores, seconds waited). ``seconds <= 0``:
    no wait and no measurement, (None, 0)."""
    if seconds <= 0:
        return None, 0.0
    began = time.monotonic()
    busy = measure()
    while busy >= max_other and time.monotonic() - began < seconds:
        log(f"other processes use {busy:.2f} cores: waiting for a quiet machine ...")
        busy = measure()
    return busy, time.monotonic() - began


# --- its limits ---------------------------------------------------------------------------------


def best_time(fn: Callable[[], None], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (after one untimed call)."""
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
        "cpu_copy_gbps": copy_gbps(budget.copy_mib * 2**20, "cpu", 1, 3),
        "torch_threads": torch.get_num_threads(),
    }
    limits.update(precision_ceilings(budget))
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        limits.update(gpu_limits(budget))
    return limits


def cpu_matmul_gflops(n: int = 4096, repeats: int = 3) -> float:
    """fp32 GFLOP/s of the best n x n x n matmul (of ``repeats`` each) in torch (MKL) and numpy (its
    own BLAS, OpenBLAS in the wheels): the faster library is the CPU's attainable peak. On AMD CPUs
    MKL can pick slower kernels than OpenBLAS, and a "peak" a backend beats is not a peak."""
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    t_numpy = best_time(lambda: np.matmul(a, a, out=c), repeats)
    t_torch = matmul_seconds(n, torch.float32, "cpu", 1, repeats)
    return 2 * n**3 / min(t_numpy, t_torch) / 1e9


def precision_ceilings(budget: Budget) -> dict[str, Any]:
    """The CPU's lower-precision matmul rates beside fp32: onnxruntime's int8 MatMulInteger (the
    MLAS kernel the int8 decoder's QGemm uses: VNNI or AMX where the CPU has them, AVX2 otherwise)
    and torch's bf16 matmul where the CPU has bf16 hardware (AMX/AVX512-BF16); the best of all."""
    n = budget.ceiling_n
    out: dict[str, Any] = {"cpu_ceiling_n": n}
    try:
        out["cpu_int8_matmul_gops"] = cpu_int8_matmul_gops(n, budget.matmul_repeats)
    except Exception as exc:  # noqa: BLE001 - a missing onnx or kernel only drops this ceiling
        out["cpu_int8_matmul_note"] = f"not measured: {type(exc).__name__}: {str(exc)[:120]}"
    if any(f in cpu_flags() for f in BF16_FLAGS):
        import torch

        out["cpu_bf16_matmul_gflops"] = (
            2 * n**3 / matmul_seconds(n, torch.bfloat16, "cpu", 1, budget.matmul_repeats) / 1e9
        )
    else:
        out["cpu_bf16_matmul_note"] = "not measured: no bf16 hardware (avx512_bf16/amx_bf16); torch emulates it"
    return out


def cpu_int8_matmul_gops(n: int = 2048, repeats: int = 3) -> float:
    """Giga int8 ops/s (2 per multiply-add) of onnxruntime's n x n x n u8 x s8 -> int32 MatMulInteger."""
    from onnx import TensorProto, helper, numpy_helper

    from vae_deploy import sessions

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "int8_matmul",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        [b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    sess = sessions.cpu_session(model.SerializeToString(), "int8 matmul", sessions.cpu_options(0, True))
    feed = {"a": rng.integers(0, 256, (n, n), dtype=np.uint8)}
    return 2 * n**3 / best_time(lambda: sess.run(None, feed), repeats) / 1e9


def matmul_seconds(n: int, dtype: Any, device: str, calls: int, repeats: int) -> float:
    """Best time of ``calls`` back-to-back n x n x n torch matmuls (a warm-up call first)."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def mm() -> None:
        for _ in range(calls):
            torch.mm(a, b, out=c)

    return best_time(mm, repeats, sync) / calls


def copy_gbps(nbytes: int, device: str, calls: int, repeats: int) -> float:
    """Memory bandwidth of a large copy: bytes read + written per second, in GB/s."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def copy() -> None:
        for _ in range(calls):
            dst.copy_(src)

    return calls * 2 * nbytes / best_time(copy, repeats, sync) / 1e9


def gpu_limits(budget: Budget) -> dict[str, Any]:
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
            out[f"gpu_{key}_matmul_tflops"] = 2 * n**3 / matmul_seconds(n, dtype, "cuda", 10, 5) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out["gpu_copy_gbps"] = copy_gbps(4 * budget.copy_mib * 2**20, "cuda", 10, 5)
    torch.cuda.empty_cache()
    return out


def peak_flops(limits: dict[str, Any], key: str) -> float | None:
    """FLOP/s of the limit a backend is compared with: ``"cpu_fp32"``, ``"cpu_int8"``,
    ``"cpu_best"`` (the best CPU precision measured) or ``"gpu_<precision>"``."""
    cpu = {
        "cpu_fp32": limits.get("cpu_fp32_matmul_gflops"),
        "cpu_int8": limits.get("cpu_int8_matmul_gops"),
        "cpu_bf16": limits.get("cpu_bf16_matmul_gflops"),
    }
    if key == "cpu_best":
        best = max((v for v in cpu.values() if v), default=None)
        return best * 1e9 if best else None
    if key in cpu:
        v = cpu[key]
        return v * 1e9 if v else None
    v = limits.get(f"gpu_{key.removeprefix('gpu_')}_matmul_tflops")
    return v * 1e12 if v else None

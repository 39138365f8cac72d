"""The one onnxruntime layer: session options, CPU and CUDA session creation, the one CUDA
fallback detection, CUDA library preloading, dtype mapping, signature checks and IOBinding buffers.

The runtime, verify and bench all create sessions here, so they agree on what "CUDA works" means:
onnxruntime silently falls back to the CPU when the CUDA provider cannot load; we detect that by
asking the session which provider it really got, and raise ``ProviderError`` whose ``reason`` says
what is missing (driver, libraries, versions). onnxruntime + numpy only, never torch or onnx.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import shutil
import sys
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vae_deploy.contract import GraphSpec, format_shape
from vae_deploy.errors import ExportError, ProviderError, first_line

LOG_ERRORS_ONLY = 3  # onnxruntime severity: 0 verbose .. 3 error, 4 fatal
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# onnxruntime's type strings <-> numpy dtypes, for the dtypes a VAE graph uses.
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
NUMPY_NAMES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}

_logger_lock = threading.Lock()  # set_default_logger_severity is process-wide


def numpy_dtype(ort_type: str) -> Any:
    """The numpy dtype of an onnxruntime type string (ExportError for one a VAE graph never uses)."""
    try:
        return ORT_TYPES[ort_type]
    except KeyError:
        raise ExportError(f"unsupported tensor type {ort_type} (expected float32 or float16)") from None


# --- CPU ----------------------------------------------------------------------------------------


def cpu_options(threads: int = 0, spinning: bool = True, log_level: int = LOG_ERRORS_ONLY) -> Any:
    """Session options for one CPU session: ``threads`` intra-op threads (0: one per physical core,
    the calling thread included), pool threads busy-wait for work when ``spinning``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = log_level
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def cpu_session(model: bytes, name: str, options: Any | None = None) -> Any:
    """A CPU session for a model's bytes (already hashed by the caller: what is checked is what
    runs; bytes with external data are refused by onnxruntime). ``name`` is used in errors."""
    try:
        return ort.InferenceSession(model, options or cpu_options(), providers=[CPU])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad graphs
        raise ExportError(f"{name} cannot be loaded by onnxruntime {ort.__version__}: {ort_message(exc)}") from None


def ort_message(exc: BaseException) -> str:
    """onnxruntime's exception text without its error-code prefix, file paths and C++ location."""
    import re

    text = first_line(exc, 400)
    text = text.split(" failed:", 1)[1] if " failed:" in text else re.sub(r"^\[ONNXRuntimeError\][ :\w]*: ", "", text)
    return re.sub(r"/\S+:\d+ .*?\) ", "", text.strip())[:240]


# --- CUDA ---------------------------------------------------------------------------------------


def cuda_unavailable() -> str | None:
    """Why this onnxruntime build cannot have a CUDA session at all (not onnxruntime-gpu), else None."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider (it is not onnxruntime-gpu)"
    return None


@lru_cache(maxsize=1)
def preload_cuda_libraries() -> str:
    """Run ``onnxruntime.preload_dlls()`` once (CUDA/cuDNN from the nvidia-* wheels); its output."""
    log = io.StringIO()
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - diagnostics only
                print(f"preload_dlls failed: {exc}", file=log)
    return log.getvalue()


def cuda_diagnosis(session_error: str | None = None) -> str:
    """Why the CUDA execution provider is unusable here (driver, libraries, versions), in one line."""
    preload_log = preload_cuda_libraries()
    reasons = []
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError:
            smi = "nvidia-smi found" if shutil.which("nvidia-smi") else "no nvidia-smi"
            reasons.append(f"no NVIDIA driver (libcuda.so.1 cannot be loaded; {smi})")
    if session_error:
        reasons.append(f"session creation failed: {session_error.strip()[:300]}")
    provider_lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if provider_lib.is_file():
        try:
            ctypes.CDLL(str(provider_lib))
        except OSError as exc:
            reasons.append(f"the CUDA provider library does not load: {exc}")
    failed = [line.split(":")[0].removeprefix("Failed to load ") for line in preload_log.splitlines()]
    said = " ".join(reasons)
    failed = [n for n in failed if n and not n.startswith("Please") and n not in said]
    if failed:
        reasons.append(f"CUDA/cuDNN libraries not found: {', '.join(dict.fromkeys(failed))}")
    try:
        from onnxruntime.capi import build_and_package_info as build

        needs = f"onnxruntime-gpu {ort.__version__} needs CUDA {getattr(build, 'cuda_version', '?')} and cuDNN 9"
    except ImportError:
        needs = f"onnxruntime {ort.__version__}"
    if not reasons:
        reasons.append("the session fell back to CPUExecutionProvider")
    return f"{'; '.join(reasons)} ({needs})"


def cuda_error(reason: str) -> ProviderError:
    """The ProviderError for a CUDA request; ``.reason`` is what ``auto`` records as fallback."""
    return ProviderError(
        f"CUDA execution provider unavailable: {reason}; install an NVIDIA driver and "
        "`pip install 'onnxruntime-gpu[cuda,cudnn]'`, or use provider='cpu' or 'auto'",
        reason=reason,
    )


def cuda_session(
    model: bytes,
    name: str,
    *,
    device_id: int = 0,
    tf32: bool = False,
    cuda_graph: bool = False,
    log_level: int = LOG_ERRORS_ONLY,
) -> Any:
    """A session that really runs on the CUDA EP, or ``ProviderError(reason)``.

    ``tf32=False`` (the default) keeps fp32 GEMMs/convs in float32 so CUDA agrees with the CPU to
    the contract's tolerances; True lets tensor cores use TF32 (faster, ~1e-3 relative error).
    ``cuda_graph`` sessions capture a CUDA graph on their first IOBinding run (memory pattern off,
    as onnxruntime's own CUDA-graph tests do).
    """
    unavailable = cuda_unavailable()
    if unavailable:
        raise cuda_error(unavailable)
    preload_cuda_libraries()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4  # failures are reported by our ProviderError instead
    options = {"device_id": str(device_id), "use_tf32": "1" if tf32 else "0"}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
        so.enable_mem_pattern = False
    error = None
    with _logger_lock:
        ort.set_default_logger_severity(4)  # keep the red "failed to load" dump off the console
        try:
            session = ort.InferenceSession(model, so, providers=[(CUDA, options), CPU])
        except Exception as exc:  # noqa: BLE001 - becomes a ProviderError below
            session, error = None, f"{type(exc).__name__}: {ort_message(exc)}"
        finally:
            ort.set_default_logger_severity(log_level)
    if session is None or session.get_providers()[0] != CUDA:
        raise cuda_error(cuda_diagnosis(error))
    return session


# --- signatures ---------------------------------------------------------------------------------


def check_signature(session: Any, spec: GraphSpec, name: str) -> None:
    """The session's inputs and outputs must be the contract's: names, dtypes, ranks, fixed sizes.

    A graph with an extra output, another order, another dtype or a wrong static size is refused
    at load (ExportError naming the file), so nothing downstream binds the wrong tensor.
    """
    problems = []
    for kind, args, tensors in (
        ("input", session.get_inputs(), spec.inputs),
        ("output", session.get_outputs(), spec.outputs),
    ):
        got = {a.name: a for a in args}
        if sorted(got) != sorted(t.name for t in tensors):
            problems.append(f"{kind}s {sorted(got)}, expected {[t.name for t in tensors]}")
            continue
        for t in tensors:
            arg = got[t.name]
            if NUMPY_NAMES.get(arg.type) != t.dtype:
                problems.append(f"{kind} {t.name!r} is {arg.type}, expected {t.dtype}")
            elif len(arg.shape) != len(t.shape) or any(
                isinstance(g, int) and isinstance(e, int) and g != e for g, e in zip(arg.shape, t.shape)
            ):
                problems.append(
                    f"{kind} {t.name!r} has shape {format_shape(arg.shape)}, expected {format_shape(t.shape)}"
                )
    if problems:
        raise ExportError(f"{name} does not match its contract ({spec.signature()}): {'; '.join(problems)}")


# --- IOBinding ----------------------------------------------------------------------------------


def bind_cpu_output(binding: Any, name: str, out: np.ndarray) -> None:
    """Bind a C-contiguous host array as an output, so onnxruntime writes straight into it."""
    binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)


def device_array(shape: list[int], dtype: Any, device_id: int) -> Any:
    """An uninitialised CUDA OrtValue (fixed address: usable by captured CUDA graphs)."""
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", device_id)


def set_log_severity(level: int) -> None:
    """onnxruntime's process-wide default log severity (3: errors only)."""
    with _logger_lock:
        ort.set_default_logger_severity(level)

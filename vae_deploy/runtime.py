"""Batched, seeded VAE inference on ONNX Runtime for an export folder: onnxruntime + numpy only.

    rt = VAERuntime("exported")                 # provider="auto": CUDA if it really works, else CPU
    images = rt.sample(10_000, seed=0)          # [n, C, H, W] float32 in [0, 1]
    mu, logvar = rt.encode(x)                   # x [n, C, H, W] in [0, 1]
    x_hat = rt.decode(mu)

Determinism: ``sample(n, seed)`` depends only on (seed, n), never on ``batch_size`` or the
provider, and its first k images are ``sample(k, seed)``. z is drawn from
``numpy.random.default_rng(seed)`` (PCG64) with ``standard_normal`` in float32, always in fixed
blocks of rows, so row i of z is the same whatever the batch size; this equals
``default_rng(seed).standard_normal((n, latent_dim), dtype=np.float32)``, which any app can
reproduce. Bernoulli pixel draws use a second stream, ``default_rng(SeedSequence(seed,
spawn_key=(0,)))``, uniform float32 in the same way, and a pixel is 1 where the draw is below the
decoded probability. On CPU the images are bitwise identical for every batch size; on CUDA z is
identical and the pixels agree to float rounding (cuBLAS picks kernels per shape).

Providers: ``"cuda"`` is the CUDA execution provider or a ``ProviderError`` saying what is missing
(onnxruntime itself silently falls back to CPU); ``"auto"`` uses CUDA when a session really got it
and records why not otherwise (``fallback_reason``). ``provider`` says what is used.

Threads: ``decode``/``encode``/``sample`` may be called from several threads at once. CPU sessions
are thread-safe; the CUDA paths (shared IOBinding buffers, captured CUDA graphs) take a lock.

Importing this module never imports torch: apps that embed the decoder need only onnxruntime.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import math
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vae_deploy.errors import ExportError, IntegrityError, ProviderError, UsageError
from vae_deploy.manifest import MANIFEST, check_manifest, sha256_file

PROVIDERS = ("auto", "cuda", "cpu")
LOG_ERRORS_ONLY = 3  # onnxruntime severity: 0 verbose .. 3 error, 4 fatal
MAX_BLOCK_ROWS = 1024  # rows drawn per generator call (fewer for large images: <= ~4 MB a block)
CUDA_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CUDA_SAMPLE_BATCH = 1024


# --- CPU plan: which session serves which batch size (data, so benchmarks can tune it) ----------


@dataclass(frozen=True)
class CpuPlan:
    """How the CPU sessions are set up and which one serves a batch.

    Batches of up to ``small_batch_max`` rows run on a single-threaded session; larger batches
    run on a session with ``threads`` intra-op threads (0: onnxruntime's default, one per physical
    core). ``spinning`` lets pool threads busy-wait for work instead of sleeping. ``sample_batch``
    is ``sample``'s default batch size. When ``threads`` comes to 1 (one core, or set so) there is
    a single session.

    Defaults, from ``vae-deploy bench`` on the 20-400-784 MLP decoder (2-core AVX-512 CPU, idle):
    one pooled session with spinning serves every batch size. Even at batch 1, two spinning
    threads beat one (17 vs 25 us: the 1.3 MB weight matrix is read from two cores' L2 caches),
    while a pool that sleeps between ops pays a wake-up per op (36 us at batch 1, ~7% slower at
    4096). The cost: after the last call the pool keeps spinning for ~40 ms, and when another
    process holds a core the two-thread session waits for its second thread (batch 1: ~58 us vs
    25-34 us on one thread); on a busy machine use ``CpuPlan(small_batch_max=16, spinning=False)``.
    A batch of more than ``max_rows`` rows (0: no limit) runs as consecutive runs of ``max_rows``
    rows, each writing straight into its rows of one output array: the hidden activations of a
    1024-row chunk stay in cache, which made batch 4096 10-15% faster. The README's Benchmarks
    section lists every setting tried.
    """

    small_batch_max: int = 0
    threads: int = 0
    spinning: bool = True
    sample_batch: int = 256
    max_rows: int = 1024

    def __post_init__(self) -> None:
        if min(self.small_batch_max, self.threads, self.max_rows) < 0 or self.sample_batch < 1:
            raise UsageError(
                f"CpuPlan needs small_batch_max, threads, max_rows >= 0 and sample_batch >= 1: {self}"
            )

    def two_sessions(self) -> bool:
        """Whether small batches get their own single-thread session (needs a pool of > 1 thread)."""
        if self.small_batch_max == 0 or self.threads == 1:
            return False
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return self.threads > 1 or cores > 1


def _cpu_session_options(threads: int, spinning: bool, log_level: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = log_level
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


# --- export folder: manifest checks (vae_deploy.manifest, torch-free) --------------------------


def _load_manifest(export_dir: Path) -> dict[str, Any]:
    """The checked manifest (every listed file present, sha256 ok, self-contained ONNX)."""
    manifest = check_manifest(export_dir)
    d, shape = manifest.get("latent_dim"), manifest.get("image_shape")
    ok_shape = (
        isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)
    )
    if not (isinstance(d, int) and d > 0 and ok_shape):
        raise ExportError(
            f"{export_dir}/{MANIFEST} needs latent_dim (a positive int) and image_shape [C, H, W]; "
            f"got {d!r} and {shape!r}"
        )
    return manifest


def _graph_path(manifest: dict[str, Any], export_dir: Path, graph: str, fmt: str, verify: bool) -> Path:
    """Path of one listed graph file; ``verify`` re-checks its sha256 (for files loaded later)."""
    entry = manifest["graphs"].get(graph, {}).get(fmt)
    if entry is None:
        have = sorted(manifest["graphs"].get(graph, {}))
        hint = " (export with --fp16)" if fmt == "onnx-fp16" else ""
        raise ExportError(
            f"{export_dir}/{MANIFEST} lists no {graph} {fmt!r} file{hint}; it has {have or 'none'}"
        )
    path = export_dir / entry["file"]
    if verify and (not path.is_file() or sha256_file(path) != entry["sha256"]):
        raise IntegrityError(
            f"{path.name} in {export_dir} is missing or no longer matches its sha256 in {MANIFEST}"
        )
    return path


# --- CUDA: load the libraries, and say precisely why CUDA cannot be used ------------------------


@lru_cache(maxsize=1)
def _preload_cuda_libraries() -> str:
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


def _cuda_diagnosis(preload_log: str, session_error: str | None) -> str:
    """Why the CUDA execution provider is unusable here (driver, libraries, versions), in one line."""
    reasons = []
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError:
            smi = "nvidia-smi found" if shutil.which("nvidia-smi") else "no nvidia-smi"
            reasons.append(f"no NVIDIA driver (libcuda.so.1 cannot be loaded; {smi})")
    if session_error:
        reasons.append(f"session creation failed: {session_error.strip().splitlines()[0][:300]}")
    provider_lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if provider_lib.is_file():
        try:
            ctypes.CDLL(str(provider_lib))
        except OSError as exc:
            reasons.append(f"the CUDA provider library does not load: {exc}")
    failed = [line.split(":")[0].removeprefix("Failed to load ") for line in preload_log.splitlines()]
    said = " ".join(reasons)
    failed = [name for name in failed if name and not name.startswith("Please") and name not in said]
    if failed:
        reasons.append(f"CUDA/cuDNN libraries not found: {', '.join(dict.fromkeys(failed))}")
    try:
        from onnxruntime.capi import build_and_package_info as build

        needs = (
            f"onnxruntime-gpu {ort.__version__} needs CUDA {getattr(build, 'cuda_version', '?')} and cuDNN 9"
        )
    except ImportError:
        needs = f"onnxruntime {ort.__version__}"
    if not reasons:
        reasons.append("the session fell back to CPUExecutionProvider")
    return f"{'; '.join(reasons)} ({needs})"


def _cuda_error(reason: str) -> ProviderError:
    """The ProviderError for provider="cuda"; ``.reason`` is what "auto" records as fallback_reason."""
    error = ProviderError(
        f"CUDA execution provider unavailable: {reason}; install an NVIDIA driver and "
        "`pip install 'onnxruntime-gpu[cuda,cudnn]'`, or use provider='cpu' or 'auto'"
    )
    error.reason = reason
    return error


# --- one ONNX graph on a provider ---------------------------------------------------------------


class _CpuGraph:
    """One ONNX file on the CPU: a single-thread session for small batches, a pooled one for large."""

    provider = "cpu"

    def __init__(self, path: Path, plan: CpuPlan, log_level: int) -> None:
        def session(threads: int, spinning: bool) -> ort.InferenceSession:
            options = _cpu_session_options(threads, spinning, log_level)
            try:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad graphs
                first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
                raise ExportError(
                    f"{path.name} in {path.parent} cannot be loaded by onnxruntime {ort.__version__}: {first}"
                ) from None

        self.large = session(plan.threads, plan.spinning)
        two = plan.two_sessions()
        self.small = session(1, False) if two else self.large
        self.small_max = plan.small_batch_max if two else 0
        self.session = self.large
        self.inputs = [i.name for i in self.large.get_inputs()]
        self.outputs = [o.name for o in self.large.get_outputs()]
        self.input = self.inputs[0]
        # chunked runs need every output to be float32 with a fixed row shape
        metas = self.large.get_outputs()
        fixed = all(o.type == "tensor(float)" and all(isinstance(d, int) for d in o.shape[1:]) for o in metas)
        self.row_shapes = [tuple(o.shape[1:]) for o in metas] if fixed else None
        self.max_rows = plan.max_rows

    def _chunked(self, n: int) -> bool:
        return 0 < self.max_rows < n and self.row_shapes is not None

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        sess = self.small if x.shape[0] <= self.small_max else self.large
        if not self._chunked(x.shape[0]):
            return sess.run(self.outputs, {self.input: x})
        outs = [np.empty((x.shape[0], *shape), np.float32) for shape in self.row_shapes]
        self._run_chunks(sess, x, outs)
        return outs

    def run_into(self, x: np.ndarray, out: np.ndarray) -> None:
        """Write the first output straight into ``out`` (float32, C-contiguous): no extra copy."""
        sess = self.small if x.shape[0] <= self.small_max else self.large
        if self._chunked(x.shape[0]):
            self._run_chunks(sess, x, [out])
            return
        binding = sess.io_binding()
        binding.bind_cpu_input(self.inputs[0], x)
        binding.bind_output(self.outputs[0], "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        sess.run_with_iobinding(binding)

    def _run_chunks(self, sess: ort.InferenceSession, x: np.ndarray, outs: list[np.ndarray]) -> None:
        """Run ``max_rows`` rows at a time, each run writing into its rows of ``outs`` (the first outputs)."""
        for start in range(0, x.shape[0], self.max_rows):
            rows = slice(start, start + self.max_rows)
            binding = sess.io_binding()
            binding.bind_cpu_input(self.input, x[rows])
            for name, out in zip(self.outputs, outs):
                part = out[rows]
                binding.bind_output(name, "cpu", 0, np.float32, list(part.shape), part.ctypes.data)
            sess.run_with_iobinding(binding)


@dataclass
class _GraphSlot:
    """Fixed device buffers + binding of one captured CUDA graph (one per batch bucket)."""

    graph_id: int
    host_input: np.ndarray
    device_input: Any
    device_outputs: list[Any]
    binding: Any
    run_options: Any


class _CudaGraph:
    """One ONNX file on the CUDA EP: IOBinding, device outputs, CUDA graphs per batch bucket."""

    provider = "cuda"

    def __init__(self, path: Path, device_id: int, log_level: int, graph_buckets: tuple[int, ...]) -> None:
        self.device_id = device_id
        self.path = path
        self.log_level = log_level
        self.session = self._make_session({})  # raises ProviderError when CUDA is not really used
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.row_shapes = [tuple(o.shape[1:]) for o in self.session.get_outputs()]
        static = all(isinstance(s, int) for shape in self.row_shapes for s in shape)
        self.buckets = tuple(sorted(graph_buckets)) if static else ()
        self.graph_session: ort.InferenceSession | None = None
        self.graph_error: str | None = None if self.buckets else "no buckets or non-static output shape"
        self._slots: dict[int, _GraphSlot] = {}
        self._lock = threading.Lock()

    def _make_session(self, extra: dict[str, str]) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 4  # failures are reported by our ProviderError instead
        options = {"device_id": str(self.device_id), **extra}
        error = None
        ort.set_default_logger_severity(4)
        try:
            sess = ort.InferenceSession(
                str(self.path),
                so,
                providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"],
                enable_fallback=0,
            )
        except Exception as exc:  # noqa: BLE001 - becomes a ProviderError below
            sess, error = None, f"{type(exc).__name__}: {exc}"
        finally:
            ort.set_default_logger_severity(self.log_level)
        if sess is None or sess.get_providers()[0] != "CUDAExecutionProvider":
            raise _cuda_error(_cuda_diagnosis(_preload_cuda_libraries(), error))
        return sess

    # host in, host out ------------------------------------------------------------------------

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            if self.buckets and x.shape[0] <= self.buckets[-1] and self.graph_error is None:
                try:
                    return self._run_graph(x)
                except Exception as exc:  # noqa: BLE001 - capture unsupported: plain IOBinding from now on
                    self.graph_error = f"{type(exc).__name__}: {exc}"
                    self._slots.clear()
                    self.graph_session = None
            return self._run_bound(x).copy_outputs_to_cpu()

    def run_into(self, x: np.ndarray, out: np.ndarray) -> None:
        out[...] = self.run(x)[0]

    def _run_graph(self, x: np.ndarray) -> list[np.ndarray]:
        b = x.shape[0]
        size = next(s for s in self.buckets if s >= b)
        slot = self._slots.get(size) or self._capture_slot(size)
        slot.host_input[:b] = x
        slot.host_input[b:] = 0.0
        slot.device_input.update_inplace(slot.host_input)
        slot.binding.synchronize_inputs()
        self.graph_session.run_with_iobinding(slot.binding, slot.run_options)
        slot.binding.synchronize_outputs()
        return [value.numpy()[:b] for value in slot.device_outputs]

    def _capture_slot(self, size: int) -> _GraphSlot:
        """Fixed-address buffers for one bucket; its first run captures the graph, later runs replay."""
        if self.graph_session is None:
            self.graph_session = self._make_session({"enable_cuda_graph": "1"})
        sess, dev = self.graph_session, self.device_id
        in_meta = sess.get_inputs()[0]
        dtype = np.float16 if in_meta.type == "tensor(float16)" else np.float32
        host = np.zeros((size, *in_meta.shape[1:]), dtype)
        device_input = ort.OrtValue.ortvalue_from_numpy(host, "cuda", dev)
        out_types = [np.float16 if o.type == "tensor(float16)" else np.float32 for o in sess.get_outputs()]
        device_outputs = [
            ort.OrtValue.ortvalue_from_shape_and_type([size, *shape], t, "cuda", dev)
            for shape, t in zip(self.row_shapes, out_types)
        ]
        binding = sess.io_binding()
        binding.bind_ortvalue_input(self.inputs[0], device_input)
        for name, value in zip(self.outputs, device_outputs):
            binding.bind_ortvalue_output(name, value)
        run_options = ort.RunOptions()
        graph_id = len(self._slots) + 1  # 0 is the default id an option-less run would capture into
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        slot = _GraphSlot(graph_id, host, device_input, device_outputs, binding, run_options)
        self._slots[size] = slot
        return slot

    # device out ---------------------------------------------------------------------------------

    def _run_bound(self, x: np.ndarray) -> Any:
        """One run with the input bound from host memory and outputs allocated on the device."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.inputs[0], x)
        for name in self.outputs:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding

    def run_device(self, x: np.ndarray) -> list[Any]:
        """Outputs as CUDA OrtValues (DLPack: ``torch.from_dlpack(value)``), freshly allocated."""
        with self._lock:
            return self._run_bound(x).get_outputs()

    def run_device_into(self, x: np.ndarray, out: Any, row: int) -> None:
        """Write the first output into rows [row, row + len(x)) of a CUDA float32 OrtValue."""
        shape = [x.shape[0], *self.row_shapes[0]]
        row_bytes = 4 * math.prod(self.row_shapes[0])
        with self._lock:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.inputs[0], x)
            binding.bind_output(
                self.outputs[0], "cuda", self.device_id, np.float32, shape, out.data_ptr() + row * row_bytes
            )
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()


def _open_graph(
    path: Path, provider: str, plan: CpuPlan, device_id: int, log_level: int, cuda_graphs: bool
) -> _CpuGraph | _CudaGraph:
    if provider == "cuda":
        return _CudaGraph(path, device_id, log_level, CUDA_GRAPH_BUCKETS if cuda_graphs else ())
    return _CpuGraph(path, plan, log_level)


# --- seeded streams -----------------------------------------------------------------------------


def _block_rows(row_shape: tuple[int, ...]) -> int:
    return max(1, min(MAX_BLOCK_ROWS, (1 << 20) // max(1, math.prod(row_shape))))


class _BlockStream:
    """Rows of one generator drawn in fixed blocks, handed out in any batch size.

    Row i is the same whatever sizes are taken, because the generator is always called with the
    same block shape in the same order; only the hand-out is sliced.
    """

    def __init__(self, rng: np.random.Generator, row_shape: tuple[int, ...], normal: bool) -> None:
        self._rng, self._normal = rng, normal
        self._block = (_block_rows(row_shape), *row_shape)
        self._buf = np.empty((0, *row_shape), np.float32)
        self._pos = 0

    def take(self, k: int) -> np.ndarray:
        parts = []
        while k:
            if self._pos == len(self._buf):
                draw = self._rng.standard_normal if self._normal else self._rng.random
                self._buf, self._pos = draw(self._block, dtype=np.float32), 0
            m = min(k, len(self._buf) - self._pos)
            parts.append(self._buf[self._pos : self._pos + m])
            self._pos += m
            k -= m
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _seed_sequence(seed: int | np.random.SeedSequence | None) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if seed is None:
        return np.random.SeedSequence()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer or None, got {seed!r}")
    return np.random.SeedSequence(int(seed))


# --- input checks -------------------------------------------------------------------------------


def _physical_memory() -> int | None:
    """Bytes of RAM, where the OS says (a bound for one output array)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


MAX_ABS_LATENT = 1e6  # a VAE's prior is N(0, I); near float32's limit decoders overflow into NaN


def _latent_problem(z: np.ndarray) -> str | None:
    """Why a C-contiguous float32 z cannot be decoded (NaN/inf, or beyond ``MAX_ABS_LATENT``), else
    None. Common case: one BLAS dot, as a sum of squares <= MAX_ABS_LATENT**2 bounds every value
    (NaN/inf fail the comparison); only otherwise an exact check."""
    flat = z.reshape(-1)
    if flat @ flat <= MAX_ABS_LATENT * MAX_ABS_LATENT:
        return None
    if not np.isfinite(z).all():
        return "z has NaN or infinite values; expected finite numbers"
    peak = float(np.abs(z).max())
    if peak > MAX_ABS_LATENT:
        return f"z has values up to {peak:g} in magnitude; expected latents within ±{MAX_ABS_LATENT:g}"
    return None


def _as_float_array(a: Any, name: str) -> np.ndarray:
    """``a`` as a float32 ndarray, or a UsageError saying which dtype was expected."""
    if type(a) is not np.ndarray:
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{name} must be a numeric array, got {type(a).__name__}: {exc}") from None
    if a.dtype != np.float32:
        if a.dtype.kind not in "fiu":
            raise UsageError(
                f"{name} must be a real numeric array (float32, float64, int), got dtype {a.dtype}"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UsageError(f"{name} has NaN or infinite values; expected finite numbers")
        a = a.astype(np.float32)
    return a


def _count(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


# --- the runtime --------------------------------------------------------------------------------


class VAERuntime:
    """Decoder (and lazily the encoder) of an export folder on ONNX Runtime.

    ``provider``: "auto" (CUDA when a session really gets it, else CPU), "cuda" (or ProviderError),
    "cpu". ``intra_op_threads`` fixes the CPU thread count (one session); ``cpu_plan`` gives full
    control (see CpuPlan). ``precision="fp16"`` loads the optional ``decoder.fp16.onnx``.
    ``cuda_graphs`` captures one CUDA graph per batch bucket for host-output decode/sample.
    Sets onnxruntime's process-wide default log severity to ``log_severity`` (3: errors only).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        provider: str = "auto",
        *,
        intra_op_threads: int | None = None,
        cpu_plan: CpuPlan | None = None,
        precision: str = "fp32",
        device_id: int = 0,
        cuda_graphs: bool = True,
        log_severity: int = LOG_ERRORS_ONLY,
    ) -> None:
        if provider not in PROVIDERS:
            raise UsageError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        if precision not in ("fp32", "fp16"):
            raise UsageError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        if intra_op_threads is not None:
            if cpu_plan is not None:
                raise UsageError("give either intra_op_threads or cpu_plan, not both")
            _count(intra_op_threads, "intra_op_threads")
            cpu_plan = CpuPlan(small_batch_max=0, threads=intra_op_threads)
        self.cpu_plan = cpu_plan or CpuPlan()
        self.export_dir = Path(export_dir)
        self.manifest = _load_manifest(self.export_dir)
        self.latent_dim: int = self.manifest["latent_dim"]
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in self.manifest["image_shape"])
        self.precision = precision
        self.fallback_reason: str | None = None
        self._device_id, self._cuda_graphs, self._log = device_id, cuda_graphs, log_severity
        ort.set_default_logger_severity(log_severity)

        decoder_fmt = "onnx" if precision == "fp32" else "onnx-fp16"
        decoder_file = _graph_path(self.manifest, self.export_dir, "decoder", decoder_fmt, verify=False)
        self.provider = self._resolve_provider(provider)
        self._decoder = self._open(decoder_file)
        self._check_io(self._decoder, decoder_file, (self.latent_dim,), "x_hat", self.image_shape)
        self._encoder: _CpuGraph | _CudaGraph | None = None
        self._encoder_lock = threading.Lock()
        in_type = self._decoder.session.get_inputs()[0].type
        self._z_dtype = np.float16 if in_type == "tensor(float16)" else None
        self._plain_io = in_type == self._decoder.session.get_outputs()[0].type == "tensor(float)"
        self._row_bytes = 4 * math.prod(self.image_shape)

    # providers ----------------------------------------------------------------------------------

    def _resolve_provider(self, provider: str) -> str:
        if provider == "cpu":
            return "cpu"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            reason = (
                f"this onnxruntime build ({ort.__version__}) has no CUDA provider (it is not onnxruntime-gpu)"
            )
            if provider == "cuda":
                raise _cuda_error(reason)
            self.fallback_reason = reason
            return "cpu"
        _preload_cuda_libraries()
        return provider  # "cuda" or "auto": settled when the decoder session is created

    def _open(self, path: Path) -> _CpuGraph | _CudaGraph:
        if self.provider == "auto":
            try:
                graph = _open_graph(
                    path, "cuda", self.cpu_plan, self._device_id, self._log, self._cuda_graphs
                )
                self.provider = "cuda"
                return graph
            except ProviderError as exc:
                self.fallback_reason = getattr(exc, "reason", str(exc))
                self.provider = "cpu"
        return _open_graph(path, self.provider, self.cpu_plan, self._device_id, self._log, self._cuda_graphs)

    @property
    def providers(self) -> list[str]:
        """The execution providers the decoder session really uses, in priority order."""
        return list(self._decoder.session.get_providers())

    @staticmethod
    def _check_io(
        graph: Any, path: Path, in_row: tuple[int, ...], out_name: str, out_row: tuple[int, ...]
    ) -> None:
        """The ONNX file must take [batch, *in_row] and give ``out_name`` [batch, *out_row]."""
        got_in = tuple(graph.session.get_inputs()[0].shape[1:])
        outs = {o.name: tuple(o.shape[1:]) for o in graph.session.get_outputs()}
        ok_in = len(got_in) == len(in_row) and all(
            not isinstance(g, int) or g == e for g, e in zip(got_in, in_row)
        )
        ok_out = out_name in outs and all(
            not isinstance(g, int) or g == e for g, e in zip(outs[out_name], out_row)
        )
        if not (ok_in and ok_out):
            raise ExportError(
                f"{path} does not match manifest.json: expected input [batch, {', '.join(map(str, in_row))}] "
                f"and output {out_name!r} [batch, {', '.join(map(str, out_row))}], got input {list(got_in)} "
                f"and outputs {outs}"
            )

    def _encoder_graph(self) -> _CpuGraph | _CudaGraph:
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    path = _graph_path(self.manifest, self.export_dir, "encoder", "onnx", verify=True)
                    graph = _open_graph(path, self.provider, self.cpu_plan, self._device_id, self._log, False)
                    self._check_io(graph, path, self.image_shape, "mu", (self.latent_dim,))
                    self._encoder = graph
        return self._encoder

    # validation ---------------------------------------------------------------------------------

    def _latents(self, z: Any) -> tuple[np.ndarray, bool]:
        """z as a C-contiguous float32 [batch, latent_dim]; also whether one unbatched latent came in.

        The common case (a float32 [batch, latent_dim] array) costs a few type checks and one
        finiteness reduction: this runs on every ``decode`` call.
        """
        if type(z) is not np.ndarray or z.dtype != np.float32:
            z = _as_float_array(z, "z")
        single = z.ndim == 1
        if single:
            z = z[None]
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise UsageError(
                f"z must have shape [batch, {self.latent_dim}] (or [{self.latent_dim}] for one latent), "
                f"got {list(z.shape)}"
            )
        if z.shape[0] == 0:
            raise UsageError(f"z is an empty batch (shape {list(z.shape)}); expected at least one latent")
        if not z.flags.c_contiguous:
            z = np.ascontiguousarray(z)
        problem = _latent_problem(z)
        if problem is not None:
            raise UsageError(problem)
        return z, single

    def _images(self, x: Any) -> tuple[np.ndarray, bool]:
        """x as a C-contiguous float32 [batch, C, H, W] in [0, 1]; also whether one image came in."""
        x = _as_float_array(x, "x")
        single = x.ndim == 3
        if single:
            x = x[None]
        shape = list(self.image_shape)
        if x.ndim != 4 or list(x.shape[1:]) != shape:
            raise UsageError(
                f"x must have shape [batch, {', '.join(map(str, shape))}] (or {shape}), got {list(x.shape)}"
            )
        if x.shape[0] == 0:
            raise UsageError(f"x is an empty batch (shape {list(x.shape)}); expected at least one image")
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UsageError("x has NaN or infinite values; expected pixel values in [0, 1]")
        if lo < 0.0 or hi > 1.0:
            raise UsageError(
                f"x must hold pixel values in [0, 1], got [{lo:g}, {hi:g}] (divide 8-bit images by 255)"
            )
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        return x, single

    def _check_sample_args(self, n: Any, batch_size: Any, rows_kept: int | None) -> tuple[int, int]:
        n = _count(n, "n")
        default = CUDA_SAMPLE_BATCH if self.provider == "cuda" else self.cpu_plan.sample_batch
        batch = min(n, default if batch_size is None else _count(batch_size, "batch_size"))
        need = self._row_bytes * (n if rows_kept is None else min(n, max(batch, rows_kept)))
        memory = _physical_memory() or 1 << 40  # unknown (no sysconf): refuse beyond 1 TiB
        if need > memory:
            raise UsageError(
                f"{n} samples of shape {list(self.image_shape)} need {need / 2**30:.1f} GiB, more than this "
                f"machine's {memory / 2**30:.1f} GiB of memory; use sample_iter() to stream them in batches"
            )
        return n, batch

    # inference ----------------------------------------------------------------------------------

    def _decode(self, z: np.ndarray) -> np.ndarray:
        if self._z_dtype is not None:
            z = z.astype(self._z_dtype)
        x = self._decoder.run(z)[0]
        return x if x.dtype == np.float32 else x.astype(np.float32)

    def decode(self, z: Any, *, device_output: bool = False) -> Any:
        """Images [batch, C, H, W] float32 in [0, 1] for latents z [batch, latent_dim].

        One unbatched latent [latent_dim] gives one image [C, H, W]. float64/int input is cast.
        ``device_output=True`` on CUDA returns a CUDA OrtValue (``torch.from_dlpack`` takes it);
        on CPU the numpy result is already where the data lives and is returned as is.
        """
        z, single = self._latents(z)
        if device_output and single:
            raise UsageError(f"device_output=True needs a batched z [batch, {self.latent_dim}]")
        if device_output and self.provider == "cuda":
            return self._decoder.run_device(z if self._z_dtype is None else z.astype(self._z_dtype))[0]
        x = self._decoder.run(z)[0] if self._plain_io else self._decode(z)
        return x[0] if single else x

    def encode(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """(mu, logvar), each [batch, latent_dim], for images x [batch, C, H, W] in [0, 1]."""
        x, single = self._images(x)
        graph = self._encoder_graph()
        outs = dict(zip(graph.outputs, graph.run(x)))
        mu, logvar = outs["mu"], outs["logvar"]
        return (mu[0], logvar[0]) if single else (mu, logvar)

    def reconstruct(self, x: Any) -> np.ndarray:
        """Deterministic reconstruction through the posterior mean: decode(encode(x).mu)."""
        x, single = self._images(x)
        graph = self._encoder_graph()
        mu = dict(zip(graph.outputs, graph.run(x)))["mu"]
        out = self._decode(np.ascontiguousarray(mu, dtype=np.float32))
        return out[0] if single else out

    # sampling -----------------------------------------------------------------------------------

    def _streams(self, seed: Any, bernoulli: bool) -> tuple[_BlockStream, _BlockStream | None]:
        ss = _seed_sequence(seed)
        z = _BlockStream(np.random.Generator(np.random.PCG64(ss)), (self.latent_dim,), normal=True)
        if not bernoulli:
            return z, None
        pixel_ss = np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, 0))
        pixels = _BlockStream(np.random.Generator(np.random.PCG64(pixel_ss)), self.image_shape, normal=False)
        return z, pixels

    def sample_iter(
        self, n: int, seed: Any = None, batch_size: int | None = None, bernoulli: bool = False
    ) -> Iterator[np.ndarray]:
        """Yield the images of ``sample(n, seed, ...)`` batch by batch: memory bounded by one batch."""
        n, batch = self._check_sample_args(n, batch_size, rows_kept=0)
        z_stream, pixel_stream = self._streams(seed, bernoulli)
        for start in range(0, n, batch):
            b = min(batch, n - start)
            x = self._decode(z_stream.take(b))
            yield (pixel_stream.take(b) < x).astype(np.float32) if pixel_stream else x

    def sample(
        self,
        n: int,
        seed: Any = None,
        batch_size: int | None = None,
        bernoulli: bool = False,
        device_output: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        """n images [n, C, H, W] float32 decoded from z ~ N(0, I); image i depends only on the seed.

        ``bernoulli=True`` returns 0/1 pixel draws from the decoded probabilities (seeded too).
        ``batch_size`` only changes speed and memory. ``progress(k)`` is called after each batch
        with the number of samples it added. ``device_output=True`` on CUDA returns one CUDA
        OrtValue holding all n images (DLPack-capable); on CPU a numpy array.
        """
        n, batch = self._check_sample_args(n, batch_size, rows_kept=None)
        if device_output and self.provider == "cuda" and not self._plain_io:
            raise UsageError("device_output=True needs a float32-I/O decoder (not the fp16 one)")
        z_stream, pixel_stream = self._streams(seed, bernoulli)
        # On CUDA, plain samples go straight into one device buffer; Bernoulli draws are made on the
        # host (numpy's generator) and uploaded at the end.
        to_device = device_output and self.provider == "cuda"
        device = None
        if to_device and pixel_stream is None:
            shape = [n, *self.image_shape]
            device = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", self._device_id)
        host = None if device is not None else np.empty((n, *self.image_shape), np.float32)
        for start in range(0, n, batch):
            b = min(batch, n - start)
            z = z_stream.take(b)
            if device is not None:
                self._decoder.run_device_into(z, device, start)
            else:
                rows = host[start : start + b]
                if self._plain_io:
                    self._decoder.run_into(z, rows)  # no intermediate copy
                else:
                    rows[...] = self._decode(z)
                if pixel_stream is not None:
                    rows[...] = pixel_stream.take(b) < rows
            if progress is not None:
                progress(b)
        if to_device and device is None:
            return ort.OrtValue.ortvalue_from_numpy(host, "cuda", self._device_id)
        return device if device is not None else host

    def __repr__(self) -> str:
        return (
            f"VAERuntime({str(self.export_dir)!r}, provider={self.provider!r}, latent_dim={self.latent_dim}, "
            f"image_shape={self.image_shape})"
        )

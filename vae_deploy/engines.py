"""Engines: one ONNX graph on one provider, run by the contract's tensor names.

``CpuEngine`` serves a batch from one of its sessions (a ``CpuPlan`` says which), ``CudaEngine``
runs with IOBinding, device outputs and one captured CUDA graph per batch bucket. Both expose the
seams that benchmarks use (``session_for``, ``settings_for``) so nobody reaches into them.
onnxruntime + numpy only.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from vae_deploy import sessions
from vae_deploy.contract import GraphSpec
from vae_deploy.errors import UsageError

CUDA_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def cpu_count() -> int:
    """CPUs this process may run on (affinity-aware where the OS says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class CpuPlan:
    """How the CPU sessions are set up and which one serves a batch.

    Batches of up to ``small_batch_max`` rows run on a session with ``small_threads`` intra-op
    threads (``small_spinning``: its pool busy-waits); larger ones on a session with ``threads``
    (0: onnxruntime's default, one per physical core) and ``spinning``. ``sample_batch`` is
    ``sample``'s default batch size. A batch of more than ``max_rows`` rows (0: no limit) runs as
    consecutive runs of ``max_rows`` rows, each writing straight into its rows of one output array
    (the hidden activations of a chunk stay in cache). A plan never changes results, only speed:
    every output row is computed by the same kernels whatever the thread count or chunk.

    The defaults are a reasonable plan for any CPU; ``vae-deploy tune`` (vae_deploy.tune) measures
    the candidates on this machine and caches the fastest (vae_deploy.plans). What was tried on
    which CPU is in benchmarks/README.md.
    """

    small_batch_max: int = 0
    threads: int = 0
    spinning: bool = True
    sample_batch: int = 256
    max_rows: int = 1024
    small_threads: int = 1
    small_spinning: bool = False

    def __post_init__(self) -> None:
        ints = (self.small_batch_max, self.threads, self.max_rows, self.sample_batch, self.small_threads)
        bools = (self.spinning, self.small_spinning)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in ints) or not all(
            isinstance(b, bool) for b in bools
        ):
            raise UsageError(f"CpuPlan fields must be integers (spinning, small_spinning bools): {self}")
        if min(ints) < 0 or self.sample_batch < 1:
            raise UsageError(
                f"CpuPlan needs small_batch_max, threads, small_threads, max_rows >= 0 and sample_batch >= 1: {self}"
            )

    def two_sessions(self) -> bool:
        """Whether small batches get a session of their own (its settings differ from the large one's)."""
        if self.small_batch_max == 0:
            return False
        small, large = self.small_threads or cpu_count(), self.threads or cpu_count()
        return small != large or (large > 1 and self.small_spinning != self.spinning)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Any) -> CpuPlan:
        """A plan from its ``to_dict`` (UsageError for unknown fields or bad values)."""
        if not isinstance(data, dict) or set(data) - set(cls.__dataclass_fields__):
            raise UsageError(f"a CpuPlan needs a dict of {sorted(cls.__dataclass_fields__)}, got {data!r:.200}")
        return cls(**data)


@dataclass(frozen=True)
class LeanCall:
    """``run(names, {input: x}, options)[0]`` is the engine's first output for 1..``max_batch`` rows."""

    run: Callable[..., list[np.ndarray]]
    names: list[str]
    input: str
    options: Any
    max_batch: int


class CpuEngine:
    """One ONNX graph on the CPU: a session for small batches and one for large (one if they agree)."""

    provider = "cpu"

    def __init__(self, model: bytes, name: str, spec: GraphSpec, plan: CpuPlan, log_level: int) -> None:
        self.spec, self.plan = spec, plan
        self.large = sessions.cpu_session(model, name, sessions.cpu_options(plan.threads, plan.spinning, log_level))
        sessions.check_signature(self.large, spec, name)
        two = plan.two_sessions()
        small_options = sessions.cpu_options(plan.small_threads, plan.small_spinning, log_level)
        self.small = sessions.cpu_session(model, name, small_options) if two else self.large
        self.small_max = plan.small_batch_max if two else 0
        self.input = spec.input_names[0]
        self.outputs = spec.output_names
        # chunked runs need outputs with fixed rows (dynamic height/width are sized by onnxruntime)
        static = all(t.static_rows and t.dtype == "float32" for t in spec.outputs)
        self.row_shapes = [tuple(t.row_shape) for t in spec.outputs] if static else None
        # the per-call path, decided once: bound methods, the batch size above which runs are
        # chunked, and one RunOptions for every call (onnxruntime builds a default one per call
        # when given None: measured ~2 µs of a ~25-35 µs batch-1 run; read-only, so shareable)
        self.chunk_over = plan.max_rows if plan.max_rows and static else 2**62
        self._small_run, self._large_run = self.small.run, self.large.run
        self._first = self.outputs[:1]
        self._options = ort.RunOptions()

    def lean_call(self) -> LeanCall:
        """What a caller needs to run the first output of a batch of 1..``max_batch`` rows with no
        Python frame of ours between it and onnxruntime (``VAERuntime.decode``'s common path):
        the first band's bound ``session.run``, output names, input name and one ``RunOptions``."""
        if self.small_max:
            return LeanCall(self._small_run, self._first, self.input, self._options, self.small_max)
        return LeanCall(self._large_run, self._first, self.input, self._options, self.chunk_over)

    def session_for(self, batch_size: int) -> Any:
        """The onnxruntime session that serves a batch of this size."""
        return self.small if batch_size <= self.small_max else self.large

    def settings_for(self, batch_size: int) -> dict[str, Any]:
        """Threads, spinning and row chunking used for a batch of this size (for reports)."""
        small = batch_size <= self.small_max
        threads = self.plan.small_threads if small else self.plan.threads
        out: dict[str, Any] = {
            "ort_intra_op": threads if threads > 0 else f"default ({cpu_count()})",
            "ort_inter_op": 1,
            "spinning": self.plan.small_spinning if small else self.plan.spinning,
            "optimization": "ORT_ENABLE_ALL",
        }
        if batch_size > self.chunk_over:
            out["rows_per_run"] = self.plan.max_rows
        return out

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs in the contract's order for a C-contiguous input batch."""
        n = x.shape[0]
        if n <= self.chunk_over:
            run = self._small_run if n <= self.small_max else self._large_run
            return run(self.outputs, {self.input: x}, self._options)
        outs = [np.empty((n, *shape), np.float32) for shape in self.row_shapes]
        self._run_chunks(self.session_for(n), x, outs)
        return outs

    def run_first(self, x: np.ndarray) -> np.ndarray:
        """The first output only (the decoder's image): the lean per-call path ``decode`` uses."""
        n = x.shape[0]
        if n <= self.small_max:
            return self._small_run(self._first, {self.input: x}, self._options)[0]
        if n <= self.chunk_over:
            return self._large_run(self._first, {self.input: x}, self._options)[0]
        return self.run(x)[0]

    def run_into(self, x: np.ndarray, out: np.ndarray) -> None:
        """Write the (single) output straight into ``out`` (float32, C-contiguous): no extra copy."""
        sess = self.session_for(x.shape[0])
        if x.shape[0] > self.chunk_over:
            self._run_chunks(sess, x, [out])
            return
        binding = sess.io_binding()
        binding.bind_cpu_input(self.input, x)
        sessions.bind_cpu_output(binding, self.outputs[0], out)
        sess.run_with_iobinding(binding, self._options)

    def _run_chunks(self, sess: Any, x: np.ndarray, outs: list[np.ndarray]) -> None:
        rows_per_run = self.plan.max_rows
        for start in range(0, x.shape[0], rows_per_run):
            rows = slice(start, start + rows_per_run)
            binding = sess.io_binding()
            binding.bind_cpu_input(self.input, x[rows])
            for name, out in zip(self.outputs, outs):
                sessions.bind_cpu_output(binding, name, out[rows])
            sess.run_with_iobinding(binding, self._options)


@dataclass
class _GraphSlot:
    """Fixed device buffers + binding of one captured CUDA graph (one per batch bucket)."""

    graph_id: int
    host_input: np.ndarray
    device_input: Any
    device_outputs: list[Any]
    binding: Any
    run_options: Any


class CudaEngine:
    """One ONNX graph on the CUDA EP: IOBinding, device outputs, CUDA graphs per batch bucket.

    Calls are serialised by a lock (shared buffers, captured graphs). If a capture fails, the
    engine records why in ``graph_error`` and runs plain IOBinding from then on.
    """

    provider = "cuda"

    def __init__(
        self,
        model: bytes,
        name: str,
        spec: GraphSpec,
        *,
        device_id: int,
        log_level: int,
        graph_buckets: tuple[int, ...],
        tf32: bool = False,
    ) -> None:
        self.model, self.name, self.spec = model, name, spec
        self.device_id, self.log_level, self.tf32 = device_id, log_level, tf32
        self.session = self._session(cuda_graph=False)  # ProviderError when CUDA is not really used
        sessions.check_signature(self.session, spec, name)
        self.input = spec.input_names[0]
        self.outputs = spec.output_names
        self.row_shapes = [tuple(t.row_shape) for t in spec.outputs]
        static = all(t.static_rows for t in (*spec.inputs, *spec.outputs))
        self.buckets = tuple(sorted(graph_buckets)) if static else ()
        self.graph_session: Any = None
        self.graph_error: str | None = None if self.buckets else "no buckets or non-static shapes"
        self._slots: dict[int, _GraphSlot] = {}
        self._lock = threading.Lock()

    def _session(self, cuda_graph: bool) -> Any:
        return sessions.cuda_session(
            self.model,
            self.name,
            device_id=self.device_id,
            tf32=self.tf32,
            cuda_graph=cuda_graph,
            log_level=self.log_level,
        )

    def session_for(self, batch_size: int) -> Any:
        return self.session

    def settings_for(self, batch_size: int) -> dict[str, Any]:
        graphs = bool(self.buckets) and batch_size <= self.buckets[-1] and self.graph_error is None
        return {"provider": "cuda", "cuda_graph": graphs, "tf32": self.tf32}

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

    def run_first(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]

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
            self.graph_session = self._session(cuda_graph=True)
        dev = self.device_id
        host = np.zeros((size, *self.spec.inputs[0].row_shape), self.spec.inputs[0].dtype)
        device_input = ort.OrtValue.ortvalue_from_numpy(host, "cuda", dev)
        device_outputs = [sessions.device_array([size, *t.row_shape], t.dtype, dev) for t in self.spec.outputs]
        binding = self.graph_session.io_binding()
        binding.bind_ortvalue_input(self.input, device_input)
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
        binding.bind_cpu_input(self.input, x)
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
        row_shape = list(out.shape()[1:])  # the output's own rows: fixed, or this call's height and width
        shape = [x.shape[0], *row_shape]
        row_bytes = 4 * math.prod(row_shape)
        with self._lock:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input, x)
            binding.bind_output(
                self.outputs[0], "cuda", self.device_id, np.float32, shape, out.data_ptr() + row * row_bytes
            )
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()


Engine = CpuEngine | CudaEngine


def open_engine(
    model: bytes,
    name: str,
    spec: GraphSpec,
    provider: str,
    *,
    plan: CpuPlan,
    device_id: int = 0,
    log_level: int = sessions.LOG_ERRORS_ONLY,
    cuda_graphs: bool = True,
    tf32: bool = False,
) -> Engine:
    """An engine for one graph on ``"cpu"`` or ``"cuda"`` (ProviderError if CUDA does not really run)."""
    if provider == "cuda":
        buckets = CUDA_GRAPH_BUCKETS if cuda_graphs else ()
        return CudaEngine(model, name, spec, device_id=device_id, log_level=log_level, graph_buckets=buckets, tf32=tf32)
    return CpuEngine(model, name, spec, plan, log_level)

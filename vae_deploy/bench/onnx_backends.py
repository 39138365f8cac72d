"""The onnxruntime backends (torch-free): ``onnx-cpu`` (``VAERuntime``), ``onnx-cpu-bare`` (the very
session it uses at that batch size, called directly), ``onnx-cpu-default`` (onnxruntime's default
options), and on a CUDA machine ``onnx-cuda``, ``onnx-cuda-graph`` and ``onnx-cuda-fp16`` (IOBinding,
device-resident input and output, synchronised after each call)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort

from vae_deploy import sessions
from vae_deploy.bench.context import Backend, Context, Unavailable
from vae_deploy.contract import DECODER
from vae_deploy.engines import cpu_count
from vae_deploy.errors import ProviderError
from vae_deploy.runtime import VAERuntime

CUDA_DEVICE = 0


def runtime_backend(name: str, rt: VAERuntime, graph: str, source: str = "") -> Backend:
    """``rt.decode(x)`` or ``rt.encode(x)``: the runtime as an app calls it, validation included.
    Its note names ``source`` (where the file came from) and the CPU plan and where that came from."""
    engine = rt.engine(graph)  # opens the encoder now, not inside the first timed call

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        return (lambda: rt.decode(x)) if graph == DECODER else (lambda: rt.encode(x))

    plan = getattr(engine, "plan", None)
    note = f"CPU plan {rt.plan_source.get(graph, '?')}: {plan}" if plan is not None else ""
    return Backend(name, prepare, engine.settings_for, note="; ".join(p for p in (source, note) if p))


def onnx_cpu(ctx: Context) -> Backend:
    return runtime_backend("onnx-cpu", ctx.runtime(), ctx.graph)


def onnx_cpu_bare(ctx: Context) -> Backend:
    """``InferenceSession.run`` on the session ``VAERuntime`` serves this batch size with: the
    difference to ``onnx-cpu`` is the wrapper's cost. One run per batch (no row chunking)."""
    engine = ctx.runtime().engine(ctx.graph)

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        sess = engine.session_for(x.shape[0])
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)

    def threads(batch_size: int) -> dict[str, Any]:
        return {k: v for k, v in engine.settings_for(batch_size).items() if k != "rows_per_run"}

    return Backend("onnx-cpu-bare", prepare, threads)


def onnx_cpu_default(ctx: Context) -> Backend:
    """A session with onnxruntime's default options (errors-only logging): what tuning bought."""
    so = ort.SessionOptions()
    so.log_severity_level = sessions.LOG_ERRORS_ONLY
    sess = sessions.cpu_session(*ctx.model_bytes("onnx"), so)

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)

    threads = {"ort_intra_op": f"default ({cpu_count()})", "ort_inter_op": "default", "spinning": "default (on)"}
    return Backend("onnx-cpu-default", prepare, lambda _: threads)


def _cuda_backend(ctx: Context, name: str, fmt: str, cuda_graph: bool, peak: str) -> Backend:
    """One onnxruntime CUDA session (one per batch size with a CUDA graph: a graph is captured for
    fixed shapes and addresses). TF32 allowed, as onnxruntime's CUDA EP does by default."""
    model, label = ctx.model_bytes(fmt)

    def new_session() -> Any:
        try:
            return sessions.cuda_session(model, label, device_id=CUDA_DEVICE, tf32=True, cuda_graph=cuda_graph)
        except ProviderError as exc:
            raise Unavailable(exc.reason) from None

    spare = [new_session()]  # made now: a CUDA provider that does not work skips the backend

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        sess = spare[0] if not cuda_graph else (spare.pop() if spare else new_session())
        meta_in, meta_out = sess.get_inputs()[0], sess.get_outputs()
        x_dev = ort.OrtValue.ortvalue_from_numpy(x.astype(sessions.numpy_dtype(meta_in.type)), "cuda", CUDA_DEVICE)
        binding = sess.io_binding()
        binding.bind_ortvalue_input(meta_in.name, x_dev)
        outs = []
        for o in meta_out:
            if all(isinstance(d, int) for d in o.shape[1:]):  # fixed rows: one preallocated buffer
                value = sessions.device_array([x.shape[0], *o.shape[1:]], sessions.numpy_dtype(o.type), CUDA_DEVICE)
                binding.bind_ortvalue_output(o.name, value)
                outs.append(value)
            else:  # symbolic height/width: onnxruntime allocates on the device
                binding.bind_output(o.name, "cuda", CUDA_DEVICE)

        def step() -> Any:
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return outs

        step()  # with a CUDA graph, the first run captures it
        return step

    return Backend(name, prepare, lambda _: {"device": f"cuda:{CUDA_DEVICE}", "iobinding": True}, peak=peak)


def onnx_cuda(ctx: Context) -> Backend:
    return _cuda_backend(ctx, "onnx-cuda", "onnx", cuda_graph=False, peak="gpu_tf32")


def onnx_cuda_graph(ctx: Context) -> Backend:
    return _cuda_backend(ctx, "onnx-cuda-graph", "onnx", cuda_graph=True, peak="gpu_tf32")


def onnx_cuda_fp16(ctx: Context) -> Backend:
    if ctx.graph != DECODER:
        raise Unavailable("the half-precision ONNX file is decoder-only")
    return _cuda_backend(ctx, "onnx-cuda-fp16", "onnx-fp16", cuda_graph=False, peak="gpu_fp16")

"""The backend registry: each name (as in the JSON) -> the factory that builds it for a ``Context``.

Factories live in ``torch_backends``, ``onnx_backends`` and ``int8`` and are imported when a backend
is built, so naming backends imports neither torch nor onnx.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from vae_deploy.bench.context import Backend, Context
from vae_deploy.errors import UsageError

# name -> (module in vae_deploy.bench, factory function); the order is the report's order
FACTORIES: dict[str, tuple[str, str]] = {
    "eager": ("torch_backends", "eager"),
    "torchscript": ("torch_backends", "torchscript"),
    "pt2": ("torch_backends", "pt2"),
    "onnx-cpu": ("onnx_backends", "onnx_cpu"),
    "onnx-cpu-bare": ("onnx_backends", "onnx_cpu_bare"),
    "onnx-cpu-default": ("onnx_backends", "onnx_cpu_default"),
    "onnx-cpu-int8": ("int8", "onnx_cpu_int8"),
    "eager-cuda": ("torch_backends", "eager_cuda"),
    "onnx-cuda": ("onnx_backends", "onnx_cuda"),
    "onnx-cuda-graph": ("onnx_backends", "onnx_cuda_graph"),
    "onnx-cuda-fp16": ("onnx_backends", "onnx_cuda_fp16"),
}
CUDA_BACKENDS = ("eager-cuda", "onnx-cuda", "onnx-cuda-graph", "onnx-cuda-fp16")
CPU_BACKENDS = tuple(n for n in FACTORIES if n not in CUDA_BACKENDS)
BACKENDS = CPU_BACKENDS + CUDA_BACKENDS
REFERENCES = ("eager", "onnx-cpu", "onnx-cpu-bare")  # rows others are compared with (ratios)


def make_backend(name: str, ctx: Context) -> Backend:
    """Build one backend (raises ``Unavailable`` or a VaeDeployError when it cannot run here)."""
    module, factory = FACTORIES[name]
    return getattr(importlib.import_module(f"vae_deploy.bench.{module}"), factory)(ctx)


def parse_backends(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Backend names from a list or a comma-separated string; None means all of them."""
    if value is None:
        return BACKENDS
    names = [v for v in value.replace(" ", "").split(",") if v] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown backend(s) {unknown or names}; expected some of: {', '.join(BACKENDS)}")
    return tuple(dict.fromkeys(names))

"""The PyTorch backends: ``eager`` (the checkpoint's module), ``torchscript``, ``pt2`` (torch.export)
on the CPU, and ``eager-cuda``. The only bench module that imports torch at its top."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_deploy.bench.context import Backend, Context, Unavailable


def torch_threads(_: int) -> dict[str, Any]:
    return {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()}


def cpu_backend(name: str, module: Any) -> Backend:
    """A torch module (or loaded graph) on the CPU: numpy in, numpy out."""

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        xt = torch.from_numpy(x)

        def step() -> Any:
            with torch.inference_mode():
                out = module(xt)
            return out.numpy() if isinstance(out, torch.Tensor) else [o.numpy() for o in out]

        return step

    return Backend(name, prepare, torch_threads)


def load_torchscript(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def load_pt2(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path)).module()


def eager(ctx: Context) -> Backend:
    return cpu_backend("eager", ctx.module())


def torchscript(ctx: Context) -> Backend:
    return cpu_backend("torchscript", load_torchscript(ctx.path("torchscript")))


def pt2(ctx: Context) -> Backend:
    return cpu_backend("pt2", load_pt2(ctx.path("pt2")))


def eager_cuda(ctx: Context) -> Backend:
    """The eager module on the GPU: input and output stay on the device, synchronised after each call."""
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU (torch.cuda.is_available() is False)")
    cuda_module = copy.deepcopy(ctx.module()).to("cuda")  # a copy: the CPU module stays for eager

    def prepare(x: np.ndarray) -> Callable[[], Any]:
        xt = torch.from_numpy(x).to("cuda")

        def step() -> Any:
            with torch.inference_mode():
                out = cuda_module(xt)
            torch.cuda.synchronize()
            return out

        return step

    return Backend("eager-cuda", prepare, torch_threads, peak="gpu_fp32")

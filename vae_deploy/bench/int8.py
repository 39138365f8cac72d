"""``onnx-cpu-int8``: what ``export --int8`` ships, run through ``VAERuntime`` like ``onnx-cpu``, and
its error against fp32.

The decoder is the export's ``decoder.int8.onnx`` when the export has one; otherwise the fp32 file
is quantized the same way (static, vae_deploy.quantize) into this run's temporary folder (no
manifest is written or forged), so the figures are those of the shippable file either way. The
encoder (never shipped in int8) is quantized dynamically into the temporary folder and paired with
the export's fp32 decoder (a runtime always has a decoder).
"""

from __future__ import annotations

import numpy as np

from vae_deploy.bench.context import Backend, Context
from vae_deploy.bench.onnx_backends import runtime_backend
from vae_deploy.contract import DECODER, file_name
from vae_deploy.quantize import INT8_MIN_K, quantize_decoder, quantize_dynamic_int8
from vae_deploy.runtime import VAERuntime

INT8_ERROR_ROWS = 1024  # rows compared against fp32 for the int8 error figures
__all__ = ["INT8_MIN_K", "int8_error", "int8_runtime", "onnx_cpu_int8"]


def int8_runtime(ctx: Context) -> tuple[VAERuntime, str]:
    """A CPU runtime whose ``ctx.graph`` is int8, and where that int8 file came from."""
    model = ctx.manifest.model
    if ctx.graph == DECODER:
        if ctx.manifest.entry(DECODER, "onnx-int8") is not None:
            return VAERuntime(
                ctx.export_dir, "cpu", precision="int8"
            ), f"the export's {file_name(DECODER, 'onnx-int8')}"
        dst = ctx.tmp / file_name(DECODER, "onnx-int8")
        quantize_decoder(ctx.path("onnx"), dst, model.decoder("int8"))
        rt = VAERuntime.from_files(model, decoder=dst, provider="cpu", precision="int8")
        return rt, "quantized for this run as `export --int8` does (static; the export has no int8 file)"
    dst = ctx.tmp / f"{ctx.graph}.int8.onnx"
    quantize_dynamic_int8(ctx.path("onnx"), dst)
    rt = VAERuntime.from_files(model, decoder=ctx.path("onnx", DECODER), encoder=dst, provider="cpu")
    return rt, f"quantize_dynamic QInt8 for this run (matmuls with K < {INT8_MIN_K} kept fp32)"


def onnx_cpu_int8(ctx: Context) -> Backend:
    rt, source = int8_runtime(ctx)
    backend = runtime_backend("onnx-cpu-int8", rt, ctx.graph, source)
    backend.peak = "cpu_int8"
    return backend


def int8_error(ctx: Context, int8: Backend, fp32: Backend, rows: int = INT8_ERROR_ROWS) -> dict[str, float]:
    """Mean and max absolute difference of the first output (pixels, or mu) between int8 and fp32."""
    x = ctx.inputs(rows)
    a, b = int8.prepare(x)(), fp32.prepare(x)()
    a = a if isinstance(a, np.ndarray) else a[0]
    b = b if isinstance(b, np.ndarray) else b[0]
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    out = {"rows": rows, "mean_abs": float(diff.mean()), "max_abs": float(diff.max())}
    if ctx.graph == DECODER:  # pixels: also in 8-bit levels of the value range
        lo, hi = ctx.manifest.model.value_range
        out.update(mean_abs_255=out["mean_abs"] * 255 / (hi - lo), max_abs_255=out["max_abs"] * 255 / (hi - lo))
    return out

"""``onnx-cpu-int8``: the graph's ONNX file dynamically quantized to int8 into a temporary file and
run through ``VAERuntime.from_files`` (no manifest is written or forged), and its error against fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vae_deploy.bench.context import Backend, Context
from vae_deploy.bench.onnx_backends import runtime_backend
from vae_deploy.contract import DECODER, META_PRECISION
from vae_deploy.runtime import VAERuntime

INT8_MIN_K = 64  # matmuls with a shorter reduction stay fp32 (see quantize_int8)
INT8_ERROR_ROWS = 1024  # rows compared against fp32 for the int8 error figures


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
        if prop.key == META_PRECISION:
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


def int8_runtime(ctx: Context) -> VAERuntime:
    """A CPU runtime whose ``ctx.graph`` is the int8 copy, written to ``ctx.tmp``; an int8 encoder
    is paired with the export's fp32 decoder (a runtime always has a decoder)."""
    dst = ctx.tmp / f"{ctx.graph}.int8.onnx"
    quantize_int8(ctx.path("onnx"), dst)
    model = ctx.manifest.model
    if ctx.graph == DECODER:
        return VAERuntime.from_files(model, decoder=dst, provider="cpu")
    return VAERuntime.from_files(model, decoder=ctx.path("onnx", DECODER), encoder=dst, provider="cpu")


def onnx_cpu_int8(ctx: Context) -> Backend:
    return runtime_backend("onnx-cpu-int8", int8_runtime(ctx), ctx.graph)


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

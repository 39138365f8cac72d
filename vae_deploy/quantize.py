"""int8 ONNX graphs for the CPU, and the gate that a shipped int8 decoder must pass.

``vae-deploy export --int8`` writes ``decoder.int8.onnx`` with :func:`write_int8_decoder`; bench's
``onnx-cpu-int8`` backend uses that file when the export has one and otherwise quantizes a copy
into a temporary folder with the same function (so what is benchmarked is what ships).

How (measured on the 20-400-784 MNIST MLP; see benchmarks/README.md for the other variants tried):

- Static quantization (onnxruntime ``quantize_static``, QDQ format): int8 weights (per tensor),
  uint8 activations whose scale is calibrated once, by their min/max over latents drawn from the
  prior, widened: z ~ N(0, 1.5^2 I). Calibrated on N(0, I) alone, the encoder means of real MNIST
  digits drove hidden activations past the calibrated range (clipped: max error 6.4/255 against
  fp32 instead of 1.4/255 with the 1.5 spread, for a mean error of 0.081/255 instead of 0.066/255
  on prior draws). onnxruntime fuses each quantized Gemm/MatMul into ``QGemm`` (u8 x s8 -> int32
  -> float). The output of a quantized layer stays float (``OpTypesToExcludeOutputQuantization``):
  quantizing the decoder's logits to 8 bits before the sigmoid cost 12/255 of max error.
- Static, not dynamic: dynamic quantization computes each activation's scale from the batch it
  is given, so an image would depend on which other latents share its batch (measured: up to
  0.9/255 between a row decoded alone and within 4096), breaking the runtime's guarantee that
  results never depend on batch size or CPU plan. A fixed scale keeps every row independent.
- Layers whose reduction is shorter than ``min_k`` (64) stay fp32: such a layer (the 20 -> 400
  input layer) is a tiny share of the FLOPs, so int8 buys it no speed, only error.

The gate compares the int8 graph with the fp32 one on held-out prior draws (another seed than the
calibration's): mean and max |int8 - fp32| in 1/255 of the value range; the export fails when
either exceeds its bound. Imports onnx and onnxruntime.quantization (the ``torch`` extra's onnx).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy import sessions
from vae_deploy.contract import (
    DECODER,
    INT8_MAX_ERROR_255,
    INT8_MEAN_ERROR_255,
    META_PRECISION,
    FileEntry,
    GraphSpec,
    ModelSpec,
    Tolerance,
    file_name,
)
from vae_deploy.errors import ExportError, ParityError, UsageError
from vae_deploy.files import sha256_file

INT8_MIN_K = 64  # Gemm/MatMul with a shorter reduction stay fp32
CALIBRATION_ROWS = 4096
CALIBRATION_SEED = 0
CALIBRATION_SPREAD = 1.5  # calibration latents: N(0, SPREAD^2 I), so real data's latents stay in range
CHECK_ROWS = 4096
CHECK_SEED = 1  # held out: not the calibration draws
QUANTIZED_OPS = ("Gemm", "MatMul")


@dataclass(frozen=True)
class Int8Gate:
    """Bounds on |int8 - fp32| in 1/255 of the value range: the mean and the largest."""

    mean_255: float = INT8_MEAN_ERROR_255
    max_255: float = INT8_MAX_ERROR_255

    def __post_init__(self) -> None:
        for v in (self.mean_255, self.max_255):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 255:
                raise UsageError(f"int8 error bounds must be in (0, 255] levels of 255, got {self}")


def int8_option(int8: bool, max_mean_255: float | None = None, max_255: float | None = None) -> Int8Gate | None:
    """``export``'s ``int8`` argument from the CLI's ``--int8`` and its two bounds (None: the defaults)."""
    if not int8:
        if max_mean_255 is not None or max_255 is not None:
            raise UsageError("--int8-max-mean-error/--int8-max-error bound the int8 decoder: add --int8")
        return None
    default = Int8Gate()
    return Int8Gate(
        default.mean_255 if max_mean_255 is None else max_mean_255, default.max_255 if max_255 is None else max_255
    )


@dataclass
class Int8Check:
    """What the gate measured for one int8 graph (and how it was made)."""

    rows: int
    mean_255: float
    max_255: float
    gate: Int8Gate
    method: str
    kept_fp32: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.mean_255 <= self.gate.mean_255 and self.max_255 <= self.gate.max_255

    def summary(self) -> str:
        return (
            f"int8 vs fp32 over {self.rows} prior draws: mean |error| {self.mean_255:.3f}/255 "
            f"(bound {self.gate.mean_255:g}), max {self.max_255:.2f}/255 (bound {self.gate.max_255:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs (and prints) advice such as "consider pre-processing"; keep it quiet."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _load_for_quantizer(src: str | Path | bytes) -> Any:
    """The model with the exporter's value_info dropped (the quantizer rewrites Gemm weights, and
    its shape inference would trip over the stale shapes) and its precision metadata set to int8."""
    import onnx

    model = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(str(src))
    del model.graph.value_info[:]
    for prop in model.metadata_props:
        if prop.key == META_PRECISION:
            prop.value = "int8"
    if model.doc_string:
        model.doc_string = model.doc_string.replace("(fp32)", "(int8)")
    return model


def short_reductions(model: Any, min_k: int = INT8_MIN_K) -> tuple[list[str], list[str]]:
    """(names of the Gemm/MatMul nodes with a constant weight and reduction K < min_k, of those with K >= min_k)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    short, long = [], []
    for node in model.graph.node:
        weight = shapes.get(node.input[1]) if node.op_type in QUANTIZED_OPS and len(node.input) > 1 else None
        if weight is None or len(weight) != 2 or not node.name:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        (short if (weight[1] if trans_b else weight[0]) < min_k else long).append(node.name)
    return short, long


def quantize_dynamic_int8(src: str | Path, dst: str | Path, min_k: int = INT8_MIN_K) -> list[str]:
    """Dynamic int8 (activation scales per batch; MatMulInteger): bench's encoder int8. Returns the
    matmuls kept fp32. Results depend on batch composition, so nothing ships this way."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _load_for_quantizer(src)
    keep, _ = short_reductions(model, min_k)
    excluded = keep + [f"{name}_MatMul" for name in keep]  # the quantizer turns Gemm X into MatMul "X_MatMul"
    with _quiet_quantizer():
        quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    return keep


def prior_latents(spec: GraphSpec, rows: int, seed: int) -> np.ndarray:
    """Seeded z ~ N(0, I) with the decoder's latent shape (which must be fixed)."""
    row = spec.inputs[0].row_shape
    if not all(isinstance(d, int) for d in row):
        raise UsageError(f"int8 calibration needs fixed latent sizes; this decoder takes {list(spec.inputs[0].shape)}")
    return np.random.default_rng(seed).standard_normal((rows, *row), dtype=np.float32)


def quantize_static_int8(
    src: str | Path | bytes,
    dst: str | Path,
    calibration: np.ndarray,
    input_name: str,
    min_k: int = INT8_MIN_K,
    batch: int = 512,
) -> list[str]:
    """Static int8 (see the module doc) of one ONNX graph into ``dst``; returns the matmuls kept fp32.
    ExportError if the graph has no matmul worth quantizing (int8 would only add error)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = _load_for_quantizer(src)
    keep, quantized = short_reductions(model, min_k)
    if not quantized:
        raise ExportError(
            f"int8: the graph has no Gemm/MatMul with a reduction of {min_k} or more to quantize "
            "(int8 would add error and no speed)"
        )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i : i + batch] for i in range(0, len(calibration), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {input_name: x}

    with _quiet_quantizer(), tempfile.TemporaryDirectory(prefix="vae-deploy-int8-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        source.write_bytes(model.SerializeToString())
        quantize_static(
            str(source),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)},
        )
    return keep


def quantize_decoder(fp32: str | Path | bytes, dst: str | Path, spec: GraphSpec) -> list[str]:
    """A decoder quantized as ``export --int8`` does (static, calibrated on the widened prior) into ``dst``."""
    calibration = prior_latents(spec, CALIBRATION_ROWS, CALIBRATION_SEED) * np.float32(CALIBRATION_SPREAD)
    return quantize_static_int8(fp32, dst, calibration, spec.input_names[0])


def measure_int8(
    fp32: bytes, int8: bytes, spec: GraphSpec, rows: int = CHECK_ROWS, seed: int = CHECK_SEED
) -> tuple[float, float]:
    """(mean, max) |int8 - fp32| of the first output in 1/255 of its value range, over ``rows``
    prior draws, both graphs on onnxruntime's CPU provider."""
    z = prior_latents(spec, rows, seed)
    feed = {spec.input_names[0]: z}
    out = spec.output_names[:1]
    a = sessions.cpu_session(fp32, "the fp32 decoder").run(out, feed)[0].astype(np.float64)
    b = sessions.cpu_session(int8, "the int8 decoder").run(out, feed)[0].astype(np.float64)
    lo, hi = spec.outputs[0].value_range or (0.0, 1.0)
    diff = np.abs(b - a) * (255.0 / (hi - lo))
    if not np.isfinite(diff).all():
        return float("inf"), float("inf")
    return float(diff.mean()), float(diff.max())


def write_int8_decoder(
    fp32_path: str | Path,
    dst: str | Path,
    spec: GraphSpec,
    gate: Int8Gate = Int8Gate(),
    log: Callable[[str], None] | None = None,
) -> Int8Check:
    """Quantize an fp32 decoder file into ``dst`` (static int8, calibrated on the prior) and check
    it against the fp32 one; ParityError (naming both bounds) when the gate fails."""
    fp32 = Path(fp32_path).read_bytes()
    keep = quantize_decoder(fp32, dst, spec)
    mean, worst = measure_int8(fp32, Path(dst).read_bytes(), spec)
    method = (
        f"onnxruntime quantize_static (QDQ, per-tensor QInt8 weights, QUInt8 activations calibrated by "
        f"MinMax on {CALIBRATION_ROWS} N(0, {CALIBRATION_SPREAD:g}^2 I) latents, seed {CALIBRATION_SEED}); "
        f"Gemm/MatMul with "
        f"K < {INT8_MIN_K} kept fp32; layer outputs kept float"
    )
    check = Int8Check(CHECK_ROWS, mean, worst, gate, method, keep)
    if log:
        log(check.summary())
    if not check.passed:
        raise ParityError(
            f"the int8 decoder fails its gate: {check.summary()}; loosen the bounds "
            "(--int8-max-mean-error/--int8-max-error) or ship fp32"
        )
    return check


def add_int8_decoder(
    folder: Path, files: list[FileEntry], model: ModelSpec, gate: Int8Gate, log: Callable[[str], None]
) -> tuple[FileEntry, Int8Check]:
    """The exporter's hook: write ``decoder.int8.onnx`` beside the fp32 ``decoder.onnx`` in ``folder``
    and return its manifest entry (tolerance = the gate's max, which ``verify`` then checks against
    eager PyTorch too) and the gate's measurements."""
    fp32 = next((e for e in files if e.graph == DECODER and e.format == "onnx"), None)
    if fp32 is None:
        raise UsageError("--int8 quantizes the ONNX decoder, so it needs the onnx format")
    lo, hi = model.value_range
    spec = model.decoder("int8", Tolerance(atol=gate.max_255 / 255 * (hi - lo)))
    dst = folder / file_name(DECODER, "onnx-int8")
    t0 = time.perf_counter()
    check = write_int8_decoder(folder / fp32.file, dst, spec, gate)
    log(f"decoder: {dst.name} {time.perf_counter() - t0:.1f} s; {check.summary()}")
    return FileEntry(DECODER, "onnx-int8", dst.name, sha256_file(dst), spec), check

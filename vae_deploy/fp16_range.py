"""Does a graph fit in fp16? Activation peaks of the fp32 graph, and the ops that would overflow.

fp16's largest finite value is 65504. A VAE whose activations exceed it (the SDXL VAE does) gives
inf/NaN in fp16 however the file is run. We find out on the fp32 graph, device-independently: run
it on onnxruntime's CPU with every intermediate tensor exposed as an output, take the peak |value|
of each, and look up which of those tensors the fp16 file stores in fp16 (names are kept by
onnxruntime's converter). Export uses the same peaks for ``--fp16-keep-fp32 auto``: the producer
and every consumer of a tensor above ``SAFE_PEAK`` stay fp32, so that tensor never exists in fp16.
Needs onnx (the torch extra).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from vae_deploy import sessions
from vae_deploy.graph_files import KeepFp32

FP16_MAX = 65504.0
SAFE_PEAK = FP16_MAX / 8  # auto keeps tensors above this in fp32: 8x headroom for other inputs

CHOICES = (
    "use the fp32 decoder.onnx (export without --fp16), use an fp16-safe VAE (e.g. one fine-tuned to keep "
    "activations small, like madebyollin/sdxl-vae-fp16-fix), or keep the offending ops in fp32: re-export with "
    "--fp16-keep-fp32 auto (or name op types / nodes; export_modules(fp16_keep_fp32=...))"
)


@dataclass(frozen=True)
class Peak:
    """One intermediate tensor's peak |value| and the node that produces it."""

    tensor: str
    node: str
    op_type: str
    peak: float

    def __str__(self) -> str:
        return f"{self.op_type} {self.node or self.tensor} (|x| up to {self.peak:.3g})"


class ActivationProbe:
    """The fp32 graph with every intermediate float tensor exposed, run as written (graph
    optimisations off) on onnxruntime's CPU: ``peaks(feed)`` gives each tensor's peak |value|."""

    def __init__(self, model_fp32: bytes, name: str) -> None:
        import onnx

        model = onnx.ModelProto.FromString(model_fp32)
        self.producers = {out: node for node in model.graph.node for out in node.output if out}
        kept = {o.name for o in model.graph.output}
        for tensor in self.producers:
            if tensor not in kept:
                model.graph.output.append(onnx.ValueInfoProto(name=tensor))
        options = sessions.cpu_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = sessions.cpu_session(model.SerializeToString(), f"{name} (all activations)", options)
        self.names = [o.name for o in self.session.get_outputs()]

    def peaks(self, feed: dict[str, np.ndarray]) -> list[Peak]:
        """Peak |value| (inf for non-finite values) of every float tensor a node produces, largest first."""
        out = []
        for tensor, value in zip(self.names, self.session.run(self.names, feed)):
            node = self.producers.get(tensor)
            if node is None or node.op_type in ("Shape", "Constant", "ConstantOfShape"):
                continue
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
                magnitude = np.abs(value)
                top = float(magnitude.max()) if np.isfinite(magnitude).all() else float("inf")
                out.append(Peak(tensor, node.name, node.op_type, top))
        return sorted(out, key=lambda p: -p.peak)


def activation_peaks(model_fp32: bytes, feeds: Iterable[dict[str, np.ndarray]], name: str) -> list[Peak]:
    """Each tensor's peak over all ``feeds``, largest first (one feed run at a time)."""
    probe = ActivationProbe(model_fp32, name)
    best: dict[str, Peak] = {}
    for feed in feeds:
        for p in probe.peaks(feed):
            if p.tensor not in best or p.peak > best[p.tensor].peak:
                best[p.tensor] = p
    return sorted(best.values(), key=lambda p: -p.peak)


def fp16_tensors(model_fp16: bytes) -> set[str]:
    """Names of the tensors the fp16 file stores in float16 (its value_info, as the converter wrote
    it, completed by ONNX shape inference)."""
    import onnx

    model = onnx.ModelProto.FromString(model_fp16)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - fall back to the converter's own value_info
        pass
    values = (*model.graph.value_info, *model.graph.output)
    return {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}


def overflows(peaks: list[Peak], in_fp16: set[str]) -> list[Peak]:
    """The tensors stored in fp16 whose fp32 values exceed fp16's range."""
    return [p for p in peaks if p.tensor in in_fp16 and p.peak > FP16_MAX]


def keep_for(model_fp32: Any, peaks: list[Peak], threshold: float = SAFE_PEAK) -> KeepFp32:
    """The nodes to keep in fp32 so that no tensor above ``threshold`` is ever stored in fp16: the
    producer and every consumer of each such tensor (a Cast sits only between fp32 and fp16 nodes)."""
    big = {p.tensor for p in peaks if p.peak > threshold}
    nodes = []
    for node in model_fp32.graph.node:
        if any(o in big for o in node.output) or any(i in big for i in node.input):
            if node.name:
                nodes.append(node.name)
    return KeepFp32(nodes=tuple(dict.fromkeys(nodes)))


def advice(found: list[Peak]) -> str:
    """The one-line verdict for an fp16 file that overflows, naming the choices."""
    shown = "; ".join(str(p) for p in found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
    return f"fp16 overflow: {len(found)} activation(s) exceed fp16's largest value 65504 ({shown}); {CHOICES}"

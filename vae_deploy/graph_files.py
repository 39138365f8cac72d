"""Write one graph in one format: ONNX (dynamo exporter), fp16 ONNX, TorchScript, torch.export.

Every writer takes a :class:`Traced` graph (the torch module, example inputs, and the
``torch.export`` dynamic shapes that make batch, and for spatial latents height and width, symbolic)
and the graph's ``GraphSpec``. ONNX files get the contract's names on their symbolic dimensions
(``batch``, ``height``, ``latent_height``, ...), its metadata, and the full ONNX checker; a
dimension the exporter fixed although the contract says it is dynamic is an ExportError.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vae_deploy import __version__
from vae_deploy.contract import BATCH, GraphSpec, ModelSpec, TensorSpec
from vae_deploy.errors import ExportError, first_line

EXAMPLE_BATCH = 2  # torch.export specialises example sizes 0 and 1, so trace with 2


@dataclass
class Traced:
    """One graph ready for the writers: the module (eval mode), example inputs, and per input the
    ``torch.export`` dynamic shapes ({axis: Dim}) of its symbolic axes."""

    module: nn.Module
    examples: tuple[Tensor, ...]
    dynamic: tuple[dict[int, Any], ...]


@dataclass
class OnnxFile:
    """What ``export_onnx`` wrote: the ModelProto, its opset, and the sizes torch.export proved the
    graph for where it narrowed a symbolic dimension (``{"batch": (1, 63)}``: the model branches on
    that size; the graph still runs beyond, and verify checks it there)."""

    model: Any
    opset: int
    proved_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)


def example_inputs(spec: GraphSpec, batch: int = EXAMPLE_BATCH, seed: int = 0) -> tuple[Tensor, ...]:
    """Example values of a fixed-size graph: uniform in an input's value range (images), else N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(example_tensor(t, (batch, *t.row_shape), g) for t in spec.inputs)


def example_tensor(t: TensorSpec, size: Sequence[int], g: torch.Generator) -> Tensor:
    if t.value_range is None:
        return torch.randn(tuple(size), generator=g)
    lo, hi = t.value_range
    return lo + (hi - lo) * torch.rand(tuple(size), generator=g)


def batch_dynamic(spec: GraphSpec) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes: axis 0 of every input is the shared, named batch axis."""
    batch = torch.export.Dim(BATCH, min=1)
    return tuple({0: batch} for _ in spec.inputs)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep exporter chatter (deprecation warnings, opset-conversion logs) out of users' faces."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR + 10)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def set_metadata(model: Any, spec: GraphSpec, contract: ModelSpec) -> None:
    """Set the contract's metadata_props so an app with only onnxruntime can read them."""
    props = contract.metadata(spec.name, spec.precision, __version__)
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"vae-deploy {spec.name} ({spec.precision}): {spec.signature()}"


def save_onnx(model: Any, path: Path) -> None:
    """Write one self-contained file (weights inside) and run the full ONNX checker on it."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} failed the ONNX checker: {first_line(exc, 200)}") from None


def name_dims(model: Any, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs the contract's dimension names (the exporter writes its
    own, e.g. ``2*s38``); ExportError where it fixed a size the contract keeps symbolic."""
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        t = tensors.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if t is None or len(dims) != len(t.shape):
            continue  # the signature check reports it
        for want, dim in zip(t.shape, dims):
            if not isinstance(want, str):
                continue
            if dim.HasField("dim_value"):
                raise ExportError(
                    f"the exporter fixed {spec.name} {t.name}'s {want} to {dim.dim_value}: the model does "
                    "not take other sizes there (export it with fixed sizes, or make that size free)"
                )
            dim.dim_param = want


def proved_ranges(ep: Any, spec: GraphSpec) -> dict[str, tuple[int, int]]:
    """Symbolic input sizes that torch.export (its ExportedProgram ``ep``) bounded above: the model
    took a size-dependent branch there."""
    if ep is None:
        return {}
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out: dict[str, tuple[int, int]] = {}
    for t, name in zip(spec.inputs, ep.graph_signature.user_inputs):
        val = getattr(placeholders.get(name), "meta", {}).get("val")
        for want, size in zip(t.shape, getattr(val, "shape", ())):
            if not isinstance(want, str) or not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if len(expr.free_symbols) != 1:
                continue
            sym = next(iter(expr.free_symbols))
            vr = ep.range_constraints.get(sym)
            try:
                hi = int(expr.subs(sym, int(vr.upper)))
                lo = max(1, int(expr.subs(sym, max(1, int(vr.lower)))))
            except (TypeError, ValueError, AttributeError, OverflowError):
                continue  # unbounded (int_oo) or not a plain number
            out[want] = (lo, hi)
    return out


def export_onnx(traced: Traced, spec: GraphSpec, contract: ModelSpec, path: Path, opset: int | None = None) -> OnnxFile:
    """Export with the dynamo (torch.export-based) exporter and write the file; return what was written."""
    try:
        with quiet():
            program = torch.onnx.export(
                traced.module,
                traced.examples,
                dynamo=True,
                dynamic_shapes=traced.dynamic,
                input_names=spec.input_names,
                output_names=spec.output_names,
                opset_version=opset,
                verbose=False,
            )
        model = program.model_proto
    except Exception as exc:  # noqa: BLE001 - exporter internals raise many types
        raise ExportError(f"ONNX export of the {spec.name} failed: {first_line(exc, 300)}") from None
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and got != opset:
        raise ExportError(
            f"the ONNX exporter could not produce opset {opset} for the {spec.name} (it made {got}); "
            f"use --opset {got} or higher"
        )
    name_dims(model, spec)
    set_metadata(model, spec, contract)
    save_onnx(model, path)
    return OnnxFile(model, int(got or 0), proved_ranges(getattr(program, "exported_program", None), spec))


@dataclass(frozen=True)
class KeepFp32:
    """What the fp16 file computes in fp32: ONNX op types and node names (both blocked from fp16)."""

    op_types: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.op_types or self.nodes)

    def to_dict(self) -> dict[str, list[str]]:
        return {"op_types": list(self.op_types), "nodes": list(self.nodes)}


def export_onnx_fp16(
    model_fp32: Any, spec: GraphSpec, contract: ModelSpec, path: Path, keep: KeepFp32 = KeepFp32()
) -> None:
    """Half-precision weights and arithmetic inside, float32 I/O (a drop-in for the fp32 file);
    the ops and nodes in ``keep`` stay fp32 (onnxruntime's converter adds the Casts around them)."""
    import onnx
    import onnx_ir
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    with quiet():
        half = convert_float_to_float16(
            onnx.ModelProto.FromString(model_fp32.SerializeToString()),
            keep_io_types=True,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep.op_types)),
            node_block_list=list(keep.nodes),
        )
        _repair_fp16(half)
        ir_model = onnx_ir.from_proto(half)
        ir_model.graph.sort()  # the converter appends its input Casts after their users
        half = onnx_ir.to_proto(ir_model)
    set_metadata(half, spec, contract)
    save_onnx(half, path)


def _repair_fp16(model: Any) -> None:
    """Fix what onnxruntime's converter (1.31) gets wrong. Two slips the ONNX checker rejects:
    constants it keeps fp32 (Resize scales) declared fp16 in value_info (an initializer's own type
    is the truth), and one Cast inserted per use of a shared constant, each declaring the same
    output. And one that defeats keeping ops in fp32: between two fp32 nodes it still stores the
    tensor in fp16 (Cast to fp16, Cast back), where it overflows all the same; those round trips
    are removed, so the tensor stays fp32."""
    import onnx

    initializers = {t.name for t in model.graph.initializer}
    for v in [v for v in model.graph.value_info if v.name in initializers]:
        model.graph.value_info.remove(v)
    seen: dict[str, Any] = {}
    for node in list(model.graph.node):
        first = seen.get(node.output[0]) if node.output else None
        if first is not None and node.op_type == "Cast" and first.op_type == "Cast" and first.input == node.input:
            model.graph.node.remove(node)  # the same Cast again
        elif node.output:
            seen.setdefault(node.output[0], node)

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    graph_outputs = {o.name for o in model.graph.output}
    to_half = {n.output[0]: n for n in model.graph.node if cast_to(n) == onnx.TensorProto.FLOAT16}
    rename: dict[str, str] = {}
    for node in list(model.graph.node):
        if cast_to(node) == onnx.TensorProto.FLOAT and node.input[0] in to_half and node.output[0] not in graph_outputs:
            rename[node.output[0]] = to_half[node.input[0]].input[0]  # fp32 -> fp16 -> fp32: use the fp32 tensor
            model.graph.node.remove(node)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    used = {i for n in model.graph.node for i in n.input} | graph_outputs
    for name, node in to_half.items():
        if name not in used:
            model.graph.node.remove(node)
    dropped = set(rename) | {name for name in to_half if name not in used}
    for v in [v for v in model.graph.value_info if v.name in dropped]:
        model.graph.value_info.remove(v)


def export_torchscript(traced: Traced, spec: GraphSpec, path: Path) -> None:
    """Trace to TorchScript (deprecated upstream, still asked for); its FutureWarnings stay quiet.
    Tracing records one set of sizes' control flow: verify checks the file at other sizes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            traced_module = torch.jit.trace(traced.module, traced.examples, check_trace=False)
        except Exception as exc:  # noqa: BLE001 - the tracer raises many types
            raise ExportError(f"TorchScript tracing of the {spec.name} failed: {first_line(exc, 300)}") from None
        torch.jit.save(traced_module, str(path))


def export_pt2(traced: Traced, spec: GraphSpec, path: Path) -> dict[str, tuple[int, int]]:
    """torch.export ExportedProgram with the graph's dynamic axes (TorchScript's supported successor).

    Where the model branches on a size (diffusers' upsampler does on batch >= 64), torch.export
    refuses the full range; the range it suggests is taken, as the ONNX exporter does, and returned
    (the program itself refuses inputs outside it)."""
    with quiet():
        try:
            program = torch.export.export(traced.module, traced.examples, dynamic_shapes=traced.dynamic)
        except Exception as exc:  # noqa: BLE001 - a constraint violation carries suggested fixes
            try:
                refined = torch.export.dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes(
                    str(getattr(exc, "msg", exc)), traced.dynamic
                )
                program = torch.export.export(traced.module, traced.examples, dynamic_shapes=refined)
            except Exception:  # noqa: BLE001
                raise ExportError(f"torch.export of the {spec.name} failed: {first_line(exc, 300)}") from None
        torch.export.save(program, str(path))
    return proved_ranges(program, spec)

"""Export any PyTorch VAE: a pair of modules, a diffusers folder, or a factory in the user's code.

    export_modules(encoder, decoder, "out", example_image=(3, 64, 64), value_range=(-1, 1))
    export_diffusers("path/to/sd-vae", "out")            # AutoencoderKL / AutoencoderTiny folder
    export_factory("mypkg.vae:build", "w.safetensors", "out", image_shape=(3, 64, 64))

What the graphs are is found by running the modules once on an example: the encoder's output
kind (``(mu, logvar)``, stacked parameters, or latents; a single tensor is told apart by which
of it the decoder takes), the latent shape, and for spatial latents the downsampling factor, with
batch, height and width then exported as symbolic (multiples of the factor). Everything then
goes through the pipeline our own checkpoints use (export.write_export): staging folder, parity
gate, manifest, atomic install.

Tolerances (recorded per file): fp32 arithmetic noise grows with the graph, so a fixed atol does
not fit every model. Each graph's is ``HEADROOM`` x the largest difference between the eager model
in float32 and the same model in float64 on seeded inputs at every verify size (the fp32 noise
of this very model, independent of the exporter), never below the contract's defaults. A wrong
weight, op or layout moves outputs by orders of magnitude more. fp16 decoder: ``FP16_ATOL`` x the
output's scale (its value range width, or its peak if larger).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vae_deploy.adapters import DecoderGraph, EncoderGraph, encoder_kind, outputs, unwrap_encoding
from vae_deploy.contract import (
    BATCH,
    DECODER,
    DEFAULT_TOLERANCES,
    ENCODER,
    HEIGHT,
    LATENT_HEIGHT,
    LATENT_WIDTH,
    WIDTH,
    ModelSpec,
    Tolerance,
)
from vae_deploy.errors import ExportError, UsageError, first_line
from vae_deploy.export import DEFAULT_FORMATS as CHECKPOINT_FORMATS
from vae_deploy.export import ExportResult, check_formats, export, write_export
from vae_deploy.graph_files import EXAMPLE_BATCH, KeepFp32, Traced
from vae_deploy.parity import compare
from vae_deploy.references import MODULE_BATCH_SIZES, SEED, module_reference, smooth_images

DEFAULT_FORMATS = ("onnx",)
HEADROOM = 20.0
FP16_ATOL = 1e-2


def default_sizes(factor: int) -> list[tuple[int, int]]:
    """Two image sizes to verify at, neither the traced one (6f x 8f), one of them not square."""
    return [(8 * factor, 8 * factor), (4 * factor, 10 * factor)]


def _example(shape_or_tensor: Any, value_range: tuple[float, float] | None, what: str) -> Tensor:
    """A batch of EXAMPLE_BATCH examples from a shape (seeded) or a tensor (one row or a batch)."""
    if isinstance(shape_or_tensor, Tensor):
        t = shape_or_tensor.detach().float().cpu()
        return t.repeat(EXAMPLE_BATCH, *([1] * (t.dim() - 1))) if t.shape[0] < EXAMPLE_BATCH else t.contiguous()
    shape = tuple(shape_or_tensor or ())
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise UsageError(f"{what} must be a tensor or a shape of positive sizes, got {shape_or_tensor!r}")
    if value_range is None:
        return torch.randn((EXAMPLE_BATCH, *shape), generator=torch.Generator().manual_seed(SEED))
    if len(shape) == 3:
        return smooth_images(EXAMPLE_BATCH, shape, value_range, SEED)
    lo, hi = value_range
    return lo + (hi - lo) * torch.rand((EXAMPLE_BATCH, *shape), generator=torch.Generator().manual_seed(SEED))


def _resolve_kind(encoder: nn.Module, decoder: nn.Module, x: Tensor, declared: str) -> str:
    """The encoder's output kind; one ambiguous tensor is latents if the decoder takes it whole,
    stacked [mean, logvar] if it takes the first half of its channels."""
    with torch.no_grad():
        raw = encoder(x)
        kind = encoder_kind(raw, declared)
        if kind != "auto":
            return kind
        t = unwrap_encoding(raw)
        readings = [("latents", t)]
        if t.dim() > 1 and t.shape[1] % 2 == 0:
            readings.append(("stacked", t.chunk(2, dim=1)[0]))
        for candidate, z in readings:
            try:
                if tuple(DecoderGraph(decoder)(z).shape) == tuple(x.shape):
                    return candidate
            except Exception:  # noqa: BLE001 - the decoder refusing this reading is the answer
                continue
    raise ExportError(
        f"the encoder returns one tensor {list(t.shape)} that the decoder takes neither whole (latents) nor "
        "half of its channels (stacked mean/logvar) back to the image shape; pass encoder_output explicitly"
    )


def probe(
    encoder: nn.Module | None,
    decoder: nn.Module,
    *,
    example_image: Any = None,
    example_latent: Any = None,
    encoder_output: str = "auto",
    value_range: tuple[float, float] = (0.0, 1.0),
    dynamic_size: bool | None = None,
) -> tuple[EncoderGraph | None, DecoderGraph, Tensor | None, Tensor, dict[str, Any]]:
    """Run the modules once: the graphs, example image and latent batches, and the contract's
    shape fields (latent_shape, image_shape, has_logvar, downsampling_factor)."""
    x = enc = None
    if encoder is not None:
        if example_image is None:
            raise UsageError("give example_image (a tensor [N, C, H, W] or a shape (C, H, W)) to trace the encoder")
        x = _example(example_image, value_range, "example_image")
        enc = EncoderGraph(encoder, _resolve_kind(encoder, decoder, x, encoder_output)).eval()
        with torch.no_grad():
            z = outputs(enc, x)[0].detach().contiguous()
    elif example_latent is None:
        raise UsageError("a decoder-only export needs example_latent (a tensor or a latent shape)")
    else:
        z = _example(example_latent, None, "example_latent")
    dec = DecoderGraph(decoder).eval()
    try:
        with torch.no_grad():
            images = dec(z)
    except Exception as exc:  # noqa: BLE001
        why = f"{type(exc).__name__}: {first_line(exc)}"
        raise ExportError(f"the decoder fails on latents {list(z.shape)}: {why}") from None
    if x is not None and tuple(images.shape) != tuple(x.shape):
        raise ExportError(
            f"the decoder gives {list(images.shape)} for the encoder's latents {list(z.shape)} of images "
            f"{list(x.shape)}; it must give the images' shape back"
        )
    latent, image = tuple(z.shape[1:]), tuple(images.shape[1:])
    spatial = len(latent) == 3 and len(image) == 3
    dynamic = spatial if dynamic_size is None else bool(dynamic_size)
    fields: dict[str, Any] = {
        "latent_shape": latent,
        "image_shape": image,
        "has_logvar": enc is not None and enc.has_logvar,
        "downsampling_factor": None,
    }
    if dynamic:
        if not spatial:
            raise UsageError(f"dynamic sizes need spatial latents [c, h, w]; these are {list(latent)}")
        f = image[1] // latent[1]
        if f < 1 or image[1] != f * latent[1] or image[2] != f * latent[2]:
            raise ExportError(f"image size {list(image[1:])} is not a whole multiple of latent size {list(latent[1:])}")
        if min(latent[1:]) < 2:
            raise UsageError(f"the example gives latents {list(latent)}: use a larger example (latent sizes >= 2)")
        fields.update(
            latent_shape=(latent[0], LATENT_HEIGHT, LATENT_WIDTH),
            image_shape=(image[0], HEIGHT, WIDTH),
            downsampling_factor=f,
        )
    return enc, dec, x, z, fields


def traced_graphs(enc: EncoderGraph | None, dec: DecoderGraph, x: Tensor | None, z: Tensor, factor: int | None) -> dict:
    """The graphs with their examples and dynamic axes (batch; height/width as factor x a size)."""
    batch = torch.export.Dim(BATCH, min=1)
    graphs = {}
    if factor is None:
        latent_axes: dict[int, Any] = {0: batch}
        image_axes: dict[int, Any] = {0: batch}
    else:
        h, w = torch.export.Dim(LATENT_HEIGHT, min=1), torch.export.Dim(LATENT_WIDTH, min=1)
        latent_axes = {0: batch, 2: h, 3: w}
        image_axes = {0: batch, 2: factor * h, 3: factor * w} if factor > 1 else dict(latent_axes)
    if enc is not None:
        graphs[ENCODER] = Traced(enc, (x,), (image_axes,))
    graphs[DECODER] = Traced(dec, (z,), (latent_axes,))
    return graphs


def calibrate(
    enc: EncoderGraph | None, dec: DecoderGraph, model: ModelSpec, sizes: list[tuple[int, int] | None]
) -> tuple[dict[tuple[str, str], Tolerance], dict[str, Any]]:
    """Per-graph tolerances from this model's own fp32 noise (see the module doc), and their basis."""
    errors = {DECODER: 0.0, ENCODER: 0.0}
    scale = model.value_range[1] - model.value_range[0]
    try:
        enc64, dec64 = copy.deepcopy((enc, dec))  # one copy of weights the two graphs share (a VAE's)
        dec64.double()
        if enc64 is not None:
            enc64.double()
        with torch.no_grad():
            for i, size in enumerate(sizes):
                latent, image = model.shapes_at(image_size=size) if size else (model.latent_shape, model.image_shape)
                z = torch.randn((1, *latent), generator=torch.Generator().manual_seed(SEED + i))
                if enc is not None:
                    x = smooth_images(1, image, model.value_range, SEED + i)
                    got, ref = outputs(enc, x), outputs(enc64, x.double())
                    errors[ENCODER] = max(
                        [errors[ENCODER]] + [float((a.double() - b).abs().max()) for a, b in zip(got, ref)]
                    )
                    z = torch.cat([got[0], z])
                x_hat = dec(z)
                errors[DECODER] = max(errors[DECODER], float((x_hat.double() - dec64(z.double())).abs().max()))
                scale = max(scale, float(x_hat.abs().max()))
    except Exception as exc:  # noqa: BLE001 - a model that does not run in float64: defaults
        basis = {"method": f"contract defaults (the model does not run in float64: {first_line(exc, 120)})"}
        return {("fp16", DECODER): Tolerance(FP16_ATOL * scale)}, basis
    tolerances = {}
    for graph in (ENCODER, DECODER):
        default = DEFAULT_TOLERANCES[("fp32", graph)]
        tolerances[("fp32", graph)] = Tolerance(
            max(default.atol, float(f"{HEADROOM * errors[graph]:.2g}")), default.rtol
        )
    tolerances[("fp16", DECODER)] = Tolerance(float(f"{FP16_ATOL * scale:.2g}"))
    basis = {
        "method": f"{HEADROOM:g} x max |eager fp32 - eager fp64| on seeded inputs at each verify size, at least "
        f"the contract's defaults; fp16: {FP16_ATOL:g} x output scale",
        "fp64_error": {g: float(f"{e:.3g}") for g, e in errors.items() if g == DECODER or enc is not None},
        "output_scale": float(f"{scale:.3g}"),
    }
    return tolerances, basis


def keep_rule(spec: str | Sequence[str] | None, feeds: Callable[[], list[dict]]) -> Any:
    """``--fp16-keep-fp32``: None, or "auto" and/or ONNX op types and node names -> the rule that
    write_export applies to the fp32 decoder before converting it."""
    import onnx

    tokens = [t for t in (spec.replace(" ", "").split(",") if isinstance(spec, str) else list(spec or ())) if t]
    if not tokens:
        return KeepFp32()
    auto = "auto" in tokens
    ops = tuple(t for t in tokens if t != "auto" and onnx.defs.has(t))
    names = tuple(t for t in tokens if t != "auto" and t not in ops)

    def rule(model: Any) -> KeepFp32:
        from vae_deploy import fp16_range

        known = {n.name for n in model.graph.node}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(
                f"--fp16-keep-fp32: {', '.join(unknown[:3])} is neither an ONNX op type nor a node "
                f"of the decoder (nodes are named like {sorted(known)[:2]})"
            )
        found = KeepFp32()
        if auto:
            peaks = fp16_range.activation_peaks(model.SerializeToString(), feeds(), "decoder.onnx")
            found = fp16_range.keep_for(model, peaks)
        return KeepFp32(ops, tuple(dict.fromkeys(names + found.nodes)))

    return rule


def export_modules(
    encoder: nn.Module | None,
    decoder: nn.Module,
    out: str | os.PathLike,
    *,
    example_image: Any = None,
    example_latent: Any = None,
    encoder_output: str = "auto",
    value_range: Sequence[float] = (0.0, 1.0),
    scaling_factor: float = 1.0,
    shift_factor: float = 0.0,
    dynamic_size: bool | None = None,
    source: dict[str, Any] | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    opset: int | None = None,
    fp16: bool = False,
    fp16_keep_fp32: str | Sequence[str] | None = None,
    tolerances: dict[tuple[str, str], Tolerance] | None = None,
    verify: bool = True,
    verify_sizes: Sequence[Sequence[int]] | None = None,
    batch_sizes: Sequence[int] = MODULE_BATCH_SIZES,
    extra: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export an encoder (None: decoder only) and a decoder under the contract, verified.

    ``example_image``: a tensor [N, C, H, W] or a shape (C, H, W) to trace at (``example_latent``
    for a decoder-only export). Spatial latents make batch, height and width dynamic unless
    ``dynamic_size=False``. ``encoder_output``: "auto", "mean-logvar", "stacked" or "latents".
    ``verify_sizes``: image (H, W) pairs to verify at (default two per the downsampling factor),
    each at ``batch_sizes``. ``fp16_keep_fp32``: "auto" (the ops whose activations come near fp16's
    limit) and/or ONNX op types / node names the fp16 decoder computes in fp32. ``tolerances``
    overrides the calibrated ones ((precision, graph) -> Tolerance). The modules are put in eval
    mode. Raises ParityError (``out`` unchanged) when a graph does not match the modules.
    """
    formats = check_formats(formats, fp16, opset)
    lo, hi = (float(v) for v in value_range)
    if not lo < hi:
        raise UsageError(f"value_range must be (low, high) with low < high, got {tuple(value_range)}")
    if not scaling_factor or not all(math.isfinite(float(v)) for v in (scaling_factor, shift_factor)):
        raise UsageError("scaling_factor must be a finite non-zero number and shift_factor a finite one")
    for module in (encoder, decoder):
        if module is not None:
            module.eval()
    enc, dec, x, z, fields = probe(
        encoder,
        decoder,
        example_image=example_image,
        example_latent=example_latent,
        encoder_output=encoder_output,
        value_range=(lo, hi),
        dynamic_size=dynamic_size,
    )
    model = ModelSpec(
        value_range=(lo, hi),
        scaling_factor=float(scaling_factor),
        shift_factor=float(shift_factor),
        source=dict(source or {"kind": "modules"}),
        **fields,
    )
    f = model.downsampling_factor
    sizes = [tuple(int(v) for v in s) for s in (verify_sizes or default_sizes(f))] if f else []
    for s in sizes:
        model.shapes_at(image_size=s)  # UsageError for a size that is no multiple of the factor
    calibrated, basis = calibrate(enc, dec, model, sizes or [None])
    where = f"latents {list(model.latent_shape)}, images {list(model.image_shape)} in [{lo:g}, {hi:g}]"
    log(f"traced at {list(x.shape if x is not None else z.shape)}: {where}" + (f", downsampling x{f}" if f else ""))

    def reference(proved: dict | None = None) -> Any:
        return module_reference(enc, dec, model, sizes=sizes or None, batch_sizes=batch_sizes, proved_ranges=proved)

    def decoder_feeds() -> list[dict]:
        return [inputs for (graph, _), (inputs, _) in reference().feeds().items() if graph == DECODER]

    def check(folder: Path, files: list, notes: dict) -> Any:
        return compare(folder, files, reference(notes.get("proved_ranges")), log=log)

    info = {
        "encoder_output": enc.kind if enc is not None else None,
        "traced_at": list((x if x is not None else z).shape),
        "tolerance_basis": basis,
    }
    return write_export(
        out,
        model,
        traced_graphs(enc, dec, x, z, f),
        formats=formats,
        opset=opset,
        fp16=fp16,
        fp16_keep=keep_rule(fp16_keep_fp32, decoder_feeds),
        tolerances={**calibrated, **(tolerances or {})},
        verify=check if verify else None,
        extra={**(extra or {}), "export": info},
        verification={"sizes": [list(s) for s in sizes], "batch_sizes": list(batch_sizes)},
        log=log,
    )


def export_diffusers(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: Sequence[int] | None = None,
    **options: Any,
) -> ExportResult:
    """Export a diffusers ``AutoencoderKL``/``AutoencoderTiny`` folder (or a pipeline folder's
    ``vae/``) with dynamic batch, height and width; traced at ``image_size`` (default 6f x 8f for
    downsampling factor f). ``options`` as for :func:`export_modules` (formats, fp16, verify_sizes, ...)."""
    from vae_deploy import diffusers_vae

    vae = diffusers_vae.find_vae(path)
    f = vae.downsampling_factor
    size = tuple(image_size) if image_size is not None else (6 * f, 8 * f)
    model = diffusers_vae.load(vae)
    encoder, decoder = diffusers_vae.graphs(model)
    log = options.get("log", print)
    factors = f"scaling_factor {vae.scaling_factor:g}, shift_factor {vae.shift_factor:g}"
    log(f"{vae.folder}: diffusers {vae.class_name}, {factors}")
    return export_modules(
        encoder,
        decoder,
        out,
        example_image=(vae.in_channels, *size),
        encoder_output=diffusers_vae.ENCODER_OUTPUT[vae.class_name],
        value_range=diffusers_vae.VALUE_RANGE,
        scaling_factor=vae.scaling_factor,
        shift_factor=vae.shift_factor,
        source=diffusers_vae.source_record(vae, out),
        extra={"diffusers_config": vae.config},
        **options,
    )


def export_factory(
    factory_spec: str,
    weights: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    image_shape: Sequence[int],
    **options: Any,
) -> ExportResult:
    """Export the VAE that ``pkg.module:build`` (or ``file.py:build``) builds, with ``weights``
    loaded into it, traced at images of ``image_shape`` (C, H, W); ``options`` as for
    :func:`export_modules` (value_range, encoder_output, dynamic_size, formats, fp16, ...)."""
    from vae_deploy import factory

    encoder, decoder = factory.build(factory_spec, weights)
    source = factory.source_record(factory_spec, weights, out)
    if encoder is None and options.get("example_latent") is None:
        raise UsageError(
            f"{factory_spec} returned no encoder: a decoder-only factory needs example_latent, a latent shape "
            "(Python: export_factory(..., example_latent=(c, h, w)))"
        )
    example = tuple(image_shape) if encoder is not None else None
    return export_modules(encoder, decoder, out, example_image=example, source=source, **options)


FACTORY_ONLY = ("value_range", "scaling_factor", "shift_factor", "encoder_output", "dynamic_size")


def export_source(
    source: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    factory: str | None = None,
    weights: str | os.PathLike | None = None,
    image_shape: Sequence[int] | None = None,
    **options: Any,
) -> ExportResult:
    """What ``vae-deploy export`` runs: a factory (``factory`` + ``weights``), a diffusers folder,
    or one of our checkpoints. Options that do not apply to the source are refused (None: unset)."""
    from vae_deploy import diffusers_vae

    options = {k: v for k, v in options.items() if v is not None}

    def refuse(names: Sequence[str], what: str) -> None:
        given = [n for n in names if n in options]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise UsageError(f"{flags}: not for {what}")

    if factory is not None:
        if source is not None:
            raise UsageError("give either SOURCE or --factory, not both (the factory's weights go in --weights)")
        if image_shape is None or len(image_shape) != 3:
            raise UsageError("--factory needs --image-shape C,H,W (the image size to trace at)")
        refuse(("data_root",), "a factory (it verifies on seeded images)")
        return export_factory(factory, weights, out, image_shape=image_shape, **options)
    if source is None:
        raise UsageError("give SOURCE (a checkpoint or a diffusers folder) or --factory pkg.module:build")
    if weights is not None:
        raise UsageError("--weights goes with --factory (a checkpoint or diffusers folder holds its own weights)")
    if diffusers_vae.is_model_folder(source):
        refuse((*FACTORY_ONLY, "data_root"), "a diffusers folder (its config says them)")
        if image_shape is not None:
            options["image_size"] = tuple(image_shape)[-2:]
        return export_diffusers(source, out, **options)
    if Path(source).is_dir():
        raise UsageError(
            f"{source} is a directory, neither a diffusers model folder (config.json or model_index.json) "
            "nor a checkpoint file"
        )
    refuse((*FACTORY_ONLY, "fp16_keep_fp32", "verify_sizes"), "one of our checkpoints")
    if image_shape is not None:
        raise UsageError("--image-shape does not apply to one of our checkpoints")
    options.setdefault("formats", CHECKPOINT_FORMATS)
    return export(source, out, **options)

"""``export`` (graphs from a checkpoint, a diffusers folder or a factory) and ``verify`` (parity with eager)."""

from __future__ import annotations

from typing import Any

import click

from vae_deploy.cli.common import DATA_ROOT_HELP, csv_ints


def _sizes(value: str | None) -> list[tuple[int, int]] | None:
    """'64x64,48x80' -> [(64, 64), (48, 80)]."""
    if value is None:
        return None
    try:
        out = [tuple(int(v) for v in item.lower().split("x")) for item in value.replace(" ", "").split(",") if item]
    except ValueError:
        out = []
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        raise click.BadParameter(f"expected image sizes like 64x64,48x80, got {value!r}")
    return out  # type: ignore[return-value]


def _floats(value: str | None, n: int, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        out = ()
    if len(out) != n:
        raise click.BadParameter(f"expected {what}, got {value!r}")
    return out


@click.command("export")
@click.argument("source", required=False, type=click.Path())
@click.option("--out", default="exported", show_default=True, help="Export folder (replaced atomically).")
@click.option(
    "--formats",
    help="Comma-separated: onnx, torchscript, pt2 (torch.export, TorchScript's supported successor). "
    "Default: onnx,torchscript for a checkpoint, onnx for other VAEs.",
)
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's, recorded in the manifest).")
@click.option("--fp16", is_flag=True, help="Also write decoder.fp16.onnx (half precision inside, fp32 I/O).")
@click.option("--int8", is_flag=True, help="Also write decoder.int8.onnx (static int8 for CPUs), gated against fp32.")
@click.option("--int8-max-mean-error", type=float, help="int8 gate: mean |int8 - fp32| in 1/255 (default 0.5).")
@click.option("--int8-max-error", type=float, help="int8 gate: largest |int8 - fp32| in 1/255 (default 4).")
@click.option(
    "--fp16-keep-fp32",
    help="With --fp16, compute these in fp32: 'auto' (ops whose activations come near fp16's limit), "
    "ONNX op types and/or node names, comma-separated.",
)
@click.option("--no-verify", is_flag=True, help="Skip the parity check against eager PyTorch.")
@click.option("--data-root", help=DATA_ROOT_HELP + " (real images for the parity check)")
@click.option("--factory", help="Your VAE: pkg.module:build or path/to/file.py:build, returning (encoder, decoder) "
              "or a module with encode() and decode().")  # fmt: skip
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights for --factory (.safetensors or .pt).")
@click.option("--image-shape", help="C,H,W to trace at (--factory: required; diffusers folder: default 6f x 8f).")
@click.option("--value-range", help="--factory: low,high of its images (default 0,1).")
@click.option("--scaling-factor", type=float, help="--factory: diffusion latent scale (default 1).")
@click.option("--shift-factor", type=float, help="--factory: diffusion latent shift (default 0).")
@click.option(
    "--encoder-output",
    type=click.Choice(("auto", "mean-logvar", "stacked", "latents")),
    help="--factory: what the encoder returns (default auto: told apart by what the decoder takes).",
)
@click.option("--fixed-size", is_flag=True, help="--factory: export at the traced image size only.")
@click.option("--verify-sizes", help="Image sizes to verify at, e.g. 64x64,48x80 (default: two per downsampling).")
def export_command(source: str | None, out: str, **opts: Any) -> None:
    """Export encoder and decoder graphs from SOURCE, verify them, and write the manifest.

    SOURCE is one of our checkpoints, or a diffusers AutoencoderKL / AutoencoderTiny folder (or a
    pipeline folder with vae/); or give --factory (and --weights) instead.
    """
    from vae_deploy.export_modules import export_source
    from vae_deploy.quantize import int8_option

    export_source(
        source,
        out,
        factory=opts.pop("factory"),
        weights=opts.pop("weights"),
        image_shape=csv_ints(opts.pop("image_shape")),
        value_range=_floats(opts.pop("value_range"), 2, "low,high (e.g. -1,1)"),
        verify=not opts.pop("no_verify"),
        dynamic_size=False if opts.pop("fixed_size") else None,
        verify_sizes=_sizes(opts.pop("verify_sizes")),
        fp16=opts.pop("fp16") or None,
        int8=int8_option(opts.pop("int8"), opts.pop("int8_max_mean_error"), opts.pop("int8_max_error")) or None,
        log=click.echo,
        **opts,
    )


@click.command("verify")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option(
    "--checkpoint",
    type=click.Path(),
    help="Eager reference (default: the manifest's source): a checkpoint, a diffusers folder or a factory's weights.",
)
@click.option("--data-root", help=DATA_ROOT_HELP + " (real images; else seeded random inputs)")
@click.option(
    "--batch-sizes",
    help="Comma-separated batch sizes (default: 1,7,256 for our checkpoints, else those recorded at export).",
)
@click.option("--sizes", help="Image sizes for exports that take any size, e.g. 64x64,48x80 (default: as exported).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
def verify_command(
    export_dir: str,
    checkpoint: str | None,
    data_root: str | None,
    batch_sizes: str | None,
    sizes: str | None,
    json_path: str | None,
) -> None:
    """Check EXPORT_DIR's sha256s, then compare every graph and backend with eager PyTorch."""
    from vae_deploy.errors import ParityError
    from vae_deploy.parity import verify

    report = verify(
        export_dir,
        checkpoint=checkpoint,
        data_root=data_root,
        batch_sizes=csv_ints(batch_sizes),
        sizes=_sizes(sizes),
        json_path=json_path,
        log=click.echo,
    )
    if not report.passed:
        raise ParityError(f"verification failed: {report.summary()}")

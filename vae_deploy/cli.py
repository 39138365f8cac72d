"""The ``vae-deploy`` command: a thin layer over library calls that tests can make directly.

Errors: a documented ``VaeDeployError`` prints one line (``error: ...``) and exits with its code
(2 for usage errors); anything unexpected prints one line too, and ``--debug`` shows the traceback.
Heavy modules (torch) are imported inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from vae_deploy import __version__
from vae_deploy.config import ACTIVATIONS, ARCHS, DATASETS, DEVICES, LOSSES
from vae_deploy.contract import GRAPHS
from vae_deploy.errors import VaeDeployError, first_line, missing_extra
from vae_deploy.viz import MAP_METHODS

DATA_ROOT_HELP = (
    "torchvision-style data root (ROOT/MNIST/raw/..., ROOT/cifar-10-batches-py, ROOT/celeba), or the folder of "
    "images for --dataset folder; default: $VAE_DEPLOY_DATA"
)


def _csv_ints(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vae-deploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Train VAEs, export encoder/decoder graphs, verify them, and sample/benchmark on ORT."""


# --- train --------------------------------------------------------------------------------------


@cli.command()
@click.option("--recipe", type=click.Path(dir_okay=False), help="TOML recipe (train/*.toml).")
@click.option("--arch", type=click.Choice(ARCHS))
@click.option("--latent-dim", type=int)
@click.option("--hidden", help="MLP hidden sizes, comma-separated (e.g. 400 or 512,256).")
@click.option("--conv-channels", help="conv/resconv channels per stride-2 level, comma-separated (e.g. 32,64,128).")
@click.option("--res-blocks", type=int, help="resconv: residual blocks per level.")
@click.option("--image-shape", help="Model input C,H,W (1 gray or 3 RGB); folder and celeba images are resized to it.")
@click.option("--activation", type=click.Choice(ACTIVATIONS))
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--loss", type=click.Choice(LOSSES))
@click.option("--beta", type=float, help="Weight on the KL term.")
@click.option("--alpha", type=float, help="Weight on the reconstruction term.")
@click.option("--dataset", type=click.Choice(DATASETS))
@click.option("--data-root", help=DATA_ROOT_HELP)
@click.option("--download/--no-download", default=None, help="Download the dataset (internet).")
@click.option("--binarize/--no-binarize", default=None, help="Threshold pixels at 0.5.")
@click.option("--seed", type=int)
@click.option("--device", type=click.Choice(DEVICES))
@click.option("--max-steps", type=int, help="Stop after this many optimiser steps (smoke runs).")
@click.option("--train-limit", type=int, help="Use only the first N training images.")
@click.option("--checkpoint-every", type=int, help="Also checkpoint every N steps (0: per epoch).")
@click.option("--out", help="Run folder (checkpoint.pt, metrics.jsonl).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a TTY).")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    help="Train on N local processes with torchrun (DDP: gloo on CPU, nccl with one GPU each); "
    "--batch-size stays the global batch.",
)
def train(recipe: str | None, resume: bool, progress: bool | None, nproc: int | None, **opts: Any) -> None:
    """Train a VAE; command-line options override the recipe.

    On a cluster: torchrun --nproc-per-node N [--nnodes ...] -m vae_deploy.cli train OPTIONS
    """
    from vae_deploy.config import load_recipe, make_configs
    from vae_deploy.distributed import ranks_from_env, reported_elsewhere
    from vae_deploy.training import train as run_training

    model_raw, train_raw = load_recipe(recipe) if recipe else ({}, {})
    model_keys = {"arch", "latent_dim", "hidden", "activation", "conv_channels", "res_blocks", "image_shape"}
    for key in ("hidden", "conv_channels", "image_shape"):
        if opts.get(key) is not None:
            opts[key] = _csv_ints(opts[key])
    for key, value in opts.items():
        if value is not None:
            (model_raw if key in model_keys else train_raw)[key] = value
    if "out" not in train_raw:
        train_raw["out"] = str(Path("runs") / (Path(recipe).stem if recipe else "default"))
    model_cfg, train_cfg = make_configs(model_raw, train_raw)
    ranks = ranks_from_env()
    if nproc is not None and nproc > 1:
        _launch_training(model_cfg, train_cfg, nproc, resume, ranks.world_size)
        return
    show = sys.stderr.isatty() if progress is None else progress
    try:
        result = run_training(model_cfg, train_cfg, resume=resume, progress=show, log=click.echo)
    except Exception as exc:
        if reported_elsewhere(exc, ranks):  # another rank (or the --nproc launcher) prints it
            raise SystemExit(getattr(exc, "exit_code", 1)) from None
        raise
    if not ranks.is_main:
        return
    last = result.history[-1] if result.history else {}
    click.echo(f"checkpoint: {result.checkpoint}  (val_loss {last.get('val_loss', float('nan')):.2f})")


def _launch_training(model_cfg: Any, train_cfg: Any, nproc: int, resume: bool, world_size: int) -> None:
    """``train --nproc N``: check in this process, then run this command without --nproc under torchrun."""
    from vae_deploy.distributed import launch
    from vae_deploy.errors import UsageError
    from vae_deploy.training import check_launch

    if world_size > 1:
        raise UsageError("--nproc starts torchrun itself; under torchrun leave it out")
    check_launch(model_cfg, train_cfg, nproc, resume=resume)
    ctx = click.get_current_context()
    argv = [ctx.info_name or "train"]
    for param in ctx.command.params:  # the options as given on the command line, less --nproc
        value = ctx.params.get(param.name or "")
        if param.name == "nproc" or ctx.get_parameter_source(param.name or "") != ParameterSource.COMMANDLINE:
            continue
        if isinstance(param, click.Option) and param.is_flag:
            argv.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
        else:
            argv += [param.opts[0], str(value)]
    hint = f"the last good checkpoint is kept in {train_cfg.out} (continue with --resume --nproc {nproc})"
    code = launch(argv, nproc, hint=hint, debug=bool(ctx.find_root().params.get("debug")))
    if code:
        raise SystemExit(code)


# --- demo ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--data-root", help=DATA_ROOT_HELP)
@click.option("--download", is_flag=True, help="Fetch MNIST with torchvision first (needs internet).")
@click.option("--dataset", default="mnist", type=click.Choice(DATASETS))
@click.option("--epochs", default=5, show_default=True)
@click.option(
    "--out",
    default="runs/demo",
    show_default=True,
    help="Run folder (a demo's own files in it are replaced).",
)
@click.option("--export-dir", default="exported", show_default=True)
@click.option("--samples", help="Sample grid to write (.png or .npy; default: OUT/samples.png).")
@click.option("--bench/--no-bench", default=True, show_default=True, help="End with a short benchmark.")
def demo(
    data_root: str | None,
    download: bool,
    dataset: str,
    epochs: int,
    out: str,
    export_dir: str,
    samples: str | None,
    bench: bool,
) -> None:
    """The main job end to end on defaults: train -> export -> verify -> sample -> bench."""
    from vae_deploy.demo import run_demo

    run_demo(
        data_root=data_root,
        download=download,
        dataset=dataset,
        epochs=epochs,
        out=out,
        export_dir=export_dir,
        samples=samples,
        bench=bench,
        progress=sys.stderr.isatty(),
        log=click.echo,
    )


# --- views (reconstruct, interpolate, vary, latent-map, curves) ---------------------------------

_SOURCE_HELP = "MODEL is an export folder (runs on onnxruntime), a run folder or a checkpoint file."


def _view_options(default_out: str) -> Any:
    """The model argument and the options every view takes."""

    def wrap(f: Any) -> Any:
        options = [
            click.argument("model", type=click.Path()),
            click.option(
                "--dataset",
                type=click.Choice(DATASETS),
                help="Validation data (default: what the checkpoint was trained on, else mnist).",
            ),
            click.option("--data-root", help=DATA_ROOT_HELP),
            click.option("--seed", default=0, show_default=True, help="Seed for the picks and draws."),
            click.option(
                "--provider",
                type=click.Choice(DEVICES),
                default="auto",
                show_default=True,
                help="onnxruntime provider (export folders only).",
            ),
            click.option("--out", default=default_out, show_default=True, help="PNG file to write."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


def _wrote(path: Path) -> None:
    """Report a written file, printable whatever bytes its name has."""
    from vae_deploy.errors import printable

    click.echo(f"wrote {printable(str(path))}")


def _index_pair(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        pair = tuple(int(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise click.BadParameter(f"expected two validation indices 'i,j' (>= 0), got {value!r}")
    return pair  # type: ignore[return-value]


@cli.command(epilog=_SOURCE_HELP)
@_view_options("reconstruct.png")
@click.option("-n", "n", default=8, show_default=True, help="Number of validation images.")
def reconstruct(model: str, provider: str, out: str, **opts: Any) -> None:
    """Originals above their reconstructions.

    n validation images (top row) above decode(mu) of each (bottom row).
    """
    from vae_deploy import viz

    _wrote(viz.reconstruct(viz.load_source(model, provider), out, **opts))


@cli.command(epilog=_SOURCE_HELP)
@_view_options("interpolate.png")
@click.option("--steps", default=10, show_default=True, help="Decoded points, both ends included.")
@click.option("--slerp", is_flag=True, help="Add a spherical-interpolation row under the linear one.")
@click.option("--indices", help="Two validation indices 'i,j' (default: a seeded pair of different digits).")
def interpolate(model: str, provider: str, out: str, slerp: bool, indices: str | None, **opts: Any) -> None:
    """Decode a latent path between two images.

    Linear (and with --slerp, spherical) path between the latent means of two validation images
    of different classes, originals at both ends.
    """
    from vae_deploy import viz

    source = viz.load_source(model, provider)
    path = viz.interpolate(source, out, slerp_row=slerp, indices=_index_pair(indices), **opts)
    _wrote(path)


@cli.command(epilog=_SOURCE_HELP)
@_view_options("vary.png")
@click.option("-n", "n", default=5, show_default=True, help="Posterior draws per class.")
def vary(model: str, provider: str, out: str, **opts: Any) -> None:
    """Decode posterior draws, one row per class.

    Each row: a validation example of the class, then n decodes of z ~ N(mu, sigma^2) from its
    posterior.
    """
    from vae_deploy import viz

    _wrote(viz.vary(viz.load_source(model, provider), out, **opts))


@cli.command(epilog=_SOURCE_HELP)
@_view_options("latent-map.png")
@click.option(
    "--method",
    type=click.Choice(MAP_METHODS),
    default="auto",
    show_default=True,
    help="2-D embedding for latents above 2-D (auto: t-SNE).",
)
@click.option("--limit", default=2000, show_default=True, help="Validation images to map.")
@click.option("--grid", default=20, show_default=True, help="Manifold grid size (2-D latents).")
def latent_map(model: str, provider: str, out: str, **opts: Any) -> None:
    """Latent means by label (and the decoded manifold).

    Validation latent means coloured by label, embedded by t-SNE or PCA above 2-D; for a 2-D
    latent also the decoded manifold over the prior's quantiles.
    """
    from vae_deploy import viz

    _wrote(viz.latent_map(viz.load_source(model, provider), out, **opts))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", default="curves.png", show_default=True, help="PNG file to write.")
def curves(run_dir: str, out: str) -> None:
    """Train/validation loss curves of a run.

    Total objective, reconstruction, KL and -ELBO per epoch from RUN_DIR/metrics.jsonl.
    """
    from vae_deploy import viz

    _wrote(viz.curves(run_dir, out))


# --- encode -------------------------------------------------------------------------------------


@cli.command(epilog=_SOURCE_HELP)
@click.argument("model", type=click.Path())
@click.option("--out", required=True, help=".npz (mu, logvar, labels, classes, files|index) or .npy (means only).")
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    help="What to encode (default: what the model was trained on, else folder).",
)
@click.option("--data-root", help=DATA_ROOT_HELP)
@click.option("--split", type=click.Choice(["all", "train", "val"]), default="all", show_default=True)
@click.option("--logvar-out", help="With --out X.npy: also write the log-variances to this .npy file.")
@click.option("--batch-size", default=256, show_default=True, type=int, help="Images per encoder call.")
@click.option(
    "--provider",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="onnxruntime provider (export folders only).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a TTY).")
def encode(model: str, progress: bool | None, **opts: Any) -> None:
    """Encode a dataset (e.g. a folder of images) to posterior means and log-variances.

    Streams in batches (bounded memory); rows follow the file order; the output is written atomically.
    """
    from tqdm import tqdm

    from vae_deploy.encode import encode_dataset

    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(unit="img", disable=not show, leave=False) as bar:
        result = encode_dataset(model, progress=bar.update, **opts)
    click.echo(f"data: {result.note}")
    from vae_deploy.errors import printable

    also = f" and logvars to {printable(str(result.logvar_path))}" if result.logvar_path else ""
    click.echo(
        f"wrote {result.count:,} latents {list(result.latent_shape)} to {printable(str(result.path))}{also}: "
        f"{result.seconds:.1f} s, {result.images_per_second:,.0f} images/s"
    )


# --- evaluate -----------------------------------------------------------------------------------


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    help="Validation data (default: what the checkpoint was trained on).",
)
@click.option("--data-root", help=DATA_ROOT_HELP)
@click.option("--k", "k", default=100, show_default=True, help="Importance samples per image.")
@click.option("--limit", type=int, help="Evaluate only the first N validation images.")
@click.option("--binarize/--no-binarize", default=None, help="Default: as the checkpoint was trained.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--json", "json_out", help="Also write the result to this JSON file.")
def evaluate(checkpoint: str, json_out: str | None, **opts: Any) -> None:
    """-ELBO and IWAE NLL bound in nats/image.

    Validation negative ELBO and the importance-weighted bound on the negative log-likelihood
    (k samples, Bernoulli likelihood). CHECKPOINT is a checkpoint file or a run folder.
    """
    from vae_deploy.evaluate import evaluate as run_evaluate
    from vae_deploy.evaluate import write_json

    result = run_evaluate(checkpoint, **opts)
    click.echo(result.summary())
    if json_out:
        write_json(result, json_out)


# --- sample -------------------------------------------------------------------------------------


@cli.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("-n", "n", default=64, show_default=True, type=int, help="Number of samples.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed (default: a fresh one, printed).")
@click.option("--out", help="Output file: .png (grid) or .npy ([n, C, H, W] float32).")
@click.option("--out-dir", help="Output folder: numbered .npy shards + index.json, streamed (any n; resumes).")
@click.option("--shard-rows", type=int, help="Rows per shard (default: ~128 MB shards). With --out-dir.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Write the shards through Ray Data: a local Ray, or join the cluster at ADDRESS. With --out-dir.",
)
@click.option("--workers", type=int, help="Ray decoder actors (default: one per CPU, or per GPU). With --ray.")
@click.option("--provider", default="auto", show_default=True, type=click.Choice(DEVICES))
@click.option("--batch-size", type=int, help="Samples per run (speed/memory only; results do not change).")
@click.option("--bernoulli", is_flag=True, help="Draw 0/1 pixels from the decoded probabilities.")
@click.option("--nrow", type=int, help="Images per row of the PNG grid (default: square).")
@click.option("--latent-size", help="H,W of the latents, for exports that take any image size (e.g. 64,64).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a TTY).")
def sample(
    export_dir: str,
    n: int,
    seed: int | None,
    out: str | None,
    out_dir: str | None,
    shard_rows: int | None,
    ray_address: str | None,
    workers: int | None,
    provider: str,
    progress: bool | None,
    **opts: Any,
) -> None:
    """Sample images from an export folder on onnxruntime (torch-free): a PNG grid or .npy file
    (--out), or any number of them as .npy shards streamed to a folder (--out-dir), on this
    machine or through Ray (--ray)."""
    from tqdm import tqdm

    if (out is None) == (out_dir is None):
        raise click.UsageError("give either --out FILE or --out-dir DIR")
    misplaced = [name for name, v in (("--shard-rows", shard_rows), ("--ray", ray_address)) if v is not None]
    if out is not None and misplaced:
        raise click.UsageError(f"{' and '.join(misplaced)} go{'es' * (len(misplaced) == 1)} with --out-dir, not --out")
    if workers is not None and ray_address is None:
        raise click.UsageError("--workers goes with --ray")
    if out_dir is not None and opts["nrow"] is not None:
        raise click.UsageError("--nrow goes with a .png --out")
    latent_size = _csv_ints(opts.pop("latent_size"))
    if out_dir is not None and latent_size is not None:
        raise click.UsageError("--latent-size goes with --out (shards are written at the export's fixed size)")
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=n, unit="img", disable=not show or n < 1, leave=False) as bar:
        if out is not None:
            from vae_deploy.sample import sample_to_file

            result = sample_to_file(
                export_dir, n, out, seed=seed, provider=provider, progress=bar.update, latent_size=latent_size, **opts
            )
        else:
            result = _sample_shards(export_dir, n, out_dir, seed, shard_rows, ray_address, workers, provider, bar, opts)
    why = f" (CUDA not used: {result.fallback_reason})" if provider == "auto" and result.fallback_reason else ""
    click.echo(f"provider: {result.provider}{why}")
    if out is not None:
        where = str(result.path)
    else:
        shards = len(result.index.shards)
        if result.rows_written == 0:
            click.echo(f"{result.out_dir} already holds these {result.n} samples (seed {result.seed}): {shards} shards")
            return
        kept = f", {result.shards_kept} kept from an interrupted run" if result.shards_kept else ""
        where = f"{shards} shard{'s' * (shards != 1)} in {result.out_dir}{kept}"
    click.echo(
        f"wrote {result.n} samples (seed {result.seed}) to {where}: {result.seconds:.2f} s, "
        f"{result.samples_per_second:,.0f} samples/s"
    )


def _sample_shards(
    export_dir: str,
    n: int,
    out_dir: str,
    seed: int | None,
    shard_rows: int | None,
    ray_address: str | None,
    workers: int | None,
    provider: str,
    bar: Any,
    opts: dict[str, Any],
) -> Any:
    common = dict(seed=seed, shard_rows=shard_rows, provider=provider, bernoulli=opts["bernoulli"], progress=bar.update)
    if ray_address is None:
        from vae_deploy.shards import write_shards

        return write_shards(export_dir, n, out_dir, batch_size=opts["batch_size"], **common)
    from vae_deploy.ray_sampling import RayOptions, write_shards_ray

    address = None if ray_address == "local" else ray_address
    options = RayOptions(address=address, workers=workers, batch_size=opts["batch_size"])
    result = write_shards_ray(export_dir, n, out_dir, options=options, **common)
    d = result.details
    started = "started a local Ray" if d["address"] == "local" else f"joined {d['address']}"
    click.echo(
        f"ray: {started} in {result.setup_seconds:.1f} s; {d['workers']} decoder actors "
        f"x {d['threads_per_worker']} thread(s), {d['actor_num_cpus']:g} CPU / {d['actor_num_gpus']:g} GPU each"
    )
    return result


# --- export / verify ----------------------------------------------------------------------------


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


@cli.command("export")
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
        image_shape=_csv_ints(opts.pop("image_shape")),
        value_range=_floats(opts.pop("value_range"), 2, "low,high (e.g. -1,1)"),
        verify=not opts.pop("no_verify"),
        dynamic_size=False if opts.pop("fixed_size") else None,
        verify_sizes=_sizes(opts.pop("verify_sizes")),
        fp16=opts.pop("fp16") or None,
        int8=int8_option(opts.pop("int8"), opts.pop("int8_max_mean_error"), opts.pop("int8_max_error")) or None,
        log=click.echo,
        **opts,
    )


@cli.command("verify")
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
        batch_sizes=_csv_ints(batch_sizes),
        sizes=_sizes(sizes),
        json_path=json_path,
        log=click.echo,
    )
    if not report.passed:
        raise ParityError(f"verification failed: {report.summary()}")


# --- bench --------------------------------------------------------------------------------------


@cli.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option(
    "--backends",
    help="Comma-separated (default: all; CUDA ones are skipped, with the reason, where there is no GPU): "
    "eager, torchscript, pt2, onnx-cpu, onnx-cpu-bare, onnx-cpu-default, onnx-cpu-int8, eager-cuda, "
    "onnx-cuda, onnx-cuda-graph, onnx-cuda-fp16.",
)
@click.option("--batch-sizes", help="Comma-separated (default 1,8,64,512,4096; with --quick 1,64).")
@click.option("--graph", default="decoder", show_default=True, type=click.Choice(GRAPHS))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Throughput vs batch size (.png; matplotlib).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Eager model (default: the manifest's).")
@click.option("--quick", is_flag=True, help="Small batch sizes and time budget: a smoke run of seconds.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a TTY).")
def bench(
    export_dir: str,
    backends: str | None,
    batch_sizes: str | None,
    graph: str,
    json_path: str | None,
    plot: str | None,
    checkpoint: str | None,
    quick: bool,
    progress: bool | None,
) -> None:
    """Time EXPORT_DIR's graph on every backend, side by side, against this machine's measured peak."""
    from vae_deploy import bench as b

    if plot:
        b.require_matplotlib()  # fail before the run, not after it
    report = b.run_bench(
        export_dir,
        backends=b.parse_backends(backends),
        batch_sizes=_csv_ints(batch_sizes),
        graph=graph,
        checkpoint=checkpoint,
        quick=quick,
        progress=sys.stderr.isatty() if progress is None else progress,
        log=click.echo,
    )
    click.echo(b.format_table(report))
    if json_path:
        click.echo(f"wrote {b.write_json(report, json_path)}")
    if plot:
        click.echo(f"wrote {b.plot_throughput(report, plot)}")


# --- serve / triton -----------------------------------------------------------------------------


@cli.command("serve")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="Replicas (Ray actors).")
@click.option(
    "--max-batch-size",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rows per engine run that dynamic batching forms from waiting requests (1: no dynamic batching).",
)
@click.option(
    "--batch-wait-ms",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, 10_000),
    help="How long a batch's first request waits for others.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--provider", default="auto", show_default=True, type=click.Choice(DEVICES))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(("fp32", "fp16")))
@click.option("--threads", type=click.IntRange(min=0), help="onnxruntime threads per replica (default: a share).")
@click.option("--max-rows", default=4096, show_default=True, type=click.IntRange(min=1), help="Rows per request.")
@click.option("--max-samples", default=4096, show_default=True, type=click.IntRange(min=1), help="n of /sample.")
@click.option("--max-body-mb", default=32, show_default=True, type=click.IntRange(min=1), help="Request body size.")
@click.option("--address", help="Ray cluster to deploy on (default: start a local one).")
@click.option("--access-log", is_flag=True, help="Log every request (Ray Serve's access log).")
def serve_command(
    export_dir: str,
    host: str,
    port: int,
    address: str | None,
    max_rows: int,
    max_samples: int,
    max_body_mb: int,
    **opts: Any,
) -> None:
    """Serve EXPORT_DIR over HTTP on Ray Serve until Ctrl-C.

    GET /healthz, GET /metadata, POST /decode (JSON {"z": [[...]]} or .npy), POST /encode
    (JSON {"x": ...} or .npy), GET /sample?n=&seed=[&format=png]. Needs the serve extra.
    """
    import signal

    from vae_deploy.serve import ServeConfig, start
    from vae_deploy.serve_api import ServeLimits

    limits = ServeLimits(max_body_bytes=max_body_mb << 20, max_rows=max_rows, max_samples=max_samples)
    config = ServeConfig(limits=limits, **opts)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    server = start(export_dir, config, host=host, port=port, address=address, quiet=True)
    # after ray.init, which installs its own SIGTERM handler: docker/systemd stop is a Ctrl-C here
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        batching = (
            f"dynamic batching up to {config.max_batch_size} rows, {config.batch_wait_ms:g} ms wait"
            if config.batching
            else "no dynamic batching"
        )
        click.echo(f"serving {export_dir} at {server.url} ({config.replicas} replica(s), {batching})")
        click.echo(f"  curl {server.url}/metadata    curl -o s.png '{server.url}/sample?n=16&seed=0&format=png'")
        click.echo("Ctrl-C to stop")
        server.wait()
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()


@cli.command("triton")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--repo", required=True, type=click.Path(file_okay=False), help="Triton model repository folder.")
@click.option("--name", default="vae", show_default=True, help="Models are NAME_decoder and NAME_encoder.")
@click.option(
    "--max-batch-size",
    default=256,
    show_default=True,
    type=click.IntRange(min=0),
    help="Largest batch Triton forms or accepts (0: no batching).",
)
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1), help="Instances per device.")
@click.option("--kind", default="gpu", show_default=True, type=click.Choice(("gpu", "cpu")))
@click.option("--tensorrt", is_flag=True, help="Run through onnxruntime's TensorRT provider (GPU).")
@click.option("--tensorrt-precision", default="fp32", show_default=True, type=click.Choice(("fp32", "fp16")))
@click.option(
    "--precision", default="fp32", show_default=True, type=click.Choice(("fp32", "fp16")), help="Decoder file."
)
@click.option("--max-queue-delay-us", default=100, show_default=True, type=click.IntRange(min=0))
@click.option("--preferred-batch-sizes", help="Comma-separated sizes dynamic batching aims for.")
@click.option("--graphs", help="Comma-separated: decoder, encoder (default: all the export has).")
def triton_command(
    export_dir: str, repo: str, preferred_batch_sizes: str | None, graphs: str | None, **opts: Any
) -> None:
    """Write EXPORT_DIR's graphs as models of a Triton Inference Server repository.

    Adds REPO/NAME_decoder (and NAME_encoder): config.pbtxt and 1/model.onnx. Other models in
    REPO are left alone.
    """
    from vae_deploy.triton import TritonOptions, docker_command, write_repository

    picked = tuple(g.strip() for g in graphs.split(",") if g.strip()) if graphs else None
    options = TritonOptions(preferred_batch_sizes=_csv_ints(preferred_batch_sizes) or (), graphs=picked, **opts)
    for model in write_repository(export_dir, repo, options):
        _wrote(model.path)
    click.echo(f"serve it with: {docker_command(repo, options.kind)}")


# --- tune -------------------------------------------------------------------------------------


@cli.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--graph", default="decoder", show_default=True, type=click.Choice(GRAPHS))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(("fp32", "fp16", "int8")))
@click.option("--seconds", default=5.0, show_default=True, type=float, help="Time spent measuring.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write what was measured as JSON.")
@click.option("--no-save", is_flag=True, help="Measure and print only; leave the plan cache alone.")
def tune(export_dir: str, graph: str, precision: str, seconds: float, json_path: str | None, no_save: bool) -> None:
    """Measure CPU plans for EXPORT_DIR on this machine and cache the fastest.

    VAERuntime (cpu_plan="auto", the default) and `vae-deploy sample` use the cached plan on this
    machine; the cache is keyed by CPU, onnxruntime version and the graph file's sha256, and lives
    in $VAE_DEPLOY_CACHE_DIR, else $XDG_CACHE_HOME/vae-deploy, else ~/.cache/vae-deploy.
    """
    import json

    from vae_deploy.files import atomic_write_text
    from vae_deploy.tune import tune_export

    result, cached = tune_export(
        export_dir, graph=graph, precision=precision, seconds=seconds, save=not no_save, log=click.echo
    )
    click.echo(result.table())
    click.echo(f"cached for this machine: {cached.path}" if cached else "not cached (--no-save)")
    if json_path:
        atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
        click.echo(f"wrote {json_path}")


# --- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn every documented error into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("VAE_DEPLOY_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="vae-deploy", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors: bad option, missing argument
        if debug:
            raise
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except VaeDeployError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except ModuleNotFoundError as exc:  # an optional extra is not installed (torch, matplotlib, ...)
        missing = missing_extra(exc)
        if debug:
            raise
        if missing is None:
            return _internal_error(exc)
        click.echo(f"error: {missing}", err=True)
        return missing.exit_code
    except OSError as exc:  # a path the user gave is unusable (read-only, a file in the way, disk full)
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}{where} (check the paths you gave)", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - never a traceback unless --debug
        if debug:
            raise
        return _internal_error(exc)
    return 0


def _internal_error(exc: BaseException) -> int:
    """A bug, not a user error: still one line (``--debug`` shows the traceback)."""
    click.echo(f"error: internal error {type(exc).__name__}: {first_line(exc)} (rerun with --debug)", err=True)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

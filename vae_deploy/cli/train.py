"""``train`` (here or on N processes under torchrun) and ``demo`` (train -> export -> verify -> sample -> bench)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from vae_deploy.cli.common import DATA_ROOT_HELP, csv_ints
from vae_deploy.config import ACTIVATIONS, ARCHS, DATASETS, DEVICES, LOSSES

# --- train --------------------------------------------------------------------------------------


@click.command()
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
            opts[key] = csv_ints(opts[key])
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


@click.command()
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

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

from vae_deploy import __version__
from vae_deploy.errors import VaeDeployError

DATA_ROOT_HELP = "torchvision-style data root (ROOT/MNIST/raw/...); default: $VAE_DEPLOY_DATA"


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
@click.option("--arch", type=click.Choice(["mlp", "conv"]))
@click.option("--latent-dim", type=int)
@click.option("--hidden", help="MLP hidden sizes, comma-separated (e.g. 400 or 512,256).")
@click.option("--activation", type=click.Choice(["relu", "tanh"]))
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--loss", type=click.Choice(["bce", "mse", "l1"]))
@click.option("--beta", type=float, help="Weight on the KL term.")
@click.option("--alpha", type=float, help="Weight on the reconstruction term.")
@click.option("--dataset", type=click.Choice(["mnist", "fashion-mnist", "synthetic"]))
@click.option("--data-root", help=DATA_ROOT_HELP)
@click.option("--download/--no-download", default=None, help="Download the dataset (internet).")
@click.option("--binarize/--no-binarize", default=None, help="Threshold pixels at 0.5.")
@click.option("--seed", type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--max-steps", type=int, help="Stop after this many optimiser steps (smoke runs).")
@click.option("--train-limit", type=int, help="Use only the first N training images.")
@click.option("--checkpoint-every", type=int, help="Also checkpoint every N steps (0: per epoch).")
@click.option("--out", help="Run folder (checkpoint.pt, metrics.jsonl).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a TTY).")
def train(recipe: str | None, resume: bool, progress: bool | None, **opts: Any) -> None:
    """Train a VAE; command-line options override the recipe."""
    from vae_deploy.config import load_recipe, make_configs
    from vae_deploy.training import train as run_training

    model_raw, train_raw = load_recipe(recipe) if recipe else ({}, {})
    model_keys = {"arch", "latent_dim", "hidden", "activation"}
    if opts.get("hidden") is not None:
        opts["hidden"] = _csv_ints(opts["hidden"])
    for key, value in opts.items():
        if value is not None:
            (model_raw if key in model_keys else train_raw)[key] = value
    if "out" not in train_raw:
        train_raw["out"] = str(Path("runs") / (Path(recipe).stem if recipe else "default"))
    model_cfg, train_cfg = make_configs(model_raw, train_raw)
    show = sys.stderr.isatty() if progress is None else progress
    result = run_training(model_cfg, train_cfg, resume=resume, progress=show, log=click.echo)
    last = result.history[-1] if result.history else {}
    click.echo(f"checkpoint: {result.checkpoint}  (val_loss {last.get('val_loss', float('nan')):.2f})")


# --- demo ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--data-root", help=DATA_ROOT_HELP)
@click.option("--dataset", default="mnist", type=click.Choice(["mnist", "fashion-mnist", "synthetic"]))
@click.option("--epochs", default=2, show_default=True)
@click.option("--out", default="runs/demo", show_default=True, help="Run folder.")
@click.option("--export-dir", default="exported", show_default=True)
def demo(data_root: str | None, dataset: str, epochs: int, out: str, export_dir: str) -> None:
    """The main job end to end on defaults: train a small MLP VAE (then export, verify, sample, bench)."""
    import shutil

    from vae_deploy.config import make_configs
    from vae_deploy.training import train as run_training

    if Path(out, "checkpoint.pt").exists():
        shutil.rmtree(out)
    model_cfg, train_cfg = make_configs(
        {"arch": "mlp", "latent_dim": 20, "hidden": [400]},
        {
            "dataset": dataset,
            "data_root": data_root,
            "epochs": epochs,
            "batch_size": 128,
            "lr": 1e-3,
            "out": out,
        },
    )
    click.echo("== train")
    result = run_training(model_cfg, train_cfg, progress=sys.stderr.isatty(), log=click.echo)
    click.echo(f"checkpoint: {result.checkpoint}")


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
    except Exception as exc:  # noqa: BLE001 - never a traceback unless --debug
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: internal error {type(exc).__name__}: {msg} (rerun with --debug)", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

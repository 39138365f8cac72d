"""The views of a model (reconstruct, interpolate, vary, latent-map, curves), ``encode`` and ``evaluate``."""

from __future__ import annotations

import sys
from typing import Any

import click

from vae_deploy.cli.common import DATA_ROOT_HELP, wrote
from vae_deploy.config import DATASETS, DEVICES
from vae_deploy.viz import MAP_METHODS

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


@click.command(epilog=_SOURCE_HELP)
@_view_options("reconstruct.png")
@click.option("-n", "n", default=8, show_default=True, help="Number of validation images.")
def reconstruct(model: str, provider: str, out: str, **opts: Any) -> None:
    """Originals above their reconstructions.

    n validation images (top row) above decode(mu) of each (bottom row).
    """
    from vae_deploy import viz

    wrote(viz.reconstruct(viz.load_source(model, provider), out, **opts))


@click.command(epilog=_SOURCE_HELP)
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
    wrote(path)


@click.command(epilog=_SOURCE_HELP)
@_view_options("vary.png")
@click.option("-n", "n", default=5, show_default=True, help="Posterior draws per class.")
def vary(model: str, provider: str, out: str, **opts: Any) -> None:
    """Decode posterior draws, one row per class.

    Each row: a validation example of the class, then n decodes of z ~ N(mu, sigma^2) from its
    posterior.
    """
    from vae_deploy import viz

    wrote(viz.vary(viz.load_source(model, provider), out, **opts))


@click.command(epilog=_SOURCE_HELP)
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

    wrote(viz.latent_map(viz.load_source(model, provider), out, **opts))


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", default="curves.png", show_default=True, help="PNG file to write.")
def curves(run_dir: str, out: str) -> None:
    """Train/validation loss curves of a run.

    Total objective, reconstruction, KL and -ELBO per epoch from RUN_DIR/metrics.jsonl.
    """
    from vae_deploy import viz

    wrote(viz.curves(run_dir, out))


# --- encode -------------------------------------------------------------------------------------


@click.command(epilog=_SOURCE_HELP)
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


@click.command()
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

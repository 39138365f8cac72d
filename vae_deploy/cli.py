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
from vae_deploy.config import ACTIVATIONS, ARCHS, DATASETS, DEVICES, LOSSES
from vae_deploy.contract import GRAPHS
from vae_deploy.errors import VaeDeployError, first_line, missing_extra
from vae_deploy.viz import MAP_METHODS

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
@click.option("--arch", type=click.Choice(ARCHS))
@click.option("--latent-dim", type=int)
@click.option("--hidden", help="MLP hidden sizes, comma-separated (e.g. 400 or 512,256).")
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
@click.option("--download", is_flag=True, help="Fetch MNIST with torchvision first (needs internet).")
@click.option("--dataset", default="mnist", type=click.Choice(DATASETS))
@click.option("--epochs", default=5, show_default=True)
@click.option("--out", default="runs/demo", show_default=True, help="Run folder (replaced).")
@click.option("--export-dir", default="exported", show_default=True)
@click.option("--samples", default="runs/demo/samples.png", show_default=True)
@click.option("--bench/--no-bench", default=True, show_default=True, help="End with a short benchmark.")
def demo(
    data_root: str | None,
    download: bool,
    dataset: str,
    epochs: int,
    out: str,
    export_dir: str,
    samples: str,
    bench: bool,
) -> None:
    """The main job end to end on defaults: train -> export -> verify -> sample -> bench."""
    import shutil

    from vae_deploy.config import make_configs
    from vae_deploy.export import export
    from vae_deploy.parity import verify
    from vae_deploy.sample import sample_to_file
    from vae_deploy.training import train as run_training

    if Path(out, "checkpoint.pt").exists():
        shutil.rmtree(out)
    model_cfg, train_cfg = make_configs(
        {"arch": "mlp", "latent_dim": 20, "hidden": [400]},
        {
            "dataset": dataset,
            "data_root": data_root,
            "download": download,
            "epochs": epochs,
            "batch_size": 128,
            "lr": 1e-3,
            "out": out,
        },
    )
    click.echo("== 1/5 train: MLP 784-400-(2x20), BCE + KL")
    result = run_training(model_cfg, train_cfg, progress=sys.stderr.isatty(), log=click.echo)
    click.echo(f"checkpoint: {result.checkpoint}")
    click.echo(f"== 2/5 export -> {export_dir}/")
    exported = export(
        result.checkpoint, export_dir, formats=("onnx", "torchscript", "pt2"), verify=False, log=click.echo
    )
    click.echo("== 3/5 verify against eager PyTorch")
    report = verify(exported.out_dir, data_root=data_root, log=lambda _: None)
    click.echo(report.table())
    if not report.passed:
        from vae_deploy.errors import ParityError

        raise ParityError(f"verify failed: {report.summary()}")
    click.echo("== 4/5 sample 64 images on onnxruntime (seed 0)")
    s = sample_to_file(exported.out_dir, 64, samples, seed=0, provider="auto")
    click.echo(f"provider {s.provider}: wrote {s.path} ({s.samples_per_second:,.0f} samples/s)")
    if bench:
        click.echo("== 5/5 bench (quick): decoder throughput per backend")
        _demo_bench(exported.out_dir)


def _demo_bench(export_dir: Path) -> None:
    from vae_deploy.bench import format_table, run_bench

    report = run_bench(export_dir, quick=True, progress=sys.stderr.isatty(), log=lambda _: None)
    click.echo(format_table(report))


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
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=n, unit="img", disable=not show or n < 1, leave=False) as bar:
        if out is not None:
            from vae_deploy.sample import sample_to_file

            result = sample_to_file(export_dir, n, out, seed=seed, provider=provider, progress=bar.update, **opts)
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


@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", default="exported", show_default=True, help="Export folder (replaced atomically).")
@click.option(
    "--formats",
    default="onnx,torchscript",
    show_default=True,
    help="Comma-separated: onnx, torchscript, pt2 (torch.export, TorchScript's supported successor).",
)
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's, recorded in the manifest).")
@click.option("--fp16", is_flag=True, help="Also write decoder.fp16.onnx (half precision inside, fp32 I/O).")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against eager PyTorch.")
@click.option("--data-root", help=DATA_ROOT_HELP + " (real images for the parity check)")
def export_command(
    checkpoint: str,
    out: str,
    formats: str,
    opset: int | None,
    fp16: bool,
    no_verify: bool,
    data_root: str | None,
) -> None:
    """Export encoder and decoder graphs from CHECKPOINT, verify them, and write the manifest."""
    from vae_deploy.export import export

    export(
        checkpoint,
        out,
        formats=formats,
        opset=opset,
        fp16=fp16,
        verify=not no_verify,
        data_root=data_root,
        log=click.echo,
    )


@cli.command("verify")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Eager reference (default: the manifest's).")
@click.option("--data-root", help=DATA_ROOT_HELP + " (real images; else seeded random inputs)")
@click.option("--batch-sizes", default="1,7,256", show_default=True, help="Comma-separated batch sizes.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
def verify_command(
    export_dir: str, checkpoint: str | None, data_root: str | None, batch_sizes: str, json_path: str | None
) -> None:
    """Check EXPORT_DIR's sha256s, then compare every graph and backend with eager PyTorch."""
    from vae_deploy.errors import ParityError
    from vae_deploy.parity import verify

    report = verify(
        export_dir,
        checkpoint=checkpoint,
        data_root=data_root,
        batch_sizes=_csv_ints(batch_sizes) or (),
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

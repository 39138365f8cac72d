"""Speed on this machine: ``bench`` (every backend side by side) and ``tune`` (cache the fastest CPU plan)."""

from __future__ import annotations

import sys

import click

from vae_deploy.cli.common import csv_ints
from vae_deploy.contract import GRAPHS

# --- bench --------------------------------------------------------------------------------------


@click.command()
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
        batch_sizes=csv_ints(batch_sizes),
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


# --- tune -------------------------------------------------------------------------------------


@click.command()
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

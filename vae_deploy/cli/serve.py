"""Serving an export: ``serve`` (HTTP on Ray Serve) and ``triton`` (a Triton model repository)."""

from __future__ import annotations

from typing import Any

import click

from vae_deploy.cli.common import csv_ints, wrote
from vae_deploy.config import DEVICES


@click.command("serve")
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


@click.command("triton")
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
    options = TritonOptions(preferred_batch_sizes=csv_ints(preferred_batch_sizes) or (), graphs=picked, **opts)
    for model in write_repository(export_dir, repo, options):
        wrote(model.path)
    click.echo(f"serve it with: {docker_command(repo, options.kind)}")

"""The ``vae-deploy`` command: a thin layer over library calls that tests can make directly.

The group and its entry point live here; the commands live by job in the modules beside it:
``train`` (train, demo), ``views`` (reconstruct, interpolate, vary, latent-map, curves, encode,
evaluate), ``sample``, ``export`` (export, verify), ``bench`` (bench, tune) and ``serve`` (serve,
triton); ``common`` holds what several of them share.

Errors: a documented ``VaeDeployError`` prints one line (``error: ...``) and exits with its code
(2 for usage errors); anything unexpected prints one line too, and ``--debug`` shows the traceback.
Heavy modules (torch) are imported inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys

import click

from vae_deploy import __version__
from vae_deploy.cli import bench, export, sample, serve, train, views
from vae_deploy.errors import VaeDeployError, first_line, missing_extra

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vae-deploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Train VAEs, export encoder/decoder graphs, verify them, and sample/benchmark on ORT."""


cli.add_command(train.train)
cli.add_command(train.demo)
cli.add_command(views.reconstruct)
cli.add_command(views.interpolate)
cli.add_command(views.vary)
cli.add_command(views.latent_map)
cli.add_command(views.curves)
cli.add_command(views.encode)
cli.add_command(views.evaluate)
cli.add_command(sample.sample)
cli.add_command(export.export_command)
cli.add_command(export.verify_command)
cli.add_command(bench.bench)
cli.add_command(bench.tune)
cli.add_command(serve.serve_command)
cli.add_command(serve.triton_command)


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

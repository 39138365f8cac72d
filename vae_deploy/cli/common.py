"""What several command modules share: the data-root help text, integer-list options, the "wrote" line."""

from __future__ import annotations

from pathlib import Path

import click

DATA_ROOT_HELP = (
    "torchvision-style data root (ROOT/MNIST/raw/..., ROOT/cifar-10-batches-py, ROOT/celeba), or the folder of "
    "images for --dataset folder; default: $VAE_DEPLOY_DATA"
)


def csv_ints(value: str | None) -> tuple[int, ...] | None:
    """'1,2,3' -> (1, 2, 3): positive integers, comma-separated (None stays None)."""
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


def wrote(path: Path) -> None:
    """Report a written file, printable whatever bytes its name has."""
    from vae_deploy.errors import printable

    click.echo(f"wrote {printable(str(path))}")

"""``sample``: images from an export folder on onnxruntime (torch-free), to a file or as shards."""

from __future__ import annotations

import sys
from typing import Any

import click

from vae_deploy.cli.common import csv_ints
from vae_deploy.config import DEVICES


@click.command()
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
    latent_size = csv_ints(opts.pop("latent_size"))
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

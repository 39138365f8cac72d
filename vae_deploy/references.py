"""The eager side of verify: the reference model rebuilt from an export's recorded source, and the
inputs both sides are given.

Sources (``manifest.source.kind``): ``checkpoint`` (our own; real MNIST images when a data root
is there), ``diffusers`` (a diffusers VAE folder) and ``factory`` (``pkg.module:build`` plus a
weights file). Each is found from the export folder, hash-checked against the manifest before it
is loaded, and can be overridden (``--checkpoint``: another checkpoint, folder or weights file).

Inputs: a list of cases, each a batch size and, for exports with dynamic height and width, an
image size. Images are seeded and smooth (low-frequency noise in the value range, closer to
pictures than white noise); decoder latents are the encoder's means of those images (half the
batch) and seeded N(0, I) draws (the other half), or draws only for a decoder-only export.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae_deploy.adapters import DecoderGraph, EncoderGraph, outputs
from vae_deploy.contract import DECODER, ENCODER, IMAGE, LATENT, LOGVAR, MEAN, RECON, Manifest, ModelSpec
from vae_deploy.errors import ExportError, UsageError

DEFAULT_BATCH_SIZES = (1, 7, 256)  # our own (small) models
MODULE_BATCH_SIZES = (1, 3)  # any other VAE: at every size
SEED = 0


@dataclass
class Case:
    """One comparison input: a batch of images (None for a decoder-only export) at one size."""

    batch: int
    size: tuple[int, int] | None = None  # image (H, W) where the export's sizes are dynamic
    images: torch.Tensor | None = None
    graph: str | None = None  # only this graph's files are compared on it (None: every graph)

    @property
    def label(self) -> str:
        return f"{self.size[0]}x{self.size[1]}" if self.size else ""


@dataclass
class Reference:
    """Eager encoder/decoder (``x -> mu[, logvar]``, ``z -> x_hat``) and the cases to compare on."""

    encoder: nn.Module | None
    decoder: nn.Module
    model: ModelSpec
    cases: list[Case]
    inputs: str  # what the inputs are, for the report
    source: str = ""  # where the eager model came from
    note: str = ""  # set when the eager model is not the exported one
    proved_ranges: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # file -> size -> [lo, hi]

    def feeds(self) -> dict[tuple[str, int], tuple[dict[str, Any], dict[str, Any]]]:
        """Per (graph, case index): the named numpy inputs and the eager outputs."""
        out = {}
        with torch.no_grad():
            for i, case in enumerate(self.cases):
                g = torch.Generator().manual_seed(SEED * 1000 + i)
                b = case.batch
                if self.encoder is not None and case.images is not None and case.graph in (None, ENCODER):
                    encoded = outputs(self.encoder, case.images)
                    names = (MEAN, LOGVAR)[: len(encoded)]
                    out[(ENCODER, i)] = ({IMAGE: case.images.numpy()}, {n: t.numpy() for n, t in zip(names, encoded)})
                    mu = encoded[0]
                    k = (b + 1) // 2
                    z = torch.cat([mu[:k], torch.randn((b - k, *mu.shape[1:]), generator=g)])
                else:
                    latent = self.model.shapes_at(image_size=case.size)[0] if case.size else self.model.latent_shape
                    z = torch.randn((b, *latent), generator=g)
                x_hat = self.decoder(z.contiguous())
                out[(DECODER, i)] = ({LATENT: z.numpy()}, {RECON: x_hat.numpy()})
        return out


# --- inputs -------------------------------------------------------------------------------------


def smooth_images(n: int, shape: Sequence[int], value_range: tuple[float, float], seed: int) -> torch.Tensor:
    """n seeded images [n, C, H, W] in ``value_range``: coarse noise upsampled, plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.rand((n, c, max(1, h // 8), max(1, w // 8)), generator=g)
    fine = torch.rand((n, c, h, w), generator=g)
    unit = 0.8 * torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) + 0.2 * fine
    lo, hi = value_range
    return (lo + (hi - lo) * unit.clamp(0.0, 1.0)).contiguous()


def dataset_images(
    n: int, shape: tuple[int, ...], train_config: dict | None, data_root: Any
) -> tuple[torch.Tensor, str]:
    """n real validation images of the checkpoint's dataset at the model's shape (MNIST for synthetic
    or unknown data), else seeded noise, with a line saying which and why."""
    from vae_deploy.config import DATASETS, NATIVE_SHAPES
    from vae_deploy.data import load_splits, resolve_data_root
    from vae_deploy.errors import VaeDeployError, printable

    trained = train_config or {}
    dataset = trained.get("dataset")
    dataset = dataset if dataset in DATASETS and dataset != "synthetic" else "mnist"
    if dataset == "folder":  # the folder it was trained on, unless another is given
        folder = data_root or trained.get("data_root")
        root = Path(folder) if folder else None
    else:
        root = resolve_data_root(data_root)
    why = "no data root (pass --data-root or set VAE_DEPLOY_DATA)"
    if dataset in NATIVE_SHAPES and NATIVE_SHAPES[dataset] != shape:
        why = f"model image shape {list(shape)} is not {dataset}'s"
    elif root is not None or dataset == "digits":
        try:
            splits = load_splits(dataset, root, image_shape=shape, train_limit=n, val_limit=n)
            pool = torch.cat([splits.val_x, splits.train_x])
            reps = -(-n // len(pool))
            where = f" from {printable(str(root))}" if root is not None else ""
            return pool.repeat(reps, 1, 1, 1)[:n].contiguous(), f"{dataset} images{where}"
        except VaeDeployError as exc:
            why = f"{dataset} not readable under {printable(str(root))}: {str(exc)[:120]}"
    g = torch.Generator().manual_seed(SEED)
    return torch.rand((n, *shape), generator=g), f"seeded uniform random images (seed {SEED}; {why})"


def check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise UsageError(f"batch sizes must be positive integers; got {list(sizes)}")
    return sizes


def checkpoint_reference(
    model: Any, train_config: dict | None, data_root: Any, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
) -> Reference:
    """One of our VAEs (vae_deploy.model.VAE) on real images where there are some."""
    sizes = check_batch_sizes(batch_sizes)
    model = model.eval().cpu()
    spec = ModelSpec((model.latent_dim,), tuple(model.config.image_shape))
    images, desc = dataset_images(max(sizes), tuple(spec.image_shape), train_config, data_root)
    cases = [Case(b, None, images[:b]) for b in sizes]
    return Reference(model.encoder, model.decoder, spec, cases, desc)


def module_reference(
    encoder: nn.Module | None,
    decoder: nn.Module,
    model: ModelSpec,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    batch_sizes: Sequence[int] = MODULE_BATCH_SIZES,
    proved_ranges: dict[str, dict[str, list[int]]] | None = None,
) -> Reference:
    """Any VAE's graphs (``EncoderGraph``/``DecoderGraph``) at each image size x batch size; where
    torch.export proved a graph only up to some batch, one more case just beyond it."""
    batches = check_batch_sizes(batch_sizes)
    if model.dynamic_size:
        if not sizes:
            raise UsageError("this export takes any image size: give the sizes to verify at (e.g. 64x64,48x80)")
        image_sizes: list[tuple[int, int] | None] = []
        for s in sizes:
            model.shapes_at(image_size=tuple(s))  # UsageError for a size that is no multiple of the factor
            image_sizes.append((int(s[0]), int(s[1])))
    else:
        image_sizes = [None]
    runs: list[tuple[int, tuple[int, int] | None, str | None]] = [(b, s, None) for s in image_sizes for b in batches]
    for graph in (ENCODER, DECODER):  # one case just beyond the batch torch proved a graph for
        limits = [r["batch"][1] for f, r in (proved_ranges or {}).items() if f.startswith(graph) and "batch" in r]
        if limits and max(batches) <= min(limits):
            runs.append((min(limits) + 1, image_sizes[0], graph))
    cases = []
    for i, (b, size, graph) in enumerate(runs):
        images = None
        if encoder is not None and graph in (None, ENCODER):
            shape = model.shapes_at(image_size=size)[1] if size else model.image_shape
            images = smooth_images(b, shape, model.value_range, SEED + i)
        cases.append(Case(b, size, images, graph))
    desc = (
        f"seeded smooth random images in {list(model.value_range)} (seed {SEED})"
        if encoder is not None
        else f"seeded N(0, I) latents (seed {SEED})"
    )
    return Reference(encoder, decoder, model, cases, desc, proved_ranges=dict(proved_ranges or {}))


# --- the source of an export --------------------------------------------------------------------


def for_export(
    export_dir: str | os.PathLike,
    manifest: Manifest,
    *,
    override: str | os.PathLike | None = None,
    data_root: Any = None,
    batch_sizes: Sequence[int] | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
    modules: tuple[nn.Module | None, nn.Module] | None = None,
) -> Reference:
    """The reference an export is verified against, rebuilt from its recorded source (or
    ``override``, or in-memory ``modules`` for an export made from them)."""
    source = manifest.model.source
    kind = source.get("kind", "checkpoint")
    if kind == "checkpoint" and modules is None:
        return _checkpoint(export_dir, manifest, override, data_root, batch_sizes or DEFAULT_BATCH_SIZES)
    rebuilt = rebuild(export_dir, manifest, override) if modules is None else None
    encoder, decoder = modules if modules is not None else (rebuilt.encoder, rebuilt.decoder)
    info = manifest.raw.get("export") if isinstance(manifest.raw.get("export"), dict) else {}
    recorded = manifest.raw.get("verification") if isinstance(manifest.raw.get("verification"), dict) else {}
    if not manifest.formats(ENCODER):
        encoder = None  # a decoder-only export
    kind_out = info.get("encoder_output", "mean-logvar" if manifest.model.has_logvar else "latents")
    reference = module_reference(
        EncoderGraph(encoder, kind_out).eval() if encoder is not None else None,
        DecoderGraph(decoder).eval(),
        manifest.model,
        sizes=sizes or recorded.get("sizes"),
        batch_sizes=batch_sizes or recorded.get("batch_sizes") or MODULE_BATCH_SIZES,
        proved_ranges=info.get("proved_ranges") if isinstance(info.get("proved_ranges"), dict) else None,
    )
    reference.source = rebuilt.where if rebuilt else "modules given to verify"
    reference.note = rebuilt.note if rebuilt else ""
    return reference


def eager_graphs(
    export_dir: str | os.PathLike, manifest: Manifest, override: str | os.PathLike | None = None
) -> dict[str, nn.Module]:
    """A diffusers or factory export's eager graphs by name ("encoder" when exported, "decoder"),
    as the export traced them (for bench's eager backends)."""
    rebuilt = rebuild(export_dir, manifest, override)
    info = manifest.raw.get("export") if isinstance(manifest.raw.get("export"), dict) else {}
    kind = info.get("encoder_output") or ("mean-logvar" if manifest.model.has_logvar else "latents")
    graphs = {DECODER: DecoderGraph(rebuilt.decoder).eval()}
    if rebuilt.encoder is not None and manifest.formats(ENCODER):
        graphs[ENCODER] = EncoderGraph(rebuilt.encoder, kind).eval()
    return graphs


def rebuild(export_dir: str | os.PathLike, manifest: Manifest, override: str | os.PathLike | None = None) -> Any:
    """The eager VAE (adapters.Rebuilt) of a diffusers or factory source, hash-checked first."""
    source = manifest.model.source
    kind = source.get("kind")
    if kind == "diffusers":
        from vae_deploy import diffusers_vae

        return diffusers_vae.rebuild(source, Path(export_dir), override)
    if kind == "factory":
        from vae_deploy import factory

        return factory.rebuild(source, Path(export_dir), override)
    raise ExportError(
        f"this export's source ({kind or 'none'}) cannot be rebuilt; verify it from Python with "
        "parity.verify(export_dir, modules=(encoder, decoder))"
    )


def _checkpoint(export_dir: Any, manifest: Manifest, override: Any, data_root: Any, batch_sizes: Any) -> Reference:
    """Our checkpoint: the given one, else the one the manifest names (found relative to the
    export folder, and still the file that was exported), with the exported architecture."""
    from vae_deploy.checkpoint import model_from_state, read_checkpoint
    from vae_deploy.config import to_dict
    from vae_deploy.files import sha256_file
    from vae_deploy.manifest import source_checkpoint

    recorded = manifest.model.source
    note = ""
    if override is None:
        path = source_checkpoint(export_dir, manifest)
    else:
        path = Path(override)
        if path.is_file() and recorded.get("sha256") and sha256_file(path) != recorded["sha256"]:
            note = f"note: {path} is not the checkpoint this export was made from (sha256 differs)"
    state = read_checkpoint(path)
    model = model_from_state(state, str(path))
    want, got = manifest.raw.get("model_config"), to_dict(model.config)
    if isinstance(want, dict) and want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ExportError(
            f"{path} does not have the exported model's architecture (differs in {', '.join(diff)}); "
            "pass the checkpoint the export was made from"
        )
    reference = checkpoint_reference(model, state.get("train_config"), data_root, batch_sizes)
    reference.source, reference.note = str(path), note
    return reference

"""Model quality in nats per image: the negative ELBO and the IWAE bound on the negative log-likelihood.

For each image, k importance samples z_i ~ q(z|x) give log-weights
    log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x)      (Bernoulli p(x|z), N(0, I) prior)
and the IWAE bound (Burda et al., 2016) is  log p(x) >= log (1/k) sum_i w_i,  tighter as k grows;
k = 1 is the ELBO in expectation. We report ``-ELBO`` (reconstruction averaged over the same k
samples plus the analytic KL, as training logs it) and ``NLL <= -IWAE_k``, both averaged over the
validation images: lower is better, and -IWAE_k <= -ELBO up to sampling noise.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_deploy.errors import ResourceError, UsageError, printable
from vae_deploy.losses import gaussian_log_prob, gaussian_log_prob_std
from vae_deploy.model import VAE
from vae_deploy.resources import gib, require_memory

SAMPLES_PER_CHUNK = 10_000  # decoder rows per forward pass (k * images) at most, bounds memory
CHUNK_BYTES = 1 << 30  # and at most this much working memory (large images get fewer rows)
MAX_VALIDATION = 10_000  # the largest validation split of the datasets here (MNIST's test set)


@dataclass(frozen=True)
class EvalResult:
    """Validation quality of one model, nats per image (lower is better)."""

    nelbo: float  # negative ELBO
    iwae_nll: float  # negative IWAE bound: an upper bound on -log p(x)
    k: int
    images: int
    dataset: str
    binarized: bool
    checkpoint: str
    data_note: str
    seed: int

    def summary(self) -> str:
        data = f"{self.dataset}{' (binarized)' if self.binarized else ''}"
        return (
            f"{data} validation, {self.images:,} images: -ELBO {self.nelbo:.2f} nats/image, "
            f"IWAE NLL bound (k={self.k}) {self.iwae_nll:.2f} nats/image"
        )


@torch.no_grad()
def log_weights(model: VAE, x: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Importance log-weights [k, N] of x [N,C,H,W] under ``model``, and the per-image ELBO [N]
    (log p(x|z) averaged over the same k samples, minus the analytic KL)."""
    _check_k(k)
    mu, logvar = model.encoder(x)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + std * eps  # [k, N, d]
    logits = model.decoder.logits(z.reshape(-1, mu.shape[1]))
    target = x.expand(k, *x.shape).reshape(logits.shape)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)
    log_w = log_px_z.view(k, -1) + gaussian_log_prob_std(z) - gaussian_log_prob(z, mu, logvar)
    kl = 0.5 * (mu * mu + std * std - 1.0 - logvar).sum(1)
    return log_w, log_px_z.view(k, -1).mean(0) - kl


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k (importance samples) must be a positive integer, got {k!r}")
    return k


@torch.no_grad()
def decoder_row_values(model: VAE) -> int:
    """Values the decoder computes for one latent row (every layer's output, views excluded)."""
    total = [0]

    def count(module: torch.nn.Module, inputs: object, output: Tensor) -> None:
        if not isinstance(module, (torch.nn.Flatten, torch.nn.Unflatten)):
            total[0] += output[0].numel()

    leaves = [m for m in model.decoder.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        p = next(model.parameters())
        model.decoder.logits(torch.zeros(1, model.latent_dim, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def _row_bytes(model: VAE) -> int:
    """Memory of one decoder row: every layer's output, the target, the per-pixel loss and a
    temporary, and the latents and densities (float32)."""
    return 4 * (decoder_row_values(model) + 3 * math.prod(model.config.image_shape) + 6 * model.latent_dim)


def images_per_chunk(model: VAE, k: int) -> int:
    """Images per forward pass of :func:`bounds`: k decoder rows each, at most SAMPLES_PER_CHUNK rows
    and CHUNK_BYTES of working memory (at least one image)."""
    rows = min(SAMPLES_PER_CHUNK, CHUNK_BYTES // _row_bytes(model))
    return max(1, rows // k)


def peak_bytes(model: VAE, images: int, k: int) -> int:
    """Peak memory of :func:`bounds` over ``images`` images: one chunk of k samples per image."""
    return min(images, images_per_chunk(model, k)) * k * _row_bytes(model)


def require_bounds_memory(model: VAE, images: int, k: int, device: torch.device | str = "cpu") -> None:
    """Refuse (one line) an evaluation whose chunk of k samples would not fit in memory."""
    need = peak_bytes(model, images, k)
    device = torch.device(device)
    what = f"evaluating with k={k} importance samples"
    hint = "use a smaller --k"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise ResourceError(f"{what} needs {gib(need)}, more than the {gib(free)} free on {device}; {hint}")
        return
    require_memory(need, what, hint)


@torch.no_grad()
def bounds(
    model: VAE, x: Tensor, k: int = 100, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Per-image ELBO [N] and k-sample IWAE bound [N] (log-likelihood lower bounds, nats), chunked."""
    k = _check_k(k)
    if len(x) == 0:
        raise UsageError("no images to evaluate: expected at least one validation image")
    device = torch.device(device)
    require_bounds_memory(model, len(x), k, device)
    model = model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    per_chunk = images_per_chunk(model, k)
    elbos, iwaes = [], []
    for i in range(0, len(x), per_chunk):
        xb = x[i : i + per_chunk].to(device)
        log_w, elbo = log_weights(model, xb, k, gen)
        iwaes.append((torch.logsumexp(log_w, dim=0) - math.log(k)).cpu())
        elbos.append(elbo.cpu())
    return torch.cat(elbos), torch.cat(iwaes)


def evaluate(
    checkpoint: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    k: int = 100,
    limit: int | None = None,
    binarize: bool | None = None,
    seed: int = 0,
    device: str = "auto",
) -> EvalResult:
    """-ELBO and the IWAE-k NLL bound of a checkpoint (or run folder) on its validation split.

    ``dataset`` and ``binarize`` default to what the checkpoint was trained with.
    """
    from vae_deploy.checkpoint import model_from_state, read_checkpoint
    from vae_deploy.data import load_splits
    from vae_deploy.training import resolve_device

    k = _check_k(k)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"limit must be a positive integer (validation images), got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise UsageError(f"seed must be an integer from -2**63 to 2**64 - 1, got {seed!r}")
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = read_checkpoint(path)
    model = model_from_state(state, str(path))
    device = resolve_device(device)
    require_bounds_memory(model, min(limit or MAX_VALIDATION, MAX_VALIDATION), k, device)
    trained = state.get("train_config") or {}
    name = dataset or trained.get("dataset") or "mnist"
    binary = bool(trained.get("binarize", False)) if binarize is None else binarize
    if data_root is None and name == trained.get("dataset"):
        data_root = trained.get("data_root")  # a folder model's default: the folder it was trained on
    shape = tuple(model.config.image_shape)
    splits = load_splits(name, data_root, binarize=binary, train_limit=1, val_limit=limit, image_shape=shape)
    x = splits.val_x
    if tuple(x.shape[1:]) != tuple(model.config.image_shape):
        raise UsageError(
            f"{path} takes images of shape {tuple(model.config.image_shape)}, but {name} has "
            f"{tuple(x.shape[1:])}: pick the dataset the model was trained on"
        )
    elbo, iwae = bounds(model, x, k, seed, device)
    return EvalResult(
        nelbo=-float(elbo.double().mean()),
        iwae_nll=-float(iwae.double().mean()),
        k=k,
        images=len(x),
        dataset=name,
        binarized=binary,
        checkpoint=printable(str(path)),
        data_note=splits.note,
        seed=seed,
    )


def write_json(result: EvalResult, path: str | os.PathLike) -> Path:
    """Write ``result`` as JSON to ``path`` atomically."""
    from vae_deploy.files import atomic_write

    atomic_write(path, (json.dumps(asdict(result), indent=2) + "\n").encode())
    return Path(path)


__all__ = [
    "EvalResult",
    "log_weights",
    "images_per_chunk",
    "peak_bytes",
    "require_bounds_memory",
    "bounds",
    "evaluate",
    "write_json",
]

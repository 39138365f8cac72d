"""ELBO-style losses. Every term is summed over pixels/latent dims and averaged over the batch.

objective = alpha * recon + beta * KL. ``recon`` is the chosen reconstruction loss (bce|mse|l1);
``nelbo`` is always the Bernoulli negative ELBO (BCE + KL, unweighted) in nats per image, so runs
with different losses and weights stay comparable.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_deploy.config import LOSSES
from vae_deploy.errors import UsageError


class LossTerms(NamedTuple):
    loss: Tensor  # alpha * recon + beta * kl (what is optimised)
    recon: Tensor  # reconstruction term, per image
    kl: Tensor  # KL term, nats per image
    nelbo: Tensor  # Bernoulli negative ELBO, nats per image


def reconstruction(logits: Tensor, x: Tensor, kind: str = "bce") -> Tensor:
    """Per-image reconstruction loss (sum over pixels, mean over batch) from decoder logits."""
    if kind not in LOSSES:
        raise UsageError(f"reconstruction loss must be one of {LOSSES}, got {kind!r}")
    if not (torch.is_tensor(logits) and torch.is_tensor(x)):
        raise UsageError("logits and targets must be torch tensors")
    if not (logits.is_floating_point() and x.is_floating_point()):
        raise UsageError(f"logits and targets must be floating point, got {logits.dtype} and {x.dtype}")
    if logits.dim() < 2:
        raise UsageError(f"expected batched tensors [N, ...], got shape {tuple(logits.shape)}")
    if logits.shape != x.shape:
        raise UsageError(f"logits {tuple(logits.shape)} and targets {tuple(x.shape)} differ")
    n = x.shape[0]
    if n == 0:
        raise UsageError("cannot compute a loss on an empty batch")
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
    probs = torch.sigmoid(logits)
    if kind == "mse":
        return F.mse_loss(probs, x, reduction="sum") / n
    return F.l1_loss(probs, x, reduction="sum") / n


def elbo_loss(
    logits: Tensor, x: Tensor, kl: Tensor, kind: str = "bce", beta: float = 1.0, alpha: float = 1.0
) -> LossTerms:
    """Weighted objective and its terms; ``kl`` is the per-sample KL from the model ([N])."""
    if not torch.is_tensor(kl) or kl.dim() != 1 or kl.shape[0] != x.shape[0]:
        raise UsageError(f"kl must be per-sample with shape [{x.shape[0]}], got {tuple(kl.shape)}")
    recon = reconstruction(logits, x, kind)
    kl_mean = kl.mean()
    bce = recon if kind == "bce" else reconstruction(logits.detach(), x, "bce")
    return LossTerms(alpha * recon + beta * kl_mean, recon, kl_mean, (bce + kl_mean).detach())


def gaussian_log_prob_std(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * (z * z + math.log(2 * math.pi)).sum(-1)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim."""
    return -0.5 * (((z - mu) ** 2) * torch.exp(-logvar) + logvar + math.log(2 * math.pi)).sum(-1)

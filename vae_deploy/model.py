"""VAE models: a separate encoder and decoder (each exports alone) and a fused reparameterize step.

Encoder: x [N,C,H,W] in [0,1] -> (mu, logvar) [N,d], through ONE linear head of width 2d.
Decoder: z [N,d] -> x_hat [N,C,H,W] in [0,1]; ``decoder(z)`` is exactly the exported graph and
``decoder.logits(z)`` gives the pre-sigmoid values training uses for a stable BCE.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vae_deploy import model_conv
from vae_deploy.config import ModelConfig

_ACT = model_conv.ACTIVATIONS


# --- fused reparameterize + KL ------------------------------------------------------------------


class _ReparameterizeKL(torch.autograd.Function):
    """z = mu + exp(logvar/2) * eps and kl = 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar) in one op.

    Only the inputs (mu, logvar, eps) are saved; std and the KL summands are recomputed in the
    analytic backward instead of being kept alive by autograd.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        std = logvar.mul(0.5).exp_()
        z = torch.addcmul(mu, std, eps)
        # 0.5 * sum(mu^2 + std^2 - 1 - logvar) as three row reductions, no [N,d] temporaries
        sq = torch.linalg.vector_norm(mu, dim=1).square_()
        sq.add_(torch.linalg.vector_norm(std, dim=1).square_()).sub_(logvar.sum(dim=1))
        kl = sq.sub_(mu.shape[1]).mul_(0.5)
        ctx.save_for_backward(mu, logvar, eps)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_kl: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        mu, logvar, eps = ctx.saved_tensors
        std = logvar.mul(0.5).exp_()
        g = grad_kl.unsqueeze(1)
        grad_mu = torch.addcmul(grad_z, mu, g)
        # d/dlogvar = 0.5 * (grad_z * eps * std + g * (std^2 - 1)) = 0.5 * (std * (grad_z*eps + g*std) - g)
        t = torch.mul(grad_z, eps).addcmul_(std, g).mul_(std)
        grad_logvar = t.sub_(g).mul_(0.5)
        return grad_mu, grad_logvar, None


def reparameterize_kl(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Fused reparameterization: returns (z [N,d], per-sample KL(q(z|x) || N(0,I)) [N])."""
    return _ReparameterizeKL.apply(mu, logvar, eps)


def reparameterize_kl_reference(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """The plain (unfused) formula, for tests and benchmarks."""
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps
    kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar, dim=1)
    return z, kl


# --- encoder / decoder --------------------------------------------------------------------------


def _mlp(sizes: list[int], activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), _ACT[activation]()]
    return layers


def _conv_geometry(cfg: ModelConfig) -> tuple[int, int]:
    """Spatial size after the encoder's stride-2 convs (ceil per layer)."""
    h, w = cfg.image_shape[1:]
    for _ in cfg.conv_channels:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


class Encoder(nn.Module):
    """x [N,C,H,W] -> (mu, logvar), each [N,latent_dim]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        d = cfg.latent_dim
        if cfg.arch == "mlp":
            body = [nn.Flatten(), *_mlp([c * h * w, *cfg.hidden], cfg.activation)]
            features = cfg.hidden[-1]
        elif cfg.arch == "resconv":
            body, features = model_conv.encoder_body(cfg)
        else:
            body, ch_in = [], c
            for ch in cfg.conv_channels:
                body += [nn.Conv2d(ch_in, ch, 3, stride=2, padding=1), _ACT[cfg.activation]()]
                ch_in = ch
            body.append(nn.Flatten())
            gh, gw = _conv_geometry(cfg)
            features = ch_in * gh * gw
        self.body = body if isinstance(body, nn.Sequential) else nn.Sequential(*body)
        self.head = nn.Linear(features, 2 * d)  # one matmul for mu and logvar
        self.latent_dim = d

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """z [N,latent_dim] -> x_hat [N,C,H,W] in [0,1] (``logits`` gives the pre-sigmoid values)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        self.image_shape = (c, h, w)
        d = cfg.latent_dim
        if cfg.arch == "mlp":
            sizes = [d, *reversed(cfg.hidden)]
            self.body = nn.Sequential(*_mlp(sizes, cfg.activation), nn.Linear(sizes[-1], c * h * w))
            self.out_hw: tuple[int, int] | None = None
        elif cfg.arch == "resconv":
            self.body, self.out_hw = model_conv.decoder_body(cfg)
        else:
            gh, gw = _conv_geometry(cfg)
            chans = list(reversed(cfg.conv_channels))
            layers: list[nn.Module] = [
                nn.Linear(d, chans[0] * gh * gw),
                _ACT[cfg.activation](),
                nn.Unflatten(1, (chans[0], gh, gw)),
            ]
            for ch_in, ch_out in zip(chans, chans[1:] + [c]):
                layers.append(nn.ConvTranspose2d(ch_in, ch_out, 3, stride=2, padding=1, output_padding=1))
                if ch_out != c:
                    layers.append(_ACT[cfg.activation]())
            self.body = nn.Sequential(*layers)
            full = (gh * 2 ** len(chans), gw * 2 ** len(chans))
            self.out_hw = (h, w) if full != (h, w) else None  # crop only when the size overshoots

    def logits(self, z: Tensor) -> Tensor:
        y = self.body(z)
        if self.out_hw is None:
            return y if y.dim() == 4 else y.unflatten(1, self.image_shape)
        return y[:, :, : self.out_hw[0], : self.out_hw[1]]

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(z))


# --- the VAE ------------------------------------------------------------------------------------


class VAEOutput(NamedTuple):
    logits: Tensor  # decoder logits [N,C,H,W]
    mu: Tensor
    logvar: Tensor
    z: Tensor
    kl: Tensor  # per-sample KL [N]


class VAE(nn.Module):
    """Encoder + decoder. Training samples z through the fused step; eval uses z = mu."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def forward(self, x: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> VAEOutput:
        """Encode, draw z (sampled in training or when ``sample=True``, else z = mu), decode."""
        mu, logvar = self.encoder(x)
        if self.training if sample is None else sample:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z, kl = reparameterize_kl(mu, logvar, eps)
        else:
            z = mu
            kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return VAEOutput(self.decoder.logits(z), mu, logvar, z, kl)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decode n draws of z ~ N(0, I): images [n,C,H,W] in [0,1]."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction through the posterior mean."""
        mu, _ = self.encoder(x)
        return self.decoder(mu)

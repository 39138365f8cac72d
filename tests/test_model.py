"""Models: shapes, ranges, the split head, eval determinism and the fused reparameterize step."""

from __future__ import annotations

import pytest
import torch

from vae_deploy.config import ModelConfig
from vae_deploy.model import VAE, reparameterize_kl, reparameterize_kl_reference

CONFIGS = {
    "mlp": ModelConfig(arch="mlp", latent_dim=20, hidden=(400,)),
    "mlp-deep-tanh": ModelConfig(arch="mlp", latent_dim=5, hidden=(500, 200), activation="tanh"),
    "conv": ModelConfig(arch="conv", latent_dim=2),
    "conv-crop": ModelConfig(arch="conv", latent_dim=3, conv_channels=(8, 16, 32)),  # 28->4->32, crop
}


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_ranges(name: str) -> None:
    torch.manual_seed(0)
    model = VAE(CONFIGS[name]).eval()
    d = CONFIGS[name].latent_dim
    x = torch.rand(7, 1, 28, 28)
    mu, logvar = model.encoder(x)
    assert mu.shape == logvar.shape == (7, d)
    z = torch.randn(7, d) * 3
    x_hat = model.decoder(z)
    assert x_hat.shape == (7, 1, 28, 28)
    assert x_hat.min() >= 0 and x_hat.max() <= 1
    torch.testing.assert_close(x_hat, torch.sigmoid(model.decoder.logits(z)))
    out = model(x)
    assert out.logits.shape == x.shape and out.kl.shape == (7,)


def test_head_is_one_linear_layer_split_in_two() -> None:
    model = VAE(CONFIGS["mlp"])
    head = model.encoder.head
    assert isinstance(head, torch.nn.Linear) and head.out_features == 40
    x = torch.rand(3, 1, 28, 28)
    mu, logvar = model.encoder(x)
    full = head(model.encoder.body(x))
    torch.testing.assert_close(torch.cat([mu, logvar], 1), full)


def test_eval_mode_is_deterministic_and_uses_mu() -> None:
    model = VAE(CONFIGS["mlp"]).eval()
    x = torch.rand(4, 1, 28, 28)
    a, b = model(x), model(x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.z, a.mu)
    sampled = model(x, sample=True)
    assert not torch.allclose(sampled.z, sampled.mu)


def test_training_mode_samples() -> None:
    model = VAE(CONFIGS["mlp"]).train()
    x = torch.rand(4, 1, 28, 28)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(model(x, generator=g1).z, model(x, generator=g2).z)
    assert not torch.allclose(model(x).z, model(x).mu)


def test_fused_matches_reference_forward() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar, eps = (torch.randn(64, 20, generator=g) for _ in range(3))
    z, kl = reparameterize_kl(mu, logvar, eps)
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(kl, kl_ref)
    # KL of N(0, I) against itself is zero
    _, kl0 = reparameterize_kl(torch.zeros(2, 5), torch.zeros(2, 5), torch.randn(2, 5))
    assert torch.all(kl0 == 0)


def test_fused_gradcheck_double() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, v: reparameterize_kl(m, v, eps), (mu, logvar))
    # analytic backward equals autograd through the plain formula, for weighted z and KL
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    wk = torch.randn(6, generator=g, dtype=torch.float64)
    grads = []
    for fn in (reparameterize_kl, reparameterize_kl_reference):
        z, kl = fn(mu, logvar, eps)
        grads.append(torch.autograd.grad((z * w).sum() + (kl * wk).sum(), (mu, logvar)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_fused_keeps_only_inputs_alive() -> None:
    mu = torch.randn(8, 3, requires_grad=True)
    logvar = torch.randn(8, 3, requires_grad=True)
    eps = torch.randn(8, 3)
    z, _ = reparameterize_kl(mu, logvar, eps)
    saved = z.grad_fn.saved_tensors
    assert len(saved) == 3
    assert all(any(s is t or s.data_ptr() == t.data_ptr() for t in (mu, logvar, eps)) for s in saved)


def test_unknown_arch_is_a_clear_error() -> None:
    from vae_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="arch must be one of"):
        ModelConfig(arch="transformer")
    with pytest.raises(ConfigError, match="latent_dim"):
        ModelConfig(latent_dim=0)

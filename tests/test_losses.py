"""Loss terms against values computed by hand on a tiny example."""

from __future__ import annotations

import math

import pytest
import torch

from vae_deploy.errors import UsageError
from vae_deploy.losses import elbo_loss, gaussian_log_prob, reconstruction


def _tiny():
    # 2 images of 1x1x2 pixels; logits chosen so that probabilities are simple
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 1.0]]]])
    p = torch.tensor([[[[0.8, 0.25]]], [[[0.5, 0.9]]]])
    return x, torch.log(p / (1 - p)), p


def test_bce_by_hand() -> None:
    x, logits, p = _tiny()
    # image 1: -log 0.8 - log 0.75; image 2: -(0.5 log .5 + 0.5 log .5) - log 0.9
    img1 = -math.log(0.8) - math.log(0.75)
    img2 = -math.log(0.5) - math.log(0.9)
    assert reconstruction(logits, x, "bce").item() == pytest.approx((img1 + img2) / 2, rel=1e-5)


def test_mse_and_l1_by_hand() -> None:
    x, logits, p = _tiny()
    mse = ((0.2**2 + 0.25**2) + (0.0 + 0.1**2)) / 2
    l1 = ((0.2 + 0.25) + (0.0 + 0.1)) / 2
    assert reconstruction(logits, x, "mse").item() == pytest.approx(mse, rel=1e-5)
    assert reconstruction(logits, x, "l1").item() == pytest.approx(l1, rel=1e-5)


def test_weights_and_nelbo() -> None:
    x, logits, _ = _tiny()
    kl = torch.tensor([1.0, 3.0])
    t = elbo_loss(logits, x, kl, "mse", beta=0.5, alpha=10.0)
    mse = reconstruction(logits, x, "mse").item()
    assert t.kl.item() == pytest.approx(2.0)
    assert t.loss.item() == pytest.approx(10.0 * mse + 0.5 * 2.0, rel=1e-5)
    # nelbo is always the Bernoulli -ELBO, unweighted
    assert t.nelbo.item() == pytest.approx(reconstruction(logits, x, "bce").item() + 2.0, rel=1e-5)


def test_kl_formula_by_hand() -> None:
    from vae_deploy.model import reparameterize_kl

    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    _, kl = reparameterize_kl(mu, logvar, torch.zeros(1, 2))
    # 0.5 * [(1 + 1 - 1 - 0) + (0 + 2 - 1 - log 2)]
    assert kl.item() == pytest.approx(0.5 * (1 + 1 - math.log(2)), rel=1e-6)


def test_gaussian_log_prob_matches_torch_distributions() -> None:
    z, mu, logvar = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    ref = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(z, mu, logvar), ref)


def test_bad_inputs_are_clear_errors() -> None:
    x, logits, _ = _tiny()
    with pytest.raises(UsageError, match="one of"):
        reconstruction(logits, x, "huber")
    with pytest.raises(UsageError, match="differ"):
        reconstruction(logits[:, :, :, :1], x, "bce")
    with pytest.raises(UsageError, match="per-sample"):
        elbo_loss(logits, x, torch.tensor(1.0))

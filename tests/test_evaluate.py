"""evaluate: the importance weights are the right densities, and IWAE <= -ELBO on a trained model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal

from vae_deploy.checkpoint import save_checkpoint
from vae_deploy.cli import main
from vae_deploy.config import ModelConfig, make_configs
from vae_deploy.data import load_splits
from vae_deploy.errors import CheckpointError, UsageError
from vae_deploy.evaluate import bounds, evaluate, log_weights
from vae_deploy.model import VAE
from vae_deploy.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    """An MLP VAE trained for two epochs on 2,000 real MNIST images (synthetic where absent)."""
    root = pytestconfig.getoption("--data-root") or os.environ.get("VAE_DEPLOY_DATA")
    dataset = "mnist" if root and (Path(root) / "MNIST" / "raw").is_dir() else "synthetic"
    out = tmp_path_factory.mktemp("eval_run")
    model_cfg, train_cfg = make_configs(
        {"arch": "mlp", "latent_dim": 10, "hidden": [128]},
        {
            "dataset": dataset,
            "data_root": root,
            "epochs": 2,
            "batch_size": 64,
            "train_limit": 2000,
            "val_limit": 300,
            "out": str(out),
            "device": "cpu",
        },
    )
    result = train(model_cfg, train_cfg, progress=False, log=lambda _: None)
    x = load_splits(dataset, root, val_limit=300).val_x
    return result, x, dataset, root


def test_log_weights_are_the_model_densities(trained) -> None:
    result, x, _, _ = trained
    model, x, k = result.model, x[:7], 3
    log_w, elbo = log_weights(model, x, k, torch.Generator().manual_seed(5))
    eps = torch.randn((k, 7, model.latent_dim), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
        prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
        z = mu + torch.exp(0.5 * logvar) * eps
        px = Independent(Bernoulli(logits=model.decoder.logits(z.flatten(0, 1)), validate_args=False), 3)
        log_px = px.log_prob(x.repeat(k, 1, 1, 1)).view(k, 7)
        want = log_px + prior.log_prob(z) - q.log_prob(z)
        want_elbo = log_px.mean(0) - torch.distributions.kl_divergence(q, prior)
    torch.testing.assert_close(log_w, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(elbo, want_elbo, rtol=1e-5, atol=1e-3)


def test_iwae_bound_is_tighter_than_the_elbo_and_tightens_with_k(trained) -> None:
    result, x, _, _ = trained
    nll = {}
    for k in (1, 10, 100):
        elbo, iwae = bounds(result.model, x, k=k, seed=0)
        assert elbo.shape == iwae.shape == (len(x),) and torch.isfinite(iwae).all()
        nll[k] = -float(iwae.double().mean())
        if k == 100:
            assert nll[k] < -float(elbo.double().mean()) - 0.5  # -IWAE_100 <= -ELBO, by a clear margin
    assert nll[100] < nll[10] < nll[1]


def test_k1_is_the_elbo_in_expectation(trained) -> None:
    result, x, _, _ = trained
    elbo, iwae = bounds(result.model, x, k=1, seed=3)
    diff = (iwae - elbo).double()  # a single-sample estimate of -KL minus the analytic -KL
    stderr = float(diff.std()) / math.sqrt(len(diff))
    assert abs(float(diff.mean())) < 4 * stderr + 1e-6


def test_evaluate_agrees_with_the_training_log(trained) -> None:
    result, x, dataset, root = trained
    res = evaluate(result.checkpoint, data_root=root, k=20, limit=300, seed=0)
    assert res.dataset == dataset and res.images == len(x) == 300 and res.k == 20
    assert res.iwae_nll < res.nelbo
    assert abs(res.nelbo - result.history[-1]["val_nelbo"]) < 1.5  # same -ELBO, different noise
    again = evaluate(result.checkpoint.parent, data_root=root, k=20, limit=300, seed=0)
    assert (again.nelbo, again.iwae_nll) == (res.nelbo, res.iwae_nll)
    assert f"k=20) {res.iwae_nll:.2f} nats/image" in res.summary()


def test_binarize_defaults_to_the_training_setting(tmp_path: Path) -> None:
    model_cfg, train_cfg = make_configs(
        {"arch": "mlp", "latent_dim": 4, "hidden": [32]},
        {"dataset": "synthetic", "binarize": True, "max_steps": 2, "out": str(tmp_path)},
    )
    ckpt = train(model_cfg, train_cfg, progress=False, log=lambda _: None).checkpoint
    assert evaluate(ckpt, k=2, limit=20).binarized
    assert not evaluate(ckpt, k=2, limit=20, binarize=False).binarized


def test_cli_prints_one_line_and_writes_json(trained, tmp_path: Path, capsys) -> None:
    result, _, dataset, root = trained
    out = tmp_path / "eval.json"
    args = ["evaluate", str(result.checkpoint), "--k", "5", "--limit", "50", "--json", str(out)]
    assert main(args + (["--data-root", str(root)] if root else [])) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "IWAE NLL bound (k=5)" in line and "50 images" in line
    data = json.loads(out.read_text())
    assert data["k"] == 5 and data["images"] == 50 and data["dataset"] == dataset
    assert data["iwae_nll"] < data["nelbo"]


def test_bad_input_is_a_clear_error(trained, tmp_path: Path, capsys) -> None:
    result, x, _, root = trained
    with pytest.raises(UsageError, match="positive"):
        bounds(result.model, x, k=0)
    with pytest.raises(CheckpointError, match="not found"):
        evaluate(tmp_path / "nope.pt")
    small = save_checkpoint(tmp_path / "s.pt", VAE(ModelConfig(hidden=(8,), image_shape=(1, 8, 8))))
    assert evaluate(small, dataset="synthetic", k=1, limit=5).images == 5  # made in the model's shape
    if root:
        with pytest.raises(UsageError, match="shape"):
            evaluate(small, dataset="mnist", data_root=root, k=1, limit=5)
    assert main(["evaluate", str(result.checkpoint), "--k", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: k (importance samples)")

"""Recipes in train/: each reproduces its reference setup, parses into configs, and trains."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from vae_deploy.checkpoint import load_checkpoint, read_checkpoint
from vae_deploy.cli import main
from vae_deploy.config import load_recipe, make_configs
from vae_deploy.data import load_splits

RECIPES = Path(__file__).resolve().parent.parent / "train"

# The reference setup each recipe must reproduce: (model fields, train fields).
REFERENCE = {
    "mlp200_bce": (
        {"arch": "mlp", "hidden": (200,), "latent_dim": 20, "activation": "relu"},
        {"loss": "bce", "lr": 3e-4, "batch_size": 32, "epochs": 10, "beta": 1.0, "alpha": 1.0},
    ),
    "conv2d_mse": (
        {"arch": "conv", "latent_dim": 2},
        {"loss": "mse", "lr": 5e-4, "batch_size": 256, "epochs": 50},
    ),
    "mlp400_beta": (
        {"arch": "mlp", "hidden": (400,), "latent_dim": 20},
        {"loss": "bce", "lr": 1e-3, "batch_size": 128, "beta": 1.0},
    ),
    "mlp500_tanh_binary": (
        {"arch": "mlp", "hidden": (500,), "latent_dim": 5, "activation": "tanh"},
        {"loss": "bce", "binarize": True, "decoder_weight_decay": 0.01, "weight_decay": 0.0},
    ),
    "mlp256": (
        {"arch": "mlp", "hidden": (256,), "latent_dim": 10},
        {"lr": 1e-3, "batch_size": 128, "epochs": 15, "loss": "bce"},
    ),
    "fashion_mnist": ({}, {"dataset": "fashion-mnist"}),
    "cifar10_conv": (
        {"arch": "resconv", "image_shape": (3, 32, 32), "conv_channels": (64, 128, 256), "res_blocks": 2},
        {"dataset": "cifar10", "loss": "bce", "lr": 5e-4},
    ),
    "celeba64_conv": (
        {"arch": "resconv", "image_shape": (3, 64, 64), "conv_channels": (32, 64, 128, 256), "latent_dim": 128},
        {"dataset": "celeba", "loss": "bce", "batch_size": 128},
    ),
    "folder64_conv": (
        {"arch": "resconv", "image_shape": (3, 64, 64), "activation": "silu"},
        {"dataset": "folder"},
    ),
    "digits_conv": (
        {"arch": "resconv", "image_shape": (1, 8, 8), "latent_dim": 8},
        {"dataset": "digits", "loss": "bce"},
    ),
}
HEAVY = (1, 2, 2)  # the 32x32 and 64x64 conv recipes take 1 step of 2 images here (2 to validate)


def _mnist_root(config: pytest.Config) -> str | None:
    root = config.getoption("--data-root") or os.environ.get("VAE_DEPLOY_DATA")
    return root if root and (Path(root) / "MNIST" / "raw").is_dir() else None


def test_one_recipe_per_reference_setup() -> None:
    assert sorted(p.stem for p in RECIPES.glob("*.toml")) == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_recipe_matches_its_reference(name: str) -> None:
    path = RECIPES / f"{name}.toml"
    assert path.read_text().startswith("# Reproduces "), f"{path}: first line must say what it reproduces"
    model_cfg, train_cfg = make_configs(*load_recipe(path))
    want_model, want_train = REFERENCE[name]
    for key, value in want_model.items():
        assert getattr(model_cfg, key) == value, (name, key)
    for key, value in want_train.items():
        assert getattr(train_cfg, key) == pytest.approx(value), (name, key)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_recipe_trains_a_few_steps(name: str, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """Each recipe trains unchanged (real MNIST slice or digits where present; synthetic data in the
    model's shape for datasets not here)."""
    model_raw, train_raw = load_recipe(RECIPES / f"{name}.toml")
    root = _mnist_root(pytestconfig)
    dataset = "mnist" if root and train_raw["dataset"] == "mnist" else "synthetic"
    dataset = "digits" if train_raw["dataset"] == "digits" else dataset
    steps, batch, val = HEAVY if model_raw.get("image_shape", [1])[-1] >= 32 else (5, train_raw["batch_size"], 200)
    train_raw.update(dataset=dataset, data_root=root, max_steps=steps, epochs=1, out=str(tmp_path / name))
    train_raw.update(device="cpu", batch_size=batch)
    model_cfg, train_cfg = make_configs(model_raw, train_raw)
    from vae_deploy.training import train

    splits = load_splits(
        dataset,
        root,
        binarize=train_cfg.binarize,
        train_limit=steps * batch,
        val_limit=val,
        image_shape=model_cfg.image_shape,
    )
    result = train(model_cfg, train_cfg, progress=False, log=lambda _: None, splits=splits)
    row = result.history[-1]
    assert row["step"] == steps
    for key in ("train_loss", "val_loss", "val_recon", "val_kl", "val_nelbo"):
        assert math.isfinite(row[key]), (name, key)
    state = read_checkpoint(result.checkpoint)
    assert state["train_config"]["binarize"] == train_cfg.binarize
    assert load_checkpoint(result.checkpoint).config == model_cfg


def test_binarized_recipe_trains_on_binary_pixels(pytestconfig: pytest.Config) -> None:
    _, train_raw = load_recipe(RECIPES / "mlp500_tanh_binary.toml")
    root = _mnist_root(pytestconfig)
    splits = load_splits("mnist" if root else "synthetic", root, binarize=train_raw["binarize"], val_limit=50)
    assert set(splits.val_x.unique().tolist()) <= {0.0, 1.0}


def test_cli_trains_from_a_recipe_with_overrides(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--recipe",
            str(RECIPES / "fashion_mnist.toml"),
            "--dataset",
            "synthetic",
            "--max-steps",
            "3",
            "--train-limit",
            "256",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["model_config"]["arch"] == "conv" and state["model_config"]["latent_dim"] == 16
    assert state["train_config"]["dataset"] == "synthetic" and state["step"] == 3

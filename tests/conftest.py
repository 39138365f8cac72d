"""Shared fixtures: the real-MNIST data root (skip cleanly where absent) and small trained models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--data-root", default=None, help="torchvision-style data root with MNIST/raw")


# Relative data roots are resolved once, here: a test that changes the working folder must not
# make later tests (or the subprocesses they start) lose the data.
if os.environ.get("VAE_DEPLOY_DATA"):
    os.environ["VAE_DEPLOY_DATA"] = str(Path(os.environ["VAE_DEPLOY_DATA"]).resolve())


def _data_root(config: pytest.Config) -> Path | None:
    root = config.getoption("--data-root") or os.environ.get("VAE_DEPLOY_DATA")
    if not root:
        return None
    root = Path(root).resolve()
    return root if (root / "MNIST" / "raw").is_dir() else None


@pytest.fixture(scope="session", autouse=True)
def plan_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests (and the processes they start) never read or write the user's tuned-plan cache: an
    empty cache of their own means every runtime without an explicit plan uses the fixed default."""
    from vae_deploy.plans import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    folder = tmp_path_factory.mktemp("plan-cache")
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="session")
def data_root(pytestconfig: pytest.Config) -> Path:
    """The MNIST data root from --data-root or $VAE_DEPLOY_DATA; the test skips if there is none."""
    root = _data_root(pytestconfig)
    if root is None:
        pytest.skip("real MNIST not available: pass --data-root or set VAE_DEPLOY_DATA")
    return root


@pytest.fixture(scope="session")
def mnist_splits(data_root: Path):
    from vae_deploy.data import load_splits

    return load_splits("mnist", data_root)


def _train_small(tmp: Path, arch: str, latent: int, splits=None, dataset: str = "synthetic"):
    from vae_deploy.config import make_configs
    from vae_deploy.training import train

    model_cfg, train_cfg = make_configs(
        {"arch": arch, "latent_dim": latent, "hidden": [64], "conv_channels": [8, 16]},
        {"dataset": dataset, "epochs": 1, "batch_size": 64, "max_steps": 20, "out": str(tmp)},
    )
    return train(model_cfg, train_cfg, progress=False, log=lambda _: None, splits=splits)


@pytest.fixture(scope="session")
def mlp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MLP VAE (latent 8) trained for a few steps on synthetic data: its checkpoint path."""
    return _train_small(tmp_path_factory.mktemp("mlp_run"), "mlp", 8).checkpoint


@pytest.fixture(scope="session")
def conv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conv VAE (latent 2) trained for a few steps on synthetic data: its checkpoint path."""
    return _train_small(tmp_path_factory.mktemp("conv_run"), "conv", 2).checkpoint


def rehash(export_dir: Path, name: str) -> None:
    """Make the manifest agree with a (tampered) file, as an attacker who edits both would."""
    import json

    from vae_deploy.contract import MANIFEST
    from vae_deploy.files import sha256_file

    manifest = json.loads((export_dir / MANIFEST).read_text())
    for formats in manifest["graphs"].values():
        for entry in formats.values():
            if entry["file"] == name:
                entry["sha256"] = sha256_file(export_dir / name)
    (export_dir / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="session")
def mlp_onnx_export(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX-only export (with the fp16 decoder) of the small MLP, not verified: for runtime tests."""
    from vae_deploy.export import export

    out = tmp_path_factory.mktemp("onnx_export") / "exported"
    return export(mlp_checkpoint, out, formats=("onnx",), fp16=True, verify=False, log=lambda _: None).out_dir

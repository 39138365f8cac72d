"""Training: real MNIST lowers the validation loss; determinism; checkpoint round trip; CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vae_deploy.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from vae_deploy.cli import main
from vae_deploy.config import make_configs
from vae_deploy.errors import CheckpointError, UsageError
from vae_deploy.training import train


def _cfg(out: Path, **train_kw):
    kw = {"dataset": "synthetic", "epochs": 1, "batch_size": 64, "lr": 1e-3, "out": str(out)}
    kw.update(train_kw)
    return make_configs({"arch": "mlp", "latent_dim": 8, "hidden": [64]}, kw)


def test_real_mnist_validation_loss_falls(tmp_path: Path, mnist_splits) -> None:
    from vae_deploy.data import Splits

    s = mnist_splits
    small = Splits(s.train_x[:2000], s.train_y[:2000], s.val_x[:500], s.val_y[:500], s.note)
    mc, tc = make_configs(
        {"arch": "mlp", "latent_dim": 10, "hidden": [128]},
        {"dataset": "mnist", "epochs": 3, "batch_size": 64, "lr": 1e-3, "out": str(tmp_path)},
    )
    result = train(mc, tc, progress=False, log=lambda _: None, splits=small)
    val = [h["val_loss"] for h in result.history]
    assert val[0] > val[1] > val[2]
    assert val[-1] < 300  # far below the ~543 nats of an untrained Bernoulli decoder at p=0.5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"epoch", "train_loss", "val_loss", "val_recon", "val_kl", "val_nelbo"} <= set(rows[0])


def test_same_seed_gives_bit_identical_weights(tmp_path: Path) -> None:
    a = train(*_cfg(tmp_path / "a", max_steps=15), progress=False, log=lambda _: None).model
    b = train(*_cfg(tmp_path / "b", max_steps=15), progress=False, log=lambda _: None).model
    c = train(*_cfg(tmp_path / "c", max_steps=15, seed=1), progress=False, log=lambda _: None).model
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.decoder.body[0].weight, c.decoder.body[0].weight)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = train(*_cfg(tmp_path / "full", epochs=3), progress=False, log=lambda _: None).model
    train(*_cfg(tmp_path / "part", epochs=3, max_steps=40), progress=False, log=lambda _: None)
    resumed = train(*_cfg(tmp_path / "part", epochs=3), resume=True, progress=False, log=lambda _: None)
    for (k, va), vb in zip(full.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert len(resumed.history) >= 3


def test_checkpoint_round_trip(tmp_path: Path, mlp_checkpoint: Path) -> None:
    model = load_checkpoint(mlp_checkpoint)
    assert not model.training
    z = torch.randn(5, model.latent_dim)
    path = save_checkpoint(tmp_path / "copy.pt", model)
    again = load_checkpoint(path)
    torch.testing.assert_close(model.decoder(z), again.decoder(z), rtol=0, atol=0)
    state = read_checkpoint(mlp_checkpoint)
    assert state["optimizer"] is not None and state["train_config"]["dataset"] == "synthetic"
    assert "eps_gen_state" in state["extra"]


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vae-deploy checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    train(*_cfg(tmp_path, max_steps=2), progress=False, log=lambda _: None)
    with pytest.raises(UsageError, match="--resume"):
        train(*_cfg(tmp_path, max_steps=2), progress=False, log=lambda _: None)


def test_cli_train_end_to_end(tmp_path: Path, data_root: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            "mnist",
            "--data-root",
            str(data_root),
            "--arch",
            "mlp",
            "--latent-dim",
            "4",
            "--hidden",
            "32",
            "--epochs",
            "2",
            "--train-limit",
            "512",
            "--batch-size",
            "64",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "9,000 train / 1,000 validation" in text and "epoch 2/2" in text
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert load_checkpoint(out / "checkpoint.pt").latent_dim == 4


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mnist not found") and "\n" not in err
    assert main(["train", "--epochs", "0", "--dataset", "synthetic", "--out", str(tmp_path / "r")]) == 2
    assert "epochs must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--arch", "rnn"]) == 2
    assert main(["train", "--recipe", str(tmp_path / "missing.toml")]) == 2

"""Faults and untrusted files on the training side: pickles that run code, SIGKILL, Ctrl-C, NaN."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vae_deploy.checkpoint import load_checkpoint, read_checkpoint
from vae_deploy.config import make_configs
from vae_deploy.errors import CheckpointError, TrainingDiverged, UsageError
from vae_deploy.files import sha256_file
from vae_deploy.losses import elbo_loss, reconstruction
from vae_deploy.training import train


class _Evil:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "vae-deploy-checkpoint", "state_dict": _Evil(str(marker))}
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    # sanity: the file really would run code if loaded unsafely
    control = tmp_path / "control.pt"
    torch.save({"x": _Evil(str(tmp_path / "control-ran"))}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-ran").exists()
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_safetensors_weights_round_trip(mlp_checkpoint: Path) -> None:
    st_path = mlp_checkpoint.parent / "model.safetensors"
    assert st_path.is_file()
    a, b = load_checkpoint(mlp_checkpoint), load_checkpoint(st_path)
    z = torch.randn(4, a.latent_dim)
    assert torch.equal(a.decoder(z), b.decoder(z))
    assert b.config == a.config
    assert b"pickle" not in st_path.read_bytes()[:64]


def test_garbage_safetensors_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(bad)


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vae_deploy.cli",
        "train",
        "--dataset",
        "synthetic",
        "--arch",
        "mlp",
        "--latent-dim",
        "4",
        "--hidden",
        "32",
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--seed",
        "3",
        "--checkpoint-every",
        "7",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for(path: Path, proc: subprocess.Popen, min_step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be interrupted (rc {proc.returncode})")
        if path.is_file():
            try:
                if read_checkpoint(path)["step"] >= min_step:
                    return
            except CheckpointError:
                pass
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("full")
    subprocess.run(_train_cmd(out), check=True, env=_env(), capture_output=True)
    return read_checkpoint(out / "checkpoint.pt")["state_dict"]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_keeps_checkpoint_and_resume_is_bit_identical(tmp_path: Path, uninterrupted) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(out / "checkpoint.pt", proc, min_step=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_checkpoint(out / "checkpoint.pt")  # intact: loads and is a real checkpoint
    assert 0 < state["step"] < 750
    done = subprocess.run(_train_cmd(out, "--resume"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout
    _assert_same(read_checkpoint(out / "checkpoint.pt")["state_dict"], uninterrupted)


def test_ctrl_c_saves_and_resumes(tmp_path: Path, uninterrupted) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoint.pt", proc, min_step=20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    before = read_checkpoint(out / "checkpoint.pt")["step"]
    assert before >= 20
    done = subprocess.run(_train_cmd(out, "--resume"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _assert_same(read_checkpoint(out / "checkpoint.pt")["state_dict"], uninterrupted)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    model_kw = {"arch": "mlp", "latent_dim": 4, "hidden": [32]}
    kw = {"dataset": "synthetic", "epochs": 1, "batch_size": 32, "out": str(tmp_path), "max_steps": 5}
    train(*make_configs(model_kw, kw), progress=False, log=lambda _: None)
    digest = sha256_file(tmp_path / "checkpoint.pt")
    kw.update(epochs=50, lr=1e30, max_steps=None)
    with pytest.raises(TrainingDiverged, match="last good checkpoint kept"):
        train(*make_configs(model_kw, kw), resume=True, progress=False, log=lambda _: None)
    assert sha256_file(tmp_path / "checkpoint.pt") == digest
    load_checkpoint(tmp_path / "checkpoint.pt")


_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])


@settings(max_examples=60, deadline=None)
@given(
    shape_a=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    shape_b=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    dtype=_DTYPES,
    kind=st.sampled_from(["bce", "mse", "l1", "huber", ""]),
    fill=st.floats(allow_nan=True, allow_infinity=True, width=32),
)
def test_loss_property_correct_or_documented_error(shape_a, shape_b, dtype, kind, fill) -> None:
    logits = torch.full(shape_a, fill).to(dtype) if dtype != torch.bool else torch.zeros(shape_a, dtype=dtype)
    x = torch.rand(shape_b).to(dtype) if dtype.is_floating_point else torch.zeros(shape_b, dtype=dtype)
    try:
        r = reconstruction(logits, x, kind)
    except UsageError:
        return
    # a result only for valid input, and then it matches the definition
    assert kind in ("bce", "mse", "l1") and logits.shape == x.shape and x.shape[0] > 0
    n = x.shape[0]
    if kind == "bce":
        ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
    else:
        p = torch.sigmoid(logits)
        ref = ((p - x) ** 2 if kind == "mse" else (p - x).abs()).sum() / n
    torch.testing.assert_close(r, ref, equal_nan=True)
    kl = torch.zeros(n, dtype=x.dtype)
    terms = elbo_loss(logits, x, kl, kind, beta=2.0, alpha=0.5)
    torch.testing.assert_close(terms.loss, 0.5 * r, equal_nan=True)

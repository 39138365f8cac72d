"""Data: the IDX reader, the t10k-only split, binarization, and clear errors."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from vae_deploy.data import load_splits, read_idx, synthetic
from vae_deploy.errors import DataError


def test_real_mnist_t10k_split(data_root: Path) -> None:
    s = load_splits("mnist", data_root)
    assert s.train_x.shape == (9000, 1, 28, 28) and s.val_x.shape == (1000, 1, 28, 28)
    assert s.train_x.dtype == torch.float32 and 0 <= s.train_x.min() and s.train_x.max() <= 1
    assert "9,000 train / 1,000 validation" in s.note
    assert set(s.train_y.unique().tolist()) == set(range(10))
    # deterministic and disjoint: same split twice, and no image index used twice
    again = load_splits("mnist", data_root)
    assert torch.equal(s.val_x, again.val_x)
    raw = read_idx(data_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")
    digest = {hashlib.md5(img.tobytes()).hexdigest() for img in raw}
    assert len(digest) > 9900  # MNIST has almost no exact duplicates
    tr = {hashlib.md5((x * 255).round().byte().numpy().tobytes()).hexdigest() for x in s.train_x[:500]}
    va = {hashlib.md5((x * 255).round().byte().numpy().tobytes()).hexdigest() for x in s.val_x}
    assert not tr & va


def test_binarize_and_limits(data_root: Path) -> None:
    s = load_splits("mnist", data_root, binarize=True, train_limit=100, val_limit=10)
    assert len(s.train_x) == 100 and len(s.val_x) == 10
    assert set(s.train_x.unique().tolist()) <= {0.0, 1.0}


def test_idx_reader_plain_and_truncated(tmp_path: Path) -> None:
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    body = bytes(range(12))
    (tmp_path / "ok").write_bytes(header + body)
    with gzip.open(tmp_path / "ok.gz", "wb") as f:
        f.write(header + body)
    assert read_idx(tmp_path / "ok").shape == (2, 2, 3)
    assert (read_idx(tmp_path / "ok.gz") == read_idx(tmp_path / "ok")).all()
    (tmp_path / "short").write_bytes(header + body[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04" + body)
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")


def test_missing_dataset_says_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match=r"MNIST/raw/t10k-images-idx3-ubyte.*--download"):
        load_splits("mnist", tmp_path)
    monkeypatch.delenv("VAE_DEPLOY_DATA", raising=False)
    with pytest.raises(DataError, match="VAE_DEPLOY_DATA"):
        load_splits("fashion-mnist", None)


def test_synthetic_is_deterministic() -> None:
    a, la = synthetic(50, seed=3)
    b, lb = synthetic(50, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (50, 1, 28, 28) and a.min() >= 0 and a.max() <= 1

"""Inference views: the model-source adapter, the latent-space helpers, and every view's PNG + CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_deploy import viz
from vae_deploy.checkpoint import load_checkpoint, save_checkpoint
from vae_deploy.cli import main
from vae_deploy.config import ModelConfig
from vae_deploy.errors import CheckpointError, MissingExtraError, UsageError
from vae_deploy.model import VAE


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temp files left behind"


@pytest.fixture(scope="module")
def mlp_source(mlp_checkpoint: Path) -> viz.Source:
    return viz.load_source(mlp_checkpoint)


@pytest.fixture(scope="module")
def conv_source(conv_checkpoint: Path) -> viz.Source:
    return viz.load_source(conv_checkpoint.parent)  # a run folder works too


@pytest.fixture(scope="module")
def mlp_export(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vae_deploy.export import export

    out = tmp_path_factory.mktemp("views") / "mlp_export"
    return export(mlp_checkpoint, out, formats=("onnx",), verify=False, log=lambda _: None).out_dir


# --- the source adapter -------------------------------------------------------------------------


def test_checkpoint_source_matches_the_eager_model(mlp_checkpoint: Path, mlp_source: viz.Source) -> None:
    model = load_checkpoint(mlp_checkpoint)
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    mu, logvar = mlp_source.encode(x)
    with torch.no_grad():
        want_mu, want_logvar = model.encoder(torch.from_numpy(x))
        want_x = model.decoder(want_mu)
    np.testing.assert_allclose(mu, want_mu.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logvar, want_logvar.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mlp_source.decode(mu), want_x.numpy(), rtol=1e-6, atol=1e-6)
    assert (mlp_source.latent_dim, mlp_source.image_shape) == (8, (1, 28, 28))
    assert mlp_source.kind == "checkpoint" and mlp_source.dataset == "synthetic"


def test_export_source_runs_on_onnxruntime_and_agrees(mlp_export: Path, mlp_source: viz.Source) -> None:
    source = viz.load_source(mlp_export, provider="cpu")
    assert source.kind == "export" and source.latent_dim == mlp_source.latent_dim
    x = np.random.default_rng(1).random((6, 1, 28, 28), dtype=np.float32)
    mu, logvar = source.encode(x)
    ref_mu, ref_logvar = mlp_source.encode(x)
    np.testing.assert_allclose(mu, ref_mu, atol=1e-4)
    np.testing.assert_allclose(logvar, ref_logvar, atol=1e-4)
    np.testing.assert_allclose(source.decode(mu), mlp_source.decode(mu), atol=1e-4)


def test_load_source_rejects_what_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such model"):
        viz.load_source(tmp_path / "missing")
    with pytest.raises(UsageError, match="manifest.json"):
        viz.load_source(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        viz.load_source(junk)


def test_dataset_must_fit_the_model(tmp_path: Path, data_root: Path) -> None:
    cfg = ModelConfig(arch="mlp", latent_dim=2, hidden=(16,), image_shape=(1, 16, 16))
    path = save_checkpoint(tmp_path / "small.pt", VAE(cfg))
    with pytest.raises(UsageError, match=r"\(1, 16, 16\).*\(1, 28, 28\)"):
        viz.reconstruct(viz.load_source(path), tmp_path / "r.png", dataset="mnist", data_root=data_root)
    assert not (tmp_path / "r.png").exists()
    # synthetic (plumbing) data is made in the model's own shape
    assert _png(viz.reconstruct(viz.load_source(path), tmp_path / "s.png", dataset="synthetic", n=2))


# --- latent-space helpers -----------------------------------------------------------------------


def test_lerp_is_the_straight_line_with_both_ends() -> None:
    a, b = np.array([1.0, -2.0, 0.5], np.float32), np.array([3.0, 2.0, -0.5], np.float32)
    path = viz.lerp(a, b, 5)
    assert path.shape == (5, 3) and path.dtype == np.float32
    np.testing.assert_array_equal(path[0], a)
    np.testing.assert_array_equal(path[-1], b)
    np.testing.assert_allclose(np.diff(path, axis=0), np.tile((b - a) / 4, (4, 1)), atol=1e-6)


def test_slerp_follows_the_great_circle() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(16).astype(np.float32), 2 * rng.standard_normal(16).astype(np.float32)
    path = viz.slerp(a, b, 9)
    np.testing.assert_allclose(path[0], a, atol=1e-5)
    np.testing.assert_allclose(path[-1], b, atol=1e-5)
    norms = np.linalg.norm(path, axis=1)
    np.testing.assert_allclose(norms, np.linspace(norms[0], norms[-1], 9), rtol=1e-5)
    unit = path / norms[:, None]
    steps = np.arccos(np.clip(np.sum(unit[1:] * unit[:-1], axis=1), -1, 1))
    np.testing.assert_allclose(steps, steps[0], atol=1e-4)  # constant angular speed
    # it leaves the straight line (unlike lerp) but stays in the plane of a and b
    assert np.abs(path[4] - viz.lerp(a, b, 9)[4]).max() > 1e-2
    basis, _ = np.linalg.qr(np.stack([a, b], axis=1))
    np.testing.assert_allclose(basis @ (basis.T @ path.T), path.T, atol=1e-4)


def test_slerp_falls_back_to_lerp_when_undefined() -> None:
    a = np.array([1.0, 2.0], np.float32)
    np.testing.assert_allclose(viz.slerp(a, 3 * a, 4), viz.lerp(a, 3 * a, 4), atol=1e-6)
    np.testing.assert_allclose(viz.slerp(np.zeros(2, np.float32), a, 4), viz.lerp(np.zeros(2), a, 4))


def test_posterior_draws_follow_the_posterior() -> None:
    mu, logvar = np.array([1.0, -3.0], np.float32), np.log(np.array([0.25, 4.0], np.float32))
    z = viz.posterior_draws(mu, logvar, 20000, np.random.default_rng(0))
    assert z.shape == (20000, 2)
    np.testing.assert_allclose(z.mean(0), mu, atol=0.05)
    np.testing.assert_allclose(z.std(0), [0.5, 2.0], rtol=0.03)
    again = viz.posterior_draws(mu, logvar, 5, np.random.default_rng(7))
    np.testing.assert_array_equal(again, viz.posterior_draws(mu, logvar, 5, np.random.default_rng(7)))


def test_manifold_covers_the_prior_quantiles_row_major() -> None:
    z, q = viz.manifold_latents(5)
    assert z.shape == (25, 2)
    np.testing.assert_allclose(q[[0, -1]], [-1.6449, 1.6449], atol=1e-3)
    np.testing.assert_allclose(q, -q[::-1], atol=1e-6)
    np.testing.assert_allclose(z[:5, 0], q)  # first row: z1 increases left to right ...
    assert np.all(z[:5, 1] == q[-1]) and np.all(z[-5:, 1] == q[0])  # ... z2 decreases downwards


def test_embed_2d_uses_the_means_pca_or_tsne() -> None:
    rng = np.random.default_rng(0)
    mu2 = rng.standard_normal((50, 2)).astype(np.float32)
    xy, how = viz.embed_2d(mu2, "tsne")
    assert how == "z"
    np.testing.assert_array_equal(xy, mu2)
    # 5-D points on a plane: PCA keeps every pairwise distance, the larger spread first
    mu5 = np.zeros((200, 5), np.float32)
    mu5[:, 1], mu5[:, 3] = 3 * rng.standard_normal(200), rng.standard_normal(200)
    xy, how = viz.embed_2d(mu5, "pca")
    assert how == "PCA" and xy.shape == (200, 2)
    dist = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dist(xy), dist(mu5), atol=1e-4)
    assert xy[:, 0].var() > 5 * xy[:, 1].var()
    xy, how = viz.embed_2d(mu5[:60], "tsne")
    assert how == "t-SNE" and xy.shape == (60, 2) and np.isfinite(xy).all()
    with pytest.raises(UsageError, match="method"):
        viz.embed_2d(mu5, "umap")


def test_pairs_and_class_picks() -> None:
    labels = np.array([3, 3, 1, 0, 1, 3, 2, 0])
    for seed in range(10):
        i, j = viz.pick_pair(labels, seed)
        assert labels[i] != labels[j]
        assert (i, j) == viz.pick_pair(labels, seed)
        classes, picks = viz.one_per_class(labels, np.random.default_rng(seed))
        assert classes == [0, 1, 2, 3] and [labels[k] for k in picks] == classes
    i, j = viz.pick_pair(np.zeros(4, int), 0)  # unlabelled data: two different images
    assert i != j and {i, j} <= set(range(4))
    with pytest.raises(UsageError, match="one image"):
        viz.pick_pair(np.zeros(1, int), 0)


# --- the views ----------------------------------------------------------------------------------


def test_reconstruct_writes_a_png_and_depends_on_the_seed(mlp_source: viz.Source, tmp_path: Path) -> None:
    a = viz.reconstruct(mlp_source, tmp_path / "a.png", n=6, seed=0)
    b = viz.reconstruct(mlp_source, tmp_path / "b.png", n=6, seed=0)
    c = viz.reconstruct(mlp_source, tmp_path / "c.png", n=6, seed=1)
    w, h = _png(a)
    assert w > h > 100
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    _no_temp_files(tmp_path)


def test_interpolate_slerp_adds_a_row(conv_source: viz.Source, tmp_path: Path) -> None:
    _, h1 = _png(viz.interpolate(conv_source, tmp_path / "lin.png", steps=6))
    w2, h2 = _png(viz.interpolate(conv_source, tmp_path / "both.png", steps=6, slerp_row=True))
    assert h2 > h1
    w3, _ = _png(viz.interpolate(conv_source, tmp_path / "long.png", steps=12, indices=(0, 5)))
    assert w3 > w2
    with pytest.raises(UsageError, match="out of range"):
        viz.interpolate(conv_source, tmp_path / "x.png", indices=(0, 10**6))
    with pytest.raises(UsageError, match="steps"):
        viz.interpolate(conv_source, tmp_path / "x.png", steps=1)


def test_vary_draws_one_row_per_class(mlp_source: viz.Source, tmp_path: Path) -> None:
    w, h = _png(viz.vary(mlp_source, tmp_path / "v.png", n=3, seed=0))
    assert h > w  # ten class rows, four columns
    w5, _ = _png(viz.vary(mlp_source, tmp_path / "v5.png", n=6, seed=0))
    assert w5 > w


def test_latent_map_adds_the_manifold_for_2d_latents(
    conv_source: viz.Source, mlp_source: viz.Source, tmp_path: Path
) -> None:
    w2, _ = _png(viz.latent_map(conv_source, tmp_path / "conv.png", limit=200, grid=8))
    w8, _ = _png(viz.latent_map(mlp_source, tmp_path / "mlp.png", method="pca", limit=200))
    assert w2 > 1.5 * w8  # two panels against one
    with pytest.raises(UsageError, match="method"):
        viz.latent_map(mlp_source, tmp_path / "x.png", method="umap")


def test_curves_from_a_run_folder(mlp_checkpoint: Path, tmp_path: Path) -> None:
    run = mlp_checkpoint.parent
    w, h = _png(viz.curves(run, tmp_path / "c.png"))
    assert w > 2 * h
    assert len(viz.read_metrics(run / "metrics.jsonl")) == len(viz.read_metrics(run))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(UsageError, match="no metrics"):
        viz.curves(bad, tmp_path / "x.png")
    (bad / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_loss": 1.0}) + "\n{oops\n")
    with pytest.raises(UsageError, match=r"metrics.jsonl:2"):
        viz.read_metrics(bad)


def test_out_must_be_a_png_and_is_checked_first(mlp_source: viz.Source, mlp_checkpoint: Path, tmp_path: Path) -> None:
    # the data root does not exist: the .png check must come before any data is read
    with pytest.raises(UsageError, match=r"\.png"):
        viz.reconstruct(mlp_source, tmp_path / "x.jpg", dataset="mnist", data_root=tmp_path / "nowhere")
    folder = tmp_path / "d.png"
    folder.mkdir()
    with pytest.raises(UsageError, match="folder"):
        viz.curves(mlp_checkpoint.parent, folder)


def test_missing_matplotlib_says_how_to_install(
    mlp_source: viz.Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "vae-deploy\[viz\]"'):
        viz.reconstruct(mlp_source, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(MissingExtraError, match="--method pca"):
        viz.embed_2d(np.zeros((10, 3), np.float32), "tsne")


# --- CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["reconstruct", "-n", "4"],
        ["interpolate", "--steps", "5", "--slerp", "--indices", "3,7"],
        ["vary", "-n", "2"],
        ["latent-map", "--limit", "100", "--grid", "6"],
    ],
)
def test_view_commands_write_pngs(command: list[str], conv_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "view.png"
    assert main([command[0], str(conv_checkpoint), *command[1:], "--seed", "3", "--out", str(out)]) == 0
    assert min(_png(out)) > 50


def test_view_command_on_an_export_folder(mlp_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec.png"
    args = ["reconstruct", str(mlp_export), "--dataset", "synthetic", "--provider", "cpu", "--out", str(out)]
    assert main(args) == 0
    assert min(_png(out)) > 50


def test_curves_command(mlp_checkpoint: Path, tmp_path: Path) -> None:
    assert main(["curves", str(mlp_checkpoint.parent), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["reconstruct", "{missing}", "--out", "{tmp}/a.png"], 2, "no such model"),
        (["reconstruct", "{ckpt}", "--out", "{tmp}/a.jpg"], 2, ".png"),
        (["interpolate", "{ckpt}", "--indices", "4", "--out", "{tmp}/a.png"], 2, "two validation indices"),
        (["latent-map", "{ckpt}", "--method", "umap", "--out", "{tmp}/a.png"], 2, "umap"),
        (["curves", "{tmp}", "--out", "{tmp}/a.png"], 2, "no metrics"),
    ],
)
def test_view_errors_are_one_line(
    args: list[str], code: int, message: str, mlp_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    fill = {"missing": tmp_path / "nope", "ckpt": mlp_checkpoint, "tmp": tmp_path}
    assert main([a.format(**fill) for a in args]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("a.*"))


def test_pictures_are_readable_by_others(mlp_source: viz.Source, tmp_path: Path) -> None:
    path = viz.vary(mlp_source, tmp_path / "v.png", n=1)
    assert path.stat().st_mode & 0o044 == 0o044

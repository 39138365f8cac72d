"""Your images end to end: a folder of RGB photos of a size no other test uses trains with the conv
recipe (validation loss falls), exports, verifies on its own images, samples and reconstructs in
colour, and bulk-encodes to latents; the resconv model itself; views of 64x64 colour images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_deploy import image_folder
from vae_deploy.cli import main
from vae_deploy.config import ModelConfig
from vae_deploy.model import VAE

RECIPES = Path(__file__).resolve().parent.parent / "train"
SHAPE = (3, 20, 36)  # not square, not a power of two: the decoder crops 24x40 back to 20x36


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(image_folder.CACHE_ENV, str(cache))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 colour pictures (a disc on a gradient) of assorted sizes and formats in two classes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(160):
        h, w = int(rng.integers(30, 60)), int(rng.integers(40, 90))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 1, 3)
        img = base[:, None, None] * (0.5 + 0.5 * xx / w)[None]
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * h
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        label = "warm" if i % 2 else "cool"
        img[:, disc] = np.array([0.9, 0.3, 0.1] if label == "warm" else [0.1, 0.4, 0.9])[:, None]
        picture = Image.fromarray((img.transpose(1, 2, 0) * 255).astype(np.uint8))
        (root / label).mkdir(exist_ok=True)
        picture.save(root / label / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}", quality=95)
    return root


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_resconv_shapes_crop_and_batch_independence() -> None:
    cfg = ModelConfig(arch="resconv", latent_dim=6, conv_channels=(8, 16, 16), res_blocks=1, image_shape=SHAPE)
    torch.manual_seed(0)
    model = VAE(cfg).eval()
    x = torch.rand(5, *SHAPE)
    mu, logvar = model.encoder(x)
    assert mu.shape == logvar.shape == (5, 6)
    out = model.decoder(mu)
    assert out.shape == (5, *SHAPE) and 0 <= out.min() and out.max() <= 1
    one = model.decoder(mu[:1])  # GroupNorm: a sample does not depend on its batch
    assert torch.allclose(one, out[:1], atol=1e-6)
    head = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(head) == 1 and head[0].out_features == 12  # one fused mu/logvar head
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.decoder.modules())


@pytest.mark.slow  # ~15 s idle, ~30 s on 2 loaded cores: the acceptance test of the feature, run by default
def test_a_folder_of_rgb_images_trains_exports_verifies_samples_and_reconstructs(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, exported = tmp_path / "run", tmp_path / "exported"
    shape = ",".join(map(str, SHAPE))
    recipe = str(RECIPES / "folder64_conv.toml")
    out = _run(["train", "--recipe", recipe, "--data-root", str(photos), "--image-shape", shape,
                "--conv-channels", "8,16,16", "--res-blocks", "1", "--latent-dim", "8", "--epochs", "4",
                "--batch-size", "16", "--lr", "2e-3", "--out", str(run), "--no-progress"], capsys)  # fmt: skip
    assert "160 images, 2 classes" in out and "144 train / 16 validation" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"], [r["val_loss"] for r in rows]
    from vae_deploy.checkpoint import load_checkpoint  # both files' indexes know the resconv tensors

    pt, st = (
        load_checkpoint(run / "checkpoint.pt").state_dict(),
        load_checkpoint(run / "model.safetensors").state_dict(),
    )
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)

    _run(["export", str(run / "checkpoint.pt"), "--out", str(exported), "--formats", "onnx"], capsys)
    out = _run(["verify", str(exported), "--data-root", str(photos), "--batch-sizes", "1,7"], capsys)
    assert "inputs: folder images from" in out and "result: PASS" in out

    grid = tmp_path / "samples.png"
    _run(["sample", str(exported), "-n", "6", "--seed", "1", "--out", str(grid)], capsys)
    with Image.open(grid) as im:
        assert im.mode == "RGB" and im.size == (3 * (36 + 2) + 2, 2 * (20 + 2) + 2)
    for model in (str(exported), str(run)):  # the export needs the folder named; the run knows it
        picture = tmp_path / f"recon-{len(model)}.png"
        extra = ["--data-root", str(photos)] if model == str(exported) else []
        _run(["reconstruct", model, "-n", "4", "--out", str(picture), *extra], capsys)
        with Image.open(picture) as im:
            rgb = np.asarray(im.convert("RGB")).astype(int)
        assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 60).any()  # colour, not gray

    latents = tmp_path / "latents.npz"
    out = _run(["encode", str(exported), "--dataset", "folder", "--data-root", str(photos), "--out", str(latents),
                "--batch-size", "50"], capsys)  # fmt: skip
    assert "wrote 160 latents [8]" in out
    with np.load(latents) as z:
        files = [str(f) for f in z["files"]]
        assert z["mu"].shape == z["logvar"].shape == (160, 8) and files[0] == os.path.join("cool", "000.jpg")
        assert files == sorted(files, key=os.fsencode) and list(z["classes"]) == ["cool", "warm"]
        assert z["labels"].tolist() == [0 if f.startswith("cool") else 1 for f in files]
        mu_export = z["mu"]
    code = (  # from an export folder, encoding a folder of images needs neither torch nor onnx
        "import sys\nfrom vae_deploy.encode import encode_dataset\n"
        f"r = encode_dataset({str(exported)!r}, {str(tmp_path / 'light.npz')!r}, dataset='folder', "
        f"data_root={str(photos)!r})\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'torchvision') if m in sys.modules)\n"
        "assert r.count == 160 and not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from vae_deploy.encode import encode_dataset

    means = tmp_path / "means.npy"  # from the checkpoint (eager torch): the validation split only
    result = encode_dataset(run, means, logvar_out=tmp_path / "logvars.npy", split="val")
    assert result.count == 16 and np.load(means).shape == np.load(tmp_path / "logvars.npy").shape == (16, 8)
    whole = encode_dataset(run, tmp_path / "all.npy")
    assert np.allclose(np.load(tmp_path / "all.npy"), mu_export, atol=1e-4) and whole.count == 160


def test_encode_refuses_bad_outputs_before_any_work(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vae_deploy.encode import encode_dataset
    from vae_deploy.errors import UsageError

    for out, extra, match in (
        (tmp_path / "z.csv", {}, "must end in .npz"),
        (tmp_path / "z.npz", {"logvar_out": tmp_path / "l.npy"}, "goes with --out X.npy"),
        (tmp_path / "z.npy", {"split": "test"}, "split must be one of"),
        (tmp_path / "z.npy", {"batch_size": 0}, "batch_size must be a positive integer"),
    ):
        with pytest.raises(UsageError, match=match):
            encode_dataset(tmp_path / "no-model", out, data_root=photos, **extra)
    assert not list(tmp_path.glob("z.*"))
    code = main(["encode", str(tmp_path / "no-model"), "--out", str(tmp_path / "z.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no such model" in err


def test_views_of_64x64_colour_images_stay_readable(tmp_path: Path) -> None:
    """Grids of 64x64 images are drawn at one figure pixel per image pixel or more (never shrunk)."""
    from vae_deploy import viz
    from vae_deploy.figures import DPI, tile_inches, tile_scale

    assert tile_scale((3, 64, 64)) == 1 and tile_scale((1, 28, 28)) == 2 and tile_scale((1, 8, 8)) == 7
    assert tile_inches((3, 64, 64))[0] * DPI >= 64 and tile_inches((3, 32, 64)) == (0.64, 0.32)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (6, 3, 64, 64)).astype(np.float32)
    images[:, 0] = 1.0  # red-dominated
    source = viz.Source(
        encode=lambda x: (np.zeros((len(x), 2), np.float32), np.zeros((len(x), 2), np.float32)),
        decode=lambda z: images[: len(z)],
        latent_dim=2,
        image_shape=(3, 64, 64),
        name="rgb64",
        kind="checkpoint",
    )
    out = viz.latent_map(source, tmp_path / "map.png", dataset="synthetic", limit=50, grid=8)
    with Image.open(out) as im:  # the manifold panel beside the scatter is as wide as 8 images of 64 pixels
        assert im.size[0] >= viz.MAP_INCHES[0] * DPI + 8 * 64
    vary = viz.vary(source, tmp_path / "vary.png", dataset="synthetic", n=2)
    with Image.open(vary) as im:
        w, h = im.size
        assert w >= 3 * 64 and h >= 10 * 64
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert (rgb[..., 0] - rgb[..., 2] > 80).mean() > 0.2


def test_views_of_an_unlabelled_folder(tmp_path: Path) -> None:
    """No subfolders, so no labels: vary shows one row per image, interpolate picks two images."""
    from vae_deploy import viz

    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    source = viz.Source(
        encode=lambda x: (x.reshape(len(x), -1)[:, :3].copy(), np.zeros((len(x), 3), np.float32)),
        decode=lambda z: np.repeat(z[:, :, None, None], 8, axis=2).repeat(8, axis=3).clip(0, 1),
        latent_dim=3,
        image_shape=(3, 8, 8),
        name="flat",
        kind="checkpoint",
        dataset="folder",
        data_root=str(tmp_path),
    )
    x, y = viz.validation_set(source, None, None)  # the folder it was trained on, at the model's shape
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) == {0}
    assert viz.vary(source, tmp_path / "vary.png", n=2).is_file()
    assert viz.interpolate(source, tmp_path / "interp.png", steps=3).is_file()
    assert viz.latent_map(source, tmp_path / "map.png", method="pca").is_file()


def test_vary_shows_ten_of_many_classes_by_name(tmp_path: Path) -> None:
    from vae_deploy import viz

    rng = np.random.default_rng(2)
    for k in range(15):
        (tmp_path / f"class-{k:02d}").mkdir()
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / f"class-{k:02d}" / f"{i}.png")
    source = viz.Source(
        encode=lambda x: (x.reshape(len(x), -1)[:, :2].copy(), np.zeros((len(x), 2), np.float32)),
        decode=lambda z: np.full((len(z), 1, 8, 8), 0.5, np.float32),
        latent_dim=2,
        image_shape=(1, 8, 8),
        name="many",
        kind="checkpoint",
        dataset="folder",
        data_root=str(tmp_path),
    )
    x, y = viz.validation_set(source, None, None)
    assert len(np.unique(y)) > 10
    from vae_deploy.figures import DPI, grid_figure_inches

    with Image.open(viz.vary(source, tmp_path / "vary.png", n=1)) as im:  # ten rows, not fifteen
        assert im.size[1] == round(grid_figure_inches(10, 2, (1, 8, 8))[1] * DPI)
    assert viz.latent_map(source, tmp_path / "map.png", grid=4).is_file()  # a continuous colour map

"""VAERuntime on real exports of the small conftest models: sampling, validation, providers, threads, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_deploy.cli import main
from vae_deploy.errors import ExportError, IntegrityError, ProviderError, UsageError
from vae_deploy.images import image_grid
from vae_deploy.runtime import CpuPlan, VAERuntime

REPO = Path(__file__).resolve().parents[1]


def _export(checkpoint: Path, out: Path, fp16: bool = False) -> Path:
    from vae_deploy.export import export

    return export(checkpoint, out, formats=("onnx",), fp16=fp16, verify=False, log=lambda _: None).out_dir


@pytest.fixture(scope="session")
def mlp_export(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLP export (latent 8) with the optional fp16 decoder."""
    return _export(mlp_checkpoint, tmp_path_factory.mktemp("rt") / "mlp", fp16=True)


@pytest.fixture(scope="session")
def conv_export(conv_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(conv_checkpoint, tmp_path_factory.mktemp("rt") / "conv")


@pytest.fixture(scope="session")
def rt(mlp_export: Path) -> VAERuntime:
    return VAERuntime(mlp_export, "cpu")


def _cuda_runtime(export_dir: Path) -> VAERuntime:
    try:
        return VAERuntime(export_dir, "cuda")
    except ProviderError as exc:
        pytest.skip(f"no working CUDA provider: {exc}")


# --- sampling -----------------------------------------------------------------------------------


def test_sample_10000_depends_only_on_seed_and_n(rt: VAERuntime) -> None:
    images = rt.sample(10_000, seed=0)
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    for batch_size in (1, 7, 1000, 4096, 10_000, 50_000):
        assert np.array_equal(rt.sample(10_000, seed=0, batch_size=batch_size), images), batch_size
    assert np.array_equal(rt.sample(2500, seed=0, batch_size=3), images[:2500])  # a prefix too
    assert not np.allclose(rt.sample(100, seed=1), images[:100])
    seedless = rt.sample(20), rt.sample(20)
    assert not np.array_equal(*seedless)


def _recipe(seed: int, n: int, row_shape: tuple[int, ...], key_suffix: tuple[int, ...], normal: bool) -> np.ndarray:
    """docs/CONTRACT.md's recipe, written out: block k of 1024 rows from SeedSequence(seed, spawn_key=(k, ...))."""
    blocks = []
    for k in range(-(-n // 1024)):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, *key_suffix)))
        rows = min(1024, n - 1024 * k)
        draw = rng.standard_normal if normal else rng.random
        blocks.append(draw((rows, *row_shape), dtype=np.float32))
    return np.concatenate(blocks)


def test_sample_uses_the_documented_streams(rt: VAERuntime) -> None:
    """Any app can reproduce the samples: z and the Bernoulli uniforms are numpy PCG64 draws, one key per block."""
    n, seed = 2500, 42  # three blocks, the last one partial
    z = _recipe(seed, n, (rt.latent_dim,), (), normal=True)
    probs = rt.decode(z)
    assert np.array_equal(rt.sample(n, seed=seed), probs)
    u = _recipe(seed, n, rt.image_shape, (1,), normal=False)
    assert np.array_equal(rt.sample(n, seed=seed, bernoulli=True), (u < probs).astype(np.float32))


def test_any_row_range_is_the_slice_of_the_sample(rt: VAERuntime) -> None:
    """Row i depends only on (seed, i): ranges inside a block, across blocks, far out, any batch size."""
    whole = rt.sample(5000, seed=11)
    for start, stop, batch in ((0, 1, None), (7, 1030, 100), (1023, 1025, 1), (2047, 4999, 333), (4096, 5000, None)):
        assert np.array_equal(rt.sample_rows(start, stop, seed=11, batch_size=batch), whole[start:stop])
    parts = list(rt.sample_iter(900, seed=11, batch_size=256, start=3100))
    assert np.array_equal(np.concatenate(parts), whole[3100:4000])
    bern = rt.sample(3000, seed=2, bernoulli=True)
    assert np.array_equal(rt.sample_rows(1500, 3000, seed=2, bernoulli=True, batch_size=77), bern[1500:])
    far = rt.sample_rows(10**9, 10**9 + 3, seed=11)  # no rows before start are drawn: instant
    assert far.shape == (3, *rt.image_shape)
    for bad in ((5, 5), (-1, 3), (2.0, 4), (True, 3)):
        with pytest.raises(UsageError, match="start"):
            rt.sample_rows(*bad, seed=0)


def test_bernoulli_draws_are_binary_seeded_and_match_probabilities(rt: VAERuntime) -> None:
    draws = rt.sample(3000, seed=5, bernoulli=True, batch_size=128)
    assert set(np.unique(draws)) <= {0.0, 1.0}
    assert np.array_equal(draws, rt.sample(3000, seed=5, bernoulli=True, batch_size=999))
    probs = rt.sample(3000, seed=5)
    assert abs(draws.mean() - probs.mean()) < 0.01  # 2.4M draws: the mean is tight
    assert not np.array_equal(draws, rt.sample(3000, seed=6, bernoulli=True))


def test_sample_iter_streams_the_same_samples(rt: VAERuntime) -> None:
    batches = list(rt.sample_iter(1000, seed=3, batch_size=300))
    assert [len(b) for b in batches] == [300, 300, 300, 100]
    assert np.array_equal(np.concatenate(batches), rt.sample(1000, seed=3))
    seen: list[int] = []
    rt.sample(1000, seed=3, batch_size=256, progress=seen.append)
    assert seen == [256, 256, 256, 232]


def test_conv_export_samples_identically_across_batch_sizes(conv_export: Path) -> None:
    rt = VAERuntime(conv_export, "cpu")
    assert (rt.latent_dim, rt.image_shape) == (2, (1, 28, 28))
    images = rt.sample(600, seed=9, batch_size=600)
    assert np.array_equal(rt.sample(600, seed=9, batch_size=7), images)
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_fp16_decoder_is_close_to_fp32(mlp_export: Path, rt: VAERuntime) -> None:
    half = VAERuntime(mlp_export, "cpu", precision="fp16")
    a, b = rt.sample(500, seed=1), half.sample(500, seed=1, batch_size=33)
    assert np.abs(a - b).max() < 2e-3
    assert np.array_equal(b, half.sample(500, seed=1))


# --- parity with the eager model, and the input contract --------------------------------------


def test_decode_encode_reconstruct_match_eager_pytorch(rt: VAERuntime, mlp_checkpoint: Path) -> None:
    import torch

    from vae_deploy.checkpoint import load_checkpoint

    model = load_checkpoint(mlp_checkpoint)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((33, rt.latent_dim), dtype=np.float32)
    x = rng.random((17, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        want_x = model.decoder(torch.from_numpy(z)).numpy()
        want_mu, want_logvar = (t.numpy() for t in model.encoder(torch.from_numpy(x)))
        want_rec = model.reconstruct(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(rt.decode(z), want_x, atol=1e-5)
    mu, logvar = rt.encode(x)
    np.testing.assert_allclose(mu, want_mu, atol=1e-4)
    np.testing.assert_allclose(logvar, want_logvar, atol=1e-4)
    np.testing.assert_allclose(rt.reconstruct(x), want_rec, atol=1e-5)


def test_accepted_inputs(rt: VAERuntime) -> None:
    z = np.random.default_rng(1).standard_normal((5, rt.latent_dim), dtype=np.float32)
    batch = rt.decode(z)
    assert np.array_equal(rt.decode(z[2]), batch[2])  # one unbatched latent -> one image
    np.testing.assert_array_equal(rt.decode(z.astype(np.float64)), batch)  # float64 is cast
    assert np.array_equal(rt.decode(z.T.copy().T), batch)  # non-contiguous
    assert np.array_equal(rt.decode(z.tolist()), batch)  # nested lists
    assert rt.decode(np.zeros((2, rt.latent_dim), np.int64)).shape == (2, 1, 28, 28)
    x = batch[:3]
    mu, logvar = rt.encode(x)
    assert mu.shape == logvar.shape == (3, rt.latent_dim)
    one_mu, _ = rt.encode(x[0])
    np.testing.assert_allclose(one_mu, mu[0], atol=1e-6)
    assert rt.reconstruct(x[0]).shape == (1, 28, 28)
    assert isinstance(rt.decode(z, device_output=True), np.ndarray)  # on CPU the host array is the device


D = 8  # latent size of the conftest MLP


@pytest.mark.parametrize(
    ("z", "expected"),
    [
        (np.zeros((2, 3, D), np.float32), r"shape \[batch, 8\]"),
        (np.zeros((2, D + 1), np.float32), r"shape \[batch, 8\].*got \[2, 9\]"),
        (np.zeros((0, D), np.float32), "empty batch"),
        (np.array([["a"] * D]), "real numeric array"),
        (np.zeros((1, D), np.complex64), "real numeric array"),
        (np.zeros((1, D), bool), "real numeric array"),
        (np.full((1, D), np.nan, np.float32), "NaN or infinite"),
        (np.full((1, D), np.inf), "NaN or infinite"),
        ([[1.0] * D, [1.0]], "numeric array"),
        ("zzz", "real numeric array"),
    ],
)
def test_decode_rejects_bad_latents(rt: VAERuntime, z: object, expected: str) -> None:
    with pytest.raises(UsageError, match=expected):
        rt.decode(z)


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (np.zeros((2, 28, 28), np.float32), r"shape \[batch, 1, 28, 28\]"),
        (np.zeros((2, 1, 32, 32), np.float32), r"got \[2, 1, 32, 32\]"),
        (np.zeros((0, 1, 28, 28), np.float32), "empty batch"),
        (np.full((1, 1, 28, 28), 255, np.uint8), r"\[0, 1\].*divide 8-bit images by 255"),
        (np.full((1, 1, 28, 28), -0.5), r"\[0, 1\]"),
        (np.full((1, 1, 28, 28), np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_encode_rejects_bad_images(rt: VAERuntime, x: np.ndarray, expected: str) -> None:
    with pytest.raises(UsageError, match=expected):
        rt.encode(x)
    with pytest.raises(UsageError, match=expected):
        rt.reconstruct(x)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"n": 0}, "n must be a positive integer"),
        ({"n": -3}, "n must be a positive integer"),
        ({"n": 2.5}, "n must be a positive integer"),
        ({"n": True}, "n must be a positive integer"),
        ({"n": "10"}, "n must be a positive integer"),
        ({"n": 10**15}, "GiB.*sample_iter"),
        ({"n": 5, "batch_size": 0}, "batch_size must be a positive integer"),
        ({"n": 5, "seed": -1}, "seed must be a non-negative integer"),
        ({"n": 5, "seed": "abc"}, "seed must be a non-negative integer"),
    ],
)
def test_sample_rejects_bad_arguments(rt: VAERuntime, kwargs: dict, expected: str) -> None:
    with pytest.raises(UsageError, match=expected):
        rt.sample(**kwargs)


def test_device_output_needs_a_batch(rt: VAERuntime) -> None:
    with pytest.raises(UsageError, match="batched z"):
        rt.decode(np.zeros(D, np.float32), device_output=True)


# --- the export folder --------------------------------------------------------------------------


def test_tampered_missing_or_inconsistent_exports_are_refused(mlp_export: Path, tmp_path: Path) -> None:
    bad = shutil.copytree(mlp_export, tmp_path / "bad")
    blob = bytearray((bad / "decoder.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "decoder.onnx").write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="decoder.onnx"):
        VAERuntime(bad, "cpu")

    with pytest.raises(ExportError, match="manifest.json"):
        VAERuntime(tmp_path, "cpu")  # a folder without a manifest
    with pytest.raises(ExportError, match="not found"):
        VAERuntime(tmp_path / "nope", "cpu")

    other = shutil.copytree(mlp_export, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    original = json.loads(json.dumps(manifest))
    manifest["latent_shape"] = [5]  # the model's contract no longer matches its files' records
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"do not match the model's contract"):
        VAERuntime(other, "cpu")
    for formats in manifest["graphs"].values():  # records agree, the graphs themselves do not
        for entry in formats.values():
            for t in entry["inputs"] + entry["outputs"]:
                if t["name"] in ("z", "mu", "logvar"):
                    t["shape"] = ["batch", 5]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"decoder.onnx.*does not match its contract.*\[batch, 5\]"):
        VAERuntime(other, "cpu")
    manifest = original
    del manifest["graphs"]["decoder"]["onnx-fp16"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="--fp16"):
        VAERuntime(other, "cpu", precision="fp16")


def test_encoder_is_rechecked_when_first_loaded(mlp_export: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(mlp_export, tmp_path / "late")
    rt = VAERuntime(folder, "cpu")  # loads only the decoder
    (folder / "encoder.onnx").write_bytes((folder / "encoder.onnx").read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="encoder.onnx"):
        rt.encode(np.zeros((1, 1, 28, 28), np.float32))


# --- providers and CPU plans --------------------------------------------------------------------


def test_cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back(
    mlp_export: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    try:
        VAERuntime(mlp_export, "cuda")
    except ProviderError as exc:
        message = str(exc)
    else:
        pytest.skip("this machine has a working CUDA provider")
    assert message.startswith("CUDA execution provider unavailable: ")
    assert "provider='cpu'" in message and "\n" not in message
    rt = VAERuntime(mlp_export, "auto")
    assert rt.provider == "cpu" and rt.providers == ["CPUExecutionProvider"]
    assert rt.fallback_reason and rt.fallback_reason in message
    out, err = capfd.readouterr()
    assert "onnxruntime" not in err and "EP Error" not in out  # no red onnxruntime spam


def test_bad_provider_and_options(mlp_export: Path) -> None:
    with pytest.raises(UsageError, match="provider must be one of"):
        VAERuntime(mlp_export, "tpu")
    with pytest.raises(UsageError, match="precision"):
        VAERuntime(mlp_export, "cpu", precision="int4")
    with pytest.raises(UsageError, match="intra_op_threads"):
        VAERuntime(mlp_export, "cpu", intra_op_threads=0)
    with pytest.raises(UsageError, match="either intra_op_threads or cpu_plan"):
        VAERuntime(mlp_export, "cpu", intra_op_threads=1, cpu_plan=CpuPlan())
    with pytest.raises(UsageError, match="CpuPlan"):
        CpuPlan(sample_batch=0)


def test_cpu_plans_give_identical_results(mlp_export: Path, rt: VAERuntime) -> None:
    single = VAERuntime(mlp_export, "cpu", intra_op_threads=1)
    one = single.engine("decoder")
    assert one.session_for(1) is one.session_for(4096)  # one session when threads are fixed
    split = VAERuntime(mlp_export, "cpu", cpu_plan=CpuPlan(small_batch_max=4, threads=2, sample_batch=64))
    two = split.engine("decoder")
    assert two.session_for(4) is not two.session_for(5)  # batches up to 4 on the 1-thread session
    assert two.settings_for(4)["ort_intra_op"] == 1 and two.settings_for(5)["ort_intra_op"] == 2
    want = rt.sample(700, seed=11)
    assert np.array_equal(single.sample(700, seed=11), want)
    assert np.array_equal(split.sample(700, seed=11), want)
    assert np.array_equal(split.sample(700, seed=11, batch_size=3), want)  # served by the 1-thread session


# --- threads ------------------------------------------------------------------------------------


def test_concurrent_calls_match_sequential_ones(rt: VAERuntime) -> None:
    rng = np.random.default_rng(7)
    zs = [rng.standard_normal((b, rt.latent_dim), dtype=np.float32) for b in (1, 3, 17, 64, 300, 2, 9, 128)]
    seeds = list(range(8))
    want_decode = [rt.decode(z) for z in zs]
    want_sample = [rt.sample(400, seed=s, batch_size=37) for s in seeds]
    barrier = threading.Barrier(8)

    def work(i: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        barrier.wait()
        decoded, sampled = [], []
        for r in range(3):
            decoded.append(rt.decode(zs[(i + r) % 8]))
            sampled.append(rt.sample(400, seed=seeds[(i + r) % 8], batch_size=37))
        return decoded, sampled

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    for i, (decoded, sampled) in enumerate(results):
        for r in range(3):
            assert np.array_equal(decoded[r], want_decode[(i + r) % 8])
            assert np.array_equal(sampled[r], want_sample[(i + r) % 8])


# --- torch-free ---------------------------------------------------------------------------------


def test_runtime_never_imports_torch(mlp_export: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "import vae_deploy\n"
        "from vae_deploy import VAERuntime\n"
        f"rt = VAERuntime({str(mlp_export)!r}, 'auto')\n"
        "x = rt.sample(50, seed=0, bernoulli=True)\n"
        "rt.reconstruct(rt.sample(4, seed=1))\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print('ok', rt.provider)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
    assert "onnxruntime" not in done.stderr  # quiet: no provider-load error spam


# --- writing samples and the CLI ----------------------------------------------------------------


def test_image_grid_places_images_row_major() -> None:
    images = np.zeros((5, 1, 4, 3), np.float32)
    for i in range(5):
        images[i] = 10 * (i + 1) / 255
    grid = image_grid(images, nrow=2, padding=1)
    assert grid.shape == (1 + 3 * 5, 1 + 2 * 4, 1)
    assert grid[1, 1, 0] == 10 and grid[1, 5, 0] == 20 and grid[6, 1, 0] == 30 and grid[11, 1, 0] == 50
    assert grid[11, 5, 0] == 0 and grid[0, 0, 0] == 0  # the 6th cell and the padding stay black
    with pytest.raises(UsageError, match="1 or 3 channels"):
        image_grid(np.zeros((1, 2, 4, 4), np.float32))


def test_cli_sample_png_and_npy(
    mlp_export: Path, rt: VAERuntime, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "grid.png"
    assert main(["sample", str(mlp_export), "-n", "20", "--seed", "3", "--out", str(png), "--nrow", "5"]) == 0
    out = capsys.readouterr().out
    assert "provider: cpu" in out and "samples/s" in out and "seed 3" in out
    with Image.open(png) as im:
        assert im.size == (2 + 5 * 30, 2 + 4 * 30) and im.mode == "L"
        tile = np.asarray(im)[2:30, 2:30]
    first = (np.clip(rt.sample(20, seed=3)[0, 0], 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(tile, first)

    npy = tmp_path / "s.npy"
    args = ["sample", str(mlp_export), "-n", "30", "--seed", "4", "--out", str(npy), "--provider", "cpu"]
    assert main([*args, "--batch-size", "7", "--bernoulli"]) == 0
    assert np.array_equal(np.load(npy), rt.sample(30, seed=4, bernoulli=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "s.npy"]  # no temp files left


def test_cli_sample_errors_are_one_line(mlp_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--out", str(tmp_path / "s.jpg")], 2, "must end in .png or .npy"),
        (["--out", str(tmp_path / "s.png"), "-n", "0"], 2, "n must be a positive integer"),
        (["--out", str(tmp_path / "s.png"), "--batch-size", "-1"], 2, "batch_size"),
        (["--out", str(tmp_path)], 2, "must end in"),
    ]
    for extra, code, expected in cases:
        assert main(["sample", str(mlp_export), *extra]) == code
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert main(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "s.png")]) == 1
    assert "export folder not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# --- CUDA (skipped without a working CUDA provider) ---------------------------------------------


@pytest.mark.cuda
def test_cuda_matches_cpu_and_is_seed_stable(mlp_export: Path, rt: VAERuntime) -> None:
    gpu = _cuda_runtime(mlp_export)
    assert gpu.provider == "cuda" and gpu.providers[0] == "CUDAExecutionProvider"
    want = rt.sample(3000, seed=0)
    for batch_size in (None, 1, 100, 3000):
        np.testing.assert_allclose(gpu.sample(3000, seed=0, batch_size=batch_size), want, atol=1e-5)
    z = np.random.default_rng(0).standard_normal((37, D), dtype=np.float32)
    for _ in range(3):  # capture, then replays of the 64-row graph with new inputs
        np.testing.assert_allclose(gpu.decode(z), rt.decode(z), atol=1e-5)
        z = z[::-1].copy()
    mu, logvar = gpu.encode(want[:9])
    np.testing.assert_allclose(mu, rt.encode(want[:9])[0], atol=1e-4)
    assert gpu.engine("decoder").graph_error is None, gpu.engine("decoder").graph_error  # CUDA graphs really in use


@pytest.mark.cuda
def test_cuda_device_output_is_dlpack(mlp_export: Path, rt: VAERuntime) -> None:
    torch = pytest.importorskip("torch")
    gpu = _cuda_runtime(mlp_export)
    z = np.random.default_rng(2).standard_normal((16, D), dtype=np.float32)
    value = gpu.decode(z, device_output=True)
    tensor = torch.from_dlpack(value)
    assert tensor.is_cuda and tuple(tensor.shape) == (16, 1, 28, 28)
    np.testing.assert_allclose(tensor.cpu().numpy(), rt.decode(z), atol=1e-5)
    many = torch.from_dlpack(gpu.sample(1000, seed=1, batch_size=300, device_output=True))
    np.testing.assert_allclose(many.cpu().numpy(), rt.sample(1000, seed=1), atol=1e-5)


@pytest.mark.cuda
def test_cuda_concurrent_calls(mlp_export: Path) -> None:
    gpu = _cuda_runtime(mlp_export)
    zs = [np.random.default_rng(i).standard_normal((1 + 5 * i, D), dtype=np.float32) for i in range(8)]
    want = [gpu.decode(z) for z in zs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: [gpu.decode(zs[(i + r) % 8]) for r in range(4)], range(8)))
    for i, outs in enumerate(got):
        for r, out in enumerate(outs):
            assert np.array_equal(out, want[(i + r) % 8])

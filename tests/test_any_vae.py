"""Any VAE: diffusers AutoencoderKL/AutoencoderTiny folders, a factory in user code, fp16 overflow.

Tiny random-weight models built from small configs and saved as real diffusers folders (one a
pipeline folder with vae/); every export is checked with plain onnxruntime against the diffusers
eager model at sizes neither the export nor its verification used.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vae_deploy.cli import main
from vae_deploy.contract import MANIFEST
from vae_deploy.errors import ExportError, IntegrityError, UsageError
from vae_deploy.manifest import check_manifest
from vae_deploy.parity import verify
from vae_deploy.runtime import VAERuntime

diffusers = pytest.importorskip("diffusers")

QUIET = dict(log=lambda _: None)
KL_CONFIG = dict(
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.5,
    shift_factor=0.1,
)
TINY_CONFIG = dict(
    encoder_block_out_channels=(8, 8, 8),
    decoder_block_out_channels=(8, 8, 8),
    num_encoder_blocks=(1, 1, 1),
    num_decoder_blocks=(1, 1, 1),
    latent_channels=4,
)


def _save(model, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def kl_pipeline(tmp_path_factory) -> Path:
    """A pipeline-style folder: model_index.json and the tiny AutoencoderKL in vae/."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd") / "pipeline"
    _save(diffusers.AutoencoderKL(**KL_CONFIG), root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "vae": []}))
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    return _save(diffusers.AutoencoderTiny(**TINY_CONFIG), tmp_path_factory.mktemp("taesd") / "vae")


@pytest.fixture(scope="module")
def kl_export(kl_pipeline: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kl_export") / "exported"
    assert main(["export", str(kl_pipeline), "--out", str(out), "--fp16"]) == 0  # the CLI, pipeline folder
    return out


@pytest.fixture(scope="module")
def tiny_export(tiny_folder: Path, tmp_path_factory) -> Path:
    from vae_deploy.export_modules import export_diffusers

    out = tmp_path_factory.mktemp("tiny_export") / "exported"
    return export_diffusers(tiny_folder, out, **QUIET).out_dir


def _tolerance(export: Path, graph: str, fmt: str = "onnx") -> float:
    entry = json.loads((export / MANIFEST).read_text())["graphs"][graph][fmt]
    return entry["tolerance"]["atol"]


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("which", ["kl", "tiny"])
def test_onnx_matches_diffusers_at_new_sizes_with_plain_onnxruntime(which, request):
    folder = request.getfixturevalue("kl_pipeline") / "vae" if which == "kl" else request.getfixturevalue("tiny_folder")
    export = request.getfixturevalue(f"{which}_export")
    cls = diffusers.AutoencoderKL if which == "kl" else diffusers.AutoencoderTiny
    vae = cls.from_pretrained(str(folder)).eval()
    factor = json.loads((export / MANIFEST).read_text())["downsampling_factor"]
    recorded = json.loads((export / MANIFEST).read_text())["verification"]["sizes"]
    g = torch.Generator().manual_seed(5)
    for batch, h, w in [(2, 5, 9), (1, 7, 3)]:  # latent sizes: neither traced (6x8) nor verified
        assert [h * factor, w * factor] not in recorded
        z = torch.randn(batch, 4, h, w, generator=g)
        with torch.no_grad():
            want = vae.decode(z).sample.numpy()
        (got,) = _run(export / "decoder.onnx", {"z": z.numpy()})
        assert got.shape == (batch, 3, h * factor, w * factor)
        assert np.abs(got - want).max() <= _tolerance(export, "decoder")
        x = torch.rand(batch, 3, h * factor, w * factor, generator=g) * 2 - 1  # images in [-1, 1]
        with torch.no_grad():
            encoded = vae.encode(x)
        want = [encoded.latent_dist.mean, encoded.latent_dist.logvar] if which == "kl" else [encoded.latents]
        got = _run(export / "encoder.onnx", {"x": x.numpy()})
        assert len(got) == len(want)
        tol = _tolerance(export, "encoder")
        for g_, w_ in zip(got, want):
            assert np.allclose(g_, w_.numpy(), atol=tol, rtol=1e-5)


def test_manifest_and_onnx_metadata_carry_the_diffusers_conventions(kl_export: Path, kl_pipeline: Path):
    m = json.loads((kl_export / MANIFEST).read_text())
    assert m["value_range"] == [-1.0, 1.0] and m["scaling_factor"] == 0.5 and m["shift_factor"] == 0.1
    assert m["latent_shape"] == [4, "latent_height", "latent_width"] and m["image_shape"] == [3, "height", "width"]
    assert m["downsampling_factor"] == 2 and m["has_logvar"] is True
    src = m["source"]
    assert src["kind"] == "diffusers" and src["class"] == "AutoencoderKL"
    assert (kl_export / src["path"]).resolve() == (kl_pipeline / "vae").resolve()
    assert m["verification"]["passed"] is True and len(m["verification"]["sizes"]) >= 2
    assert m["verification"]["batch_sizes"] == [1, 3]
    for name in ("encoder.onnx", "decoder.onnx", "decoder.fp16.onnx"):
        session = ort.InferenceSession(str(kl_export / name), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert meta["vae_deploy.scaling_factor"] == "0.5" and meta["vae_deploy.shift_factor"] == "0.1"
        assert json.loads(meta["vae_deploy.value_range"]) == [-1.0, 1.0]
        assert meta["vae_deploy.downsampling_factor"] == "2"
        dims = [session.get_inputs()[0].shape, session.get_outputs()[0].shape]
        assert all(d[0] == "batch" and isinstance(d[2], str) and isinstance(d[3], str) for d in dims), dims


def test_tiny_has_no_logvar_and_images_in_minus_one_one(tiny_export: Path):
    m = check_manifest(tiny_export)
    assert m.model.has_logvar is False and m.model.value_range == (-1.0, 1.0)
    assert [t.name for t in m.entry("encoder", "onnx").spec.outputs] == ["mu"]
    assert m.model.downsampling_factor == 4


def test_verify_rebuilds_the_diffusers_model_and_reports_each_size(kl_export: Path, tmp_path: Path, capsys):
    assert main(["verify", str(kl_export), "--sizes", "8x12,16x6", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["sizes"] == ["8x12", "16x6"]
    ran = [r for r in report["rows"] if r["status"] == "pass" and r["format"] == "onnx"]
    assert {(r["size"], r["batch_size"]) for r in ran} >= {("8x12", 1), ("8x12", 3), ("16x6", 1), ("16x6", 3)}
    ranges = [r for r in report["rows"] if r["output"] == "range"]  # the fp16 file's activations
    assert ranges and all(r["status"] == "pass" and r["max_abs"] < 65504 for r in ranges)
    assert "16x6" in capsys.readouterr().out


def test_verify_refuses_a_changed_source_and_fails_against_another_model(kl_export, kl_pipeline, tmp_path):
    import shutil

    copy = Path(shutil.copytree(kl_export, tmp_path / "exported"))
    source = json.loads((copy / MANIFEST).read_text())["source"]
    moved = Path(shutil.copytree(kl_pipeline / "vae", tmp_path / "vae"))
    torch.manual_seed(99)
    _save(diffusers.AutoencoderKL(**KL_CONFIG), tmp_path / "other")  # same architecture, other weights
    weights = moved / source["weights"]
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    (copy / MANIFEST).write_text((copy / MANIFEST).read_text().replace(source["path"], "../vae"))
    with pytest.raises(IntegrityError, match="changed since this export"):
        verify(copy, **QUIET)
    report = verify(copy, checkpoint=tmp_path / "other", batch_sizes=(1,), **QUIET)
    assert not report.passed and any("not the VAE this export was made from" in n for n in report.notes)


def test_runtime_samples_encodes_and_decodes_any_size(kl_export: Path):
    rt = VAERuntime(kl_export, "cpu")
    x = rt.sample(3, seed=7, latent_size=(3, 5))
    assert x.shape == (3, 3, 6, 10)
    assert np.array_equal(x, rt.sample(3, seed=7, image_size=(6, 10)))
    assert np.array_equal(x, np.concatenate(list(rt.sample_iter(3, seed=7, batch_size=2, latent_size=(3, 5)))))
    block0 = np.random.default_rng(np.random.SeedSequence(7, spawn_key=(0,)))  # the documented stream
    z = block0.standard_normal((3, 4, 3, 5), dtype=np.float32)
    assert np.allclose(x, _run(kl_export / "decoder.onnx", {"z": z})[0], atol=1e-6)
    mu, logvar = rt.encode(np.clip(x, -1, 1))
    assert mu.shape == logvar.shape == (3, 4, 3, 5)
    assert rt.decode(mu[0]).shape == (3, 6, 10)
    with pytest.raises(UsageError, match="latent_size"):
        rt.sample(2, seed=0)
    with pytest.raises(UsageError, match="multiples of 2"):
        rt.encode(np.zeros((1, 3, 6, 7), np.float32))
    with pytest.raises(UsageError, match=r"\[-1, 1\]"):
        rt.encode(np.full((1, 3, 6, 6), 2.0, np.float32))


def test_bench_runs_on_an_any_size_export(tiny_export: Path):
    from vae_deploy.bench import Budget, format_table, run_bench

    tiny = Budget(warmup_s=0.005, round_s=0.005, min_rounds=1, max_s=0.02, matmul_n=128, matmul_repeats=1, copy_mib=4)
    for graph, size in (("decoder", None), ("encoder", (16, 12))):
        report = run_bench(tiny_export, backends="eager,onnx-cpu", graph=graph, image_size=size, budget=tiny, **QUIET)
        rows = {(r.backend, r.batch_size) for r in report.results}
        assert rows == {(b, n) for b in ("eager", "onnx-cpu") for n in (1, 4)}  # large images: batch 1 and 4
        want = list(size) if size else json.loads((tiny_export / MANIFEST).read_text())["export"]["traced_at"][-2:]
        assert report.settings["image_size"] == want
        assert report.settings["flops_per_sample"] > 0 and all(r.fraction_of_peak is not None for r in report.results)
        assert "FLOP/sample at" in format_table(report)


# --- a factory in the user's code ---------------------------------------------------------------

FACTORY = '''
import torch
from torch import nn


class Encoder(nn.Module):
    """Returns one tensor: [mean, logvar] stacked on the channels (2 latent channels)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 4, 3, 2, 1))

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(2, 8, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(8, 3, 4, 2, 1))

    def forward(self, z):
        return torch.tanh(self.net(z))


def build():
    return Encoder(), Decoder()
'''


def test_factory_vae_exports_and_verifies(tmp_path: Path, monkeypatch):
    from safetensors.torch import save_file

    pkg = tmp_path / "code"
    pkg.mkdir()
    (pkg / "myvae.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(pkg))
    import myvae

    torch.manual_seed(3)
    encoder, decoder = myvae.build()
    state = torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder}).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "exported"
    args = ["export", "--factory", "myvae:build", "--weights", str(tmp_path / "w.safetensors"), "--out", str(out)]
    assert main([*args, "--image-shape", "3,16,24", "--value-range", "-1,1"]) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert m["export"]["encoder_output"] == "stacked" and m["source"]["kind"] == "factory"
    assert m["latent_shape"] == [2, "latent_height", "latent_width"] and m["downsampling_factor"] == 4
    assert verify(out, **QUIET).passed  # the factory imported again, the weights hash-checked
    z = torch.randn(2, 2, 5, 3)
    with torch.no_grad():
        want = decoder.eval()(z).numpy()  # the saved weights, not the factory's initialisation
    assert np.abs(_run(out / "decoder.onnx", {"z": z.numpy()})[0] - want).max() <= _tolerance(out, "decoder")


def test_factory_errors_are_one_line(tmp_path: Path, monkeypatch, capsys):
    pkg = tmp_path / "code"
    pkg.mkdir()
    (pkg / "myvae2.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(pkg))
    torch.save({"encoder.nope": torch.zeros(1)}, tmp_path / "bad.pt")
    base = ["export", "--out", str(tmp_path / "o")]
    cases = [
        ([*base, "--factory", "myvae2:build"], "needs --image-shape"),
        ([*base, "--factory", "myvae2", "--image-shape", "3,8,8"], "pkg.module:function"),
        ([*base, "--factory", "myvae2:nope", "--image-shape", "3,8,8"], "no function 'nope'"),
        ([*base, "--factory", "nomodule:build", "--image-shape", "3,8,8"], "cannot import the factory"),
        ([*base, "--factory", "myvae2:build", "--weights", str(tmp_path / "bad.pt"), "--image-shape", "3,8,8"],
         "does not fit the model"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(args) != 0, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_folders_that_are_not_supported_vaes_are_refused(tmp_path: Path, capsys):
    from vae_deploy.diffusers_vae import find_vae

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ExportError, match="AutoencoderKL, AutoencoderTiny"):
        find_vae(unet)
    empty = tmp_path / "vae"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ExportError, match="has no diffusion_pytorch_model"):
        find_vae(empty)
    assert main(["export", str(empty), "--value-range", "0,1", "--out", str(tmp_path / "o")]) == 2
    assert "--value-range: not for a diffusers folder" in capsys.readouterr().err


# --- fp16 overflow --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overflowing_decoder():
    """A KL decoder whose activations exceed fp16's 65504 (as the SDXL VAE's do), and the
    export options for it: decoder only, fp16."""
    from vae_deploy.adapters import Method

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**KL_CONFIG).eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # the first conv's output reaches ~1e5
        vae.decoder.conv_in.bias.mul_(1e5)
    options = dict(example_latent=(4, 6, 8), value_range=(-1, 1), fp16=True, verify_sizes=[(12, 16)], **QUIET)
    return Method(vae, "decode"), options


def test_fp16_overflow_fails_verify_naming_the_ways_out(overflowing_decoder, tmp_path: Path):
    from vae_deploy.export_modules import export_modules

    decoder, options = overflowing_decoder
    out = export_modules(None, decoder, tmp_path / "plain", verify=False, **options).out_dir
    report = verify(out, modules=(None, decoder), **QUIET)
    assert not report.passed
    failed = [r for r in report.rows if r.status == "fail"]
    assert failed and all(r.format == "onnx-fp16" for r in failed)  # the fp32 file is fine
    reasons = " ".join(r.reason for r in failed)
    assert "fp16 overflow" in reasons and "65504" in reasons
    for choice in ("decoder.onnx", "fp16-safe VAE", "--fp16-keep-fp32 auto"):
        assert choice in reasons
    ranged = [r for r in failed if r.output == "range"]  # found on the fp32 graph: whatever the device
    assert ranged and ranged[0].max_abs > 65504


@pytest.mark.slow
@pytest.mark.slow
def test_fp16_keep_fp32_auto_keeps_the_overflowing_ops_in_fp32(overflowing_decoder, tmp_path: Path):
    from vae_deploy.export_modules import export_modules

    decoder, options = overflowing_decoder
    kept = export_modules(None, decoder, tmp_path / "kept", fp16_keep_fp32="auto", **options)
    assert kept.report.passed and kept.manifest["export"]["fp16_keep_fp32"]["nodes"]
    z = np.random.default_rng(0).standard_normal((2, 4, 5, 7), dtype=np.float32)
    (half,) = _run(kept.out_dir / "decoder.fp16.onnx", {"z": z})
    (full,) = _run(kept.out_dir / "decoder.onnx", {"z": z})
    assert np.isfinite(half).all() and np.abs(half - full).max() <= _tolerance(kept.out_dir, "decoder", "onnx-fp16")


def test_cli_sample_takes_a_latent_size_for_any_size_exports(kl_export: Path, tmp_path: Path, capsys) -> None:
    from vae_deploy.cli import main

    out = tmp_path / "s.npy"
    assert main(["sample", str(kl_export), "-n", "2", "--seed", "7", "--latent-size", "3,5", "--out", str(out)]) == 0
    want = VAERuntime(kl_export, "cpu").sample(2, seed=7, latent_size=(3, 5))
    assert np.array_equal(np.load(out), want)
    capsys.readouterr()
    assert main(["sample", str(kl_export), "-n", "2", "--out", str(tmp_path / "t.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--latent-size" in err and err.count("\n") == 1

"""Export: real graphs from real (small) checkpoints, checked independently of vae_deploy.parity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vae_deploy import __version__
from vae_deploy.checkpoint import load_checkpoint
from vae_deploy.cli import main
from vae_deploy.contract import EXPORT_FILES, MANIFEST, META_DOWNSAMPLING_FACTOR, METADATA_KEYS, parse_manifest
from vae_deploy.errors import OutputDirError, ParityError, UsageError
from vae_deploy.export import export, model_spec
from vae_deploy.files import sha256_file
from vae_deploy.manifest import check_manifest

ALL = ("onnx", "torchscript", "pt2")
QUIET = dict(log=lambda _: None)


def _export_all(checkpoint: Path, out: Path):
    return export(checkpoint, out, formats=ALL, fp16=True, **QUIET)


@pytest.fixture(scope="session")
def mlp_export(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    return _export_all(mlp_checkpoint, tmp_path_factory.mktemp("mlp_export") / "exported")


@pytest.fixture(scope="session")
def conv_export(conv_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    return _export_all(conv_checkpoint, tmp_path_factory.mktemp("conv_export") / "exported")


@pytest.fixture(params=["mlp", "conv"])
def case(request, mlp_checkpoint, conv_checkpoint):
    """(checkpoint, ExportResult) for each architecture."""
    if request.param == "mlp":
        return mlp_checkpoint, request.getfixturevalue("mlp_export")
    return conv_checkpoint, request.getfixturevalue("conv_export")


def _ort(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _eager(checkpoint: Path, graph: str, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = getattr(load_checkpoint(checkpoint), graph)(x)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _run_torch(path: Path, fmt: str, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        if fmt == "torchscript":
            with warnings.catch_warnings():  # deprecated upstream (FutureWarning); still works
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path))
        else:
            module = torch.export.load(str(path)).module()
        out = module(x)
    return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def _inputs(checkpoint: Path, graph: str, batch: int) -> torch.Tensor:
    cfg = load_checkpoint(checkpoint).config
    g = torch.Generator().manual_seed(batch)
    if graph == "encoder":
        return torch.rand(batch, *cfg.image_shape, generator=g)
    return torch.randn(batch, cfg.latent_dim, generator=g)


# --- what gets written --------------------------------------------------------------------------


def test_both_architectures_write_every_file_and_verify(case):
    checkpoint, result = case
    names = sorted(p.name for p in result.out_dir.iterdir())
    expected = ["decoder.fp16.onnx", *(f"{g}.{fmt}" for g in ("decoder", "encoder") for fmt in ALL), MANIFEST]
    assert names == sorted(expected)
    assert set(names) <= set(EXPORT_FILES)
    assert result.report is not None and result.report.passed
    assert result.manifest["verification"]["passed"] is True
    # every graph/format ran on the CPU at batch 1, 7 and 256, and nothing failed
    ran = {(r.graph, r.format, r.batch_size) for r in result.report.rows if r.status == "pass"}
    for graph, formats in result.manifest["graphs"].items():
        for fmt in formats:
            assert {(graph, fmt, b) for b in (1, 7, 256)} <= ran
    assert not [r for r in result.report.rows if r.status == "fail"]


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_every_graph_matches_eager(case, batch):
    """Independent of vae_deploy.parity: run each file directly and compare with eager."""
    checkpoint, result = case
    contract = model_spec(load_checkpoint(checkpoint).config)
    for spec in (contract.encoder(), contract.decoder()):
        x = _inputs(checkpoint, spec.name, batch)
        ref = _eager(checkpoint, spec.name, x)
        atol = 1e-5 if spec.name == "decoder" else 1e-4
        got = _ort(result.out_dir / f"{spec.name}.onnx").run(None, {spec.input_names[0]: x.numpy()})
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, atol=atol, rtol=1e-5)
        for fmt in ("torchscript", "pt2"):
            for g, r in zip(_run_torch(result.out_dir / f"{spec.name}.{fmt}", fmt, x), ref, strict=True):
                np.testing.assert_allclose(g, r, atol=atol, rtol=1e-5)
    z = _inputs(checkpoint, "decoder", batch).numpy()
    half = _ort(result.out_dir / "decoder.fp16.onnx").run(None, {"z": z})[0]
    assert half.dtype == np.float32  # fp32 I/O: a drop-in for decoder.onnx
    np.testing.assert_allclose(half, _eager(checkpoint, "decoder", torch.from_numpy(z))[0], atol=1e-2)


@pytest.mark.parametrize("batch", [5, 300])
def test_dynamic_batch_works_for_sizes_never_seen(case, batch):
    checkpoint, result = case
    cfg = load_checkpoint(checkpoint).config
    for name in ("encoder.onnx", "decoder.onnx"):
        dims = onnx.load(str(result.out_dir / name)).graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
    x = _inputs(checkpoint, "encoder", batch)
    mu, logvar = _ort(result.out_dir / "encoder.onnx").run(None, {"x": x.numpy()})
    assert mu.shape == logvar.shape == (batch, cfg.latent_dim)
    np.testing.assert_allclose(mu, _eager(checkpoint, "encoder", x)[0], atol=1e-4, rtol=1e-5)
    z = _inputs(checkpoint, "decoder", batch)
    for fmt in ("onnx", "torchscript", "pt2"):
        path = result.out_dir / f"decoder.{fmt}"
        x_hat = _ort(path).run(None, {"z": z.numpy()})[0] if fmt == "onnx" else _run_torch(path, fmt, z)[0]
        assert x_hat.shape == (batch, *cfg.image_shape)
        np.testing.assert_allclose(x_hat, _eager(checkpoint, "decoder", z)[0], atol=1e-5)


def test_onnx_files_are_self_contained_checked_and_carry_metadata(case):
    checkpoint, result = case
    cfg = load_checkpoint(checkpoint).config
    for name, graph, precision in [
        ("encoder.onnx", "encoder", "fp32"),
        ("decoder.onnx", "decoder", "fp32"),
        ("decoder.fp16.onnx", "decoder", "fp16"),
    ]:
        path = result.out_dir / name
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        meta = {p.key: p.value for p in model.metadata_props}
        assert set(METADATA_KEYS) - {META_DOWNSAMPLING_FACTOR} <= set(meta)  # the factor: spatial latents only
        assert meta["vae_deploy.graph"] == graph
        assert meta["vae_deploy.latent_dim"] == str(cfg.latent_dim)
        assert json.loads(meta["vae_deploy.image_shape"]) == list(cfg.image_shape)
        assert json.loads(meta["vae_deploy.value_range"]) == [0.0, 1.0]
        assert meta["vae_deploy.precision"] == precision
        assert meta["vae_deploy.producer_version"] == __version__
        assert meta["vae_deploy.format_version"] == "2"
        assert json.loads(meta["vae_deploy.latent_shape"]) == [cfg.latent_dim]
        assert float(meta["vae_deploy.scaling_factor"]) == 1.0 and float(meta["vae_deploy.shift_factor"]) == 0.0
        io = [*model.graph.input, *model.graph.output]
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in io)
    half = onnx.load(str(result.out_dir / "decoder.fp16.onnx"))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert {t.data_type for t in half.graph.initializer if t.data_type in floats} == {onnx.TensorProto.FLOAT16}


def test_manifest_is_complete(case):
    checkpoint, result = case
    cfg = load_checkpoint(checkpoint).config
    m = json.loads((result.out_dir / MANIFEST).read_text())
    assert m == result.manifest
    assert m["format"] == "vae-deploy-export" and m["format_version"] == 2
    assert m["latent_dim"] == cfg.latent_dim and m["image_shape"] == list(cfg.image_shape)
    assert m["latent_shape"] == [cfg.latent_dim] and m["value_range"] == [0.0, 1.0] and m["has_logvar"] is True
    assert m["model_config"]["arch"] == cfg.arch
    assert m["source"] == {
        "kind": "checkpoint",
        "path": os.path.relpath(Path(checkpoint).resolve(), result.out_dir.resolve()),
        "abs_path": str(Path(checkpoint).resolve()),
        "sha256": sha256_file(checkpoint),
    }
    assert m["opset"] == onnx.load(str(result.out_dir / "encoder.onnx")).opset_import[0].version
    d = cfg.latent_dim
    image = ["batch", *cfg.image_shape]
    for graph, fmt_entries in m["graphs"].items():
        assert set(fmt_entries) == ({"onnx", "torchscript", "pt2", "onnx-fp16"} if graph == "decoder" else set(ALL))
        for fmt, e in fmt_entries.items():
            assert e["sha256"] == sha256_file(result.out_dir / e["file"])
            assert e["precision"] == ("fp16" if fmt == "onnx-fp16" else "fp32")
            assert e["tolerance"]["atol"] > 0 and e["tolerance"]["rtol"] >= 0
            io = [(t["name"], t["shape"], t["dtype"]) for t in e["inputs"] + e["outputs"]]
            if graph == "encoder":
                want = [
                    ("x", image, "float32"),
                    ("mu", ["batch", d], "float32"),
                    ("logvar", ["batch", d], "float32"),
                ]
            else:
                want = [("z", ["batch", d], "float32"), ("x_hat", image, "float32")]
            assert io == want
    assert check_manifest(result.out_dir) == parse_manifest(m)


# --- the files work without vae-deploy ----------------------------------------------------------


def _python(tmp_path: Path, code: str) -> str:
    """Run code in a fresh interpreter, outside the repo, and return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_onnx_decoder_runs_with_only_onnxruntime_and_numpy(mlp_export, mlp_checkpoint, tmp_path):
    z = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "ref.npy", _eager(mlp_checkpoint, "decoder", torch.from_numpy(z))[0])
    out = _python(
        tmp_path,
        f"""
        import json, sys
        import numpy as np, onnxruntime as ort
        path = {str(mlp_export.out_dir / "decoder.onnx")!r}
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        meta = s.get_modelmeta().custom_metadata_map
        d = int(meta["vae_deploy.latent_dim"])
        shape = json.loads(meta["vae_deploy.image_shape"])
        x = s.run(None, {{s.get_inputs()[0].name: np.load("z.npy")}})[0]
        assert x.shape == (3, *shape) and d == 8, (x.shape, d)
        assert np.allclose(x, np.load("ref.npy"), atol=1e-5)
        assert "torch" not in sys.modules and "vae_deploy" not in sys.modules
        print("ok", s.get_inputs()[0].name, s.get_outputs()[0].name)
        """,
    )
    assert out.split() == ["ok", "z", "x_hat"]


def test_torchscript_loads_in_a_process_that_never_imports_vae_deploy(conv_export, tmp_path):
    out = _python(
        tmp_path,
        f"""
        import sys, torch
        enc = torch.jit.load({str(conv_export.out_dir / "encoder.torchscript")!r})
        dec = torch.jit.load({str(conv_export.out_dir / "decoder.torchscript")!r})
        mu, logvar = enc(torch.rand(4, 1, 28, 28))
        x = dec(mu)
        assert "vae_deploy" not in sys.modules
        print(tuple(mu.shape), tuple(x.shape))
        """,
    )
    assert out.strip() == "(4, 2) (4, 1, 28, 28)"


# --- options and errors -------------------------------------------------------------------------


def test_opset_option_and_bad_options(mlp_checkpoint, tmp_path):
    result = export(mlp_checkpoint, tmp_path / "e", formats=("onnx",), opset=18, verify=False, **QUIET)
    assert result.manifest["opset"] == 18 and result.report is None
    assert result.manifest["verification"]["passed"] is None
    assert onnx.load(str(tmp_path / "e" / "decoder.onnx")).opset_import[0].version == 18
    with pytest.raises(UsageError, match="formats"):
        export(mlp_checkpoint, tmp_path / "f", formats=("onnx", "tflite"), **QUIET)
    with pytest.raises(UsageError, match="needs the onnx format"):
        export(mlp_checkpoint, tmp_path / "f", formats=("torchscript",), fp16=True, **QUIET)
    with pytest.raises(UsageError, match="opset"):
        export(mlp_checkpoint, tmp_path / "f", opset=9, **QUIET)
    assert not (tmp_path / "f").exists()


def test_refuses_a_folder_that_is_not_an_export(mlp_checkpoint, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(OutputDirError, match="not a vae-deploy export folder"):
        export(mlp_checkpoint, mine, formats=("torchscript",), **QUIET)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind


def test_reexport_replaces_the_old_export_as_a_unit(mlp_export, conv_checkpoint, tmp_path):
    """An mlp export (7 files) becomes a conv export with 2 files: no mix, user files kept."""
    out = tmp_path / "exported"
    shutil.copytree(mlp_export.out_dir, out)
    (out / "README.md").write_text("docs")
    (out / "notes.txt").write_text("mine")
    result = export(conv_checkpoint, out, formats=("torchscript",), **QUIET)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "decoder.torchscript", "encoder.torchscript", MANIFEST, "notes.txt"]
    assert (out / "README.md").read_text() == "docs" and (out / "notes.txt").read_text() == "mine"
    assert check_manifest(out).raw["model_config"]["arch"] == "conv" == result.manifest["model_config"]["arch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # old export and staging gone


def test_fresh_default_folder_with_only_a_readme_is_accepted(mlp_checkpoint, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "README.md").write_text("how to embed")
    export(mlp_checkpoint, out, formats=("pt2",), **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "decoder.pt2", "encoder.pt2", MANIFEST]
    assert (out / "README.md").read_text() == "how to embed"


def _break_torchscript(monkeypatch):
    """Fault injection: the TorchScript exporter writes a model with one weight nudged."""
    import dataclasses

    from vae_deploy import graph_files

    real = graph_files.export_torchscript

    def broken(traced, spec, path):
        import copy

        bad = copy.deepcopy(traced.module)
        with torch.no_grad():
            next(bad.parameters()).add_(0.05)
        real(dataclasses.replace(traced, module=bad), spec, path)

    monkeypatch.setattr(graph_files, "export_torchscript", broken)


def test_failed_verification_leaves_nothing_that_looks_valid(mlp_checkpoint, mlp_export, tmp_path, monkeypatch):
    _break_torchscript(monkeypatch)
    fresh = tmp_path / "fresh"
    with pytest.raises(ParityError, match="failed verification"):
        export(mlp_checkpoint, fresh, formats=("torchscript",), **QUIET)
    assert not fresh.exists()
    # over an earlier export: that export stays exactly as it was (still names its own files)
    old = tmp_path / "old"
    shutil.copytree(mlp_export.out_dir, old)
    before = {p.name: sha256_file(p) for p in old.iterdir()}
    with pytest.raises(ParityError):
        export(mlp_checkpoint, old, formats=("torchscript",), **QUIET)
    assert {p.name: sha256_file(p) for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no staging or aside folders
    # the CLI reports it as one line and a non-zero exit
    assert main(["export", str(mlp_checkpoint), "--out", str(fresh), "--formats", "torchscript"]) == 1
    assert not fresh.exists()


def test_cli_export_then_verify_end_to_end(mlp_checkpoint, tmp_path, capsys):
    out, report = tmp_path / "exp", tmp_path / "report.json"
    args = ["export", str(mlp_checkpoint), "--out", str(out), "--formats", "onnx,pt2", "--opset", "18"]
    assert main(args) == 0
    assert main(["verify", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "decoder  onnx" in printed and "PASS" in printed and "atol 1e-05" in printed
    data = json.loads(report.read_text())
    assert data["passed"] is True and {r["format"] for r in data["rows"]} == {"onnx", "pt2"}
    assert {r["batch_size"] for r in data["rows"] if r["status"] == "pass"} == {1, 7, 256}
    assert main(["export", str(mlp_checkpoint), "--out", str(out), "--formats", "nope"]) == 2
    assert "formats must be" in capsys.readouterr().err

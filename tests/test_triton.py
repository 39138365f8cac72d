"""`vae-deploy triton`: model repositories that Triton's own schema parses and whose configs match
the ONNX files' inputs and outputs; other models untouched; folders not ours refused."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from vae_deploy.contract import DECODER, ModelSpec
from vae_deploy.errors import ExportError, IntegrityError, UsageError
from vae_deploy.files import sha256_file
from vae_deploy.manifest import read_manifest
from vae_deploy.triton import MARKER, TritonOptions, model_config, write_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the triton extra")
from google.protobuf import text_format  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16"}


def parse(text: str):
    """Triton's ModelConfig from config.pbtxt text: syntax, field names and enum values checked."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def type_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def assert_config_matches_model(folder: Path) -> None:
    """What Triton's onnxruntime backend checks at load: every configured tensor exists in the model
    with the same type and dims (batch dim implied by max_batch_size), and no model input is left out."""
    config = parse((folder / "config.pbtxt").read_text())
    assert config.name == folder.name and config.platform == "onnxruntime_onnx"
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for configured, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        by_name = {t.name: t for t in actual}
        assert {t.name for t in configured} == set(by_name)
        for t in configured:
            model_shape = [d if isinstance(d, int) else -1 for d in by_name[t.name].shape]
            expected = model_shape[1:] if config.max_batch_size > 0 else model_shape
            assert list(t.dims) == expected, (t.name, list(t.dims), model_shape)
            assert type_name(t.data_type) == ORT_TYPES[by_name[t.name].type]
            if config.max_batch_size > 0:
                assert model_shape[0] == -1  # Triton batches along a dynamic first axis


@pytest.fixture(scope="module")
def export(mlp_onnx_export: Path) -> Path:
    return mlp_onnx_export


def test_repository_parses_with_tritons_schema_and_matches_the_onnx_files(export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    models = write_repository(export, repo, TritonOptions(name="mnist", max_batch_size=128, instances=2,
                                                          preferred_batch_sizes=(32, 128)))  # fmt: skip
    assert [m.name for m in models] == ["mnist_decoder", "mnist_encoder"]
    manifest = read_manifest(export)
    for model in models:
        assert sorted(p.name for p in model.path.iterdir()) == [MARKER, "1", "config.pbtxt"]
        assert_config_matches_model(model.path)
        config = parse(model.config)
        assert config.max_batch_size == 128
        assert list(config.dynamic_batching.preferred_batch_size) == [32, 128]
        assert config.dynamic_batching.max_queue_delay_microseconds == 100
        group = config.instance_group[0]
        assert group.count == 2 and model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator
        assert config.model_warmup[0].batch_size == 1
        # the very bytes the manifest lists (copied from the verified read, not the path)
        entry = manifest.entry(model.graph, "onnx")
        assert sha256_file(model.path / "1" / "model.onnx") == entry.sha256
        marker = json.loads((model.path / MARKER).read_text())
        assert marker["kind"] == "triton-model" and marker["contract"]["latent_shape"] == [8]
    # the served decoder is the export's decoder: same images from the copied file
    z = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    copied = ort.InferenceSession(str(repo / "mnist_decoder/1/model.onnx"), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(export / "decoder.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(copied.run(None, {"z": z})[0], original.run(None, {"z": z})[0])


def test_tensorrt_cpu_unbatched_and_fp16_settings(export: Path, tmp_path: Path) -> None:
    models = write_repository(export, tmp_path / "trt", TritonOptions(tensorrt=True, tensorrt_precision="fp16",
                                                                      max_batch_size=64))  # fmt: skip
    for model in models:
        accel = parse(model.config).optimization.execution_accelerators.gpu_execution_accelerator
        assert len(accel) == 1 and accel[0].name == "tensorrt"
        params = dict(accel[0].parameters)
        assert params["precision_mode"] == "FP16" and params["trt_engine_cache_enable"] == "1"
        name = "z" if model.graph == DECODER else "x"
        row = "8" if model.graph == DECODER else "1x28x28"
        assert params["trt_profile_min_shapes"] == f"{name}:1x{row}"
        assert params["trt_profile_max_shapes"] == f"{name}:64x{row}"
    (cpu,) = write_repository(export, tmp_path / "cpu", TritonOptions(kind="cpu", max_batch_size=0, graphs=(DECODER,),
                                                                      precision="fp16"))  # fmt: skip
    config = parse(cpu.config)
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.model_warmup[0].inputs["z"].dims) == [1, 8]  # full shape when Triton does not batch
    assert_config_matches_model(cpu.path)
    fp16 = read_manifest(export).entry(DECODER, "onnx-fp16")
    assert sha256_file(cpu.path / "1" / "model.onnx") == fp16.sha256


def test_symbolic_sizes_become_minus_one() -> None:
    spec = ModelSpec((4, "latent_height", "latent_width"), (3, "height", "width"), (-1.0, 1.0))
    for graph in (spec.decoder(), spec.encoder()):
        config = parse(model_config(graph, TritonOptions(tensorrt=True)))
        tensors = list(config.input) + list(config.output)
        assert all(list(t.dims)[1:] == [-1, -1] for t in tensors), [list(t.dims) for t in tensors]
        assert not config.model_warmup  # no fixed size to warm up with
        params = dict(config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
        assert "trt_profile_min_shapes" not in params


def test_other_models_are_untouched_and_ours_are_replaced(export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    other = repo / "resnet50"
    (other / "1").mkdir(parents=True)
    (other / "config.pbtxt").write_text('name: "resnet50"\nplatform: "onnxruntime_onnx"\n')
    (other / "1" / "model.onnx").write_bytes(b"not ours")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in other.rglob("*") if p.is_file()}
    write_repository(export, repo)
    (repo / "vae_decoder" / "README.md").write_text("notes")
    models = write_repository(export, repo, TritonOptions(max_batch_size=8))  # replaces ours, keeps the README
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in other.rglob("*") if p.is_file()} == before
    assert parse(models[0].config).max_batch_size == 8
    assert (repo / "vae_decoder" / "README.md").read_text() == "notes"
    assert sorted(p.name for p in repo.iterdir()) == ["resnet50", "vae_decoder", "vae_encoder"]  # no leftovers


def test_folders_not_ours_are_refused_and_left_as_they_are(export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    theirs = repo / "vae_decoder"
    (theirs / "1").mkdir(parents=True)
    (theirs / "config.pbtxt").write_text("their config")
    with pytest.raises(ExportError, match="not written by vae-deploy"):
        write_repository(export, repo)
    assert (theirs / "config.pbtxt").read_text() == "their config"
    assert sorted(p.name for p in repo.iterdir()) == ["vae_decoder"]  # not even the encoder was written
    # ours, but someone added a version of their own: refused too (it would be deleted)
    write_repository(export, repo, TritonOptions(name="mine"))
    (repo / "mine_decoder" / "2").mkdir()
    with pytest.raises(ExportError, match="did not write"):
        write_repository(export, repo, TritonOptions(name="mine"))
    assert (repo / "mine_decoder" / "2").is_dir()
    (repo / "file_decoder").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        write_repository(export, repo, TritonOptions(name="file"))


def test_a_tampered_export_writes_nothing(export: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "exported"
    shutil.copytree(export, copy)
    with open(copy / "encoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(IntegrityError, match="encoder.onnx"):
        write_repository(copy, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_leftovers_of_killed_writers_are_swept(export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(export, repo, TritonOptions(graphs=(DECODER,)))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = repo / f".vae_decoder.staging-{pid}-0123abcd"
    (stale / "1").mkdir(parents=True)
    live = repo / f".vae_decoder.staging-{os.getpid()}-0123abcd"  # a writer still running: kept
    live.mkdir()
    write_repository(export, repo, TritonOptions(graphs=(DECODER,)))
    assert not stale.exists() and live.exists()


def test_options_are_checked() -> None:
    for kwargs, words in [
        ({"name": "../x"}, "name"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"instances": 0}, "instances"),
        ({"kind": "tpu"}, "kind"),
        ({"kind": "cpu", "tensorrt": True}, "GPUs only"),
        ({"preferred_batch_sizes": (512,)}, "above max_batch_size"),
        ({"tensorrt_precision": "int8"}, "tensorrt_precision"),
        ({"graphs": ("vae",)}, "graphs"),
    ]:
        with pytest.raises(UsageError, match=words):
            TritonOptions(**kwargs)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from vae_deploy.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_the_repository_and_errors_are_one_line(export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    done = _cli("triton", str(export), "--repo", str(repo), "--name", "m", "--instances", "2", "--tensorrt",
                "--preferred-batch-sizes", "16,64")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {repo / 'm_decoder'}" in done.stdout and "docker run --gpus all" in done.stdout
    assert_config_matches_model(repo / "m_decoder")
    assert_config_matches_model(repo / "m_encoder")
    for args, code, words in [
        (["--repo", str(repo), "--kind", "cpu", "--tensorrt"], 2, "GPUs only"),
        (["--repo", str(repo), "--max-batch-size", "-2"], 2, "--max-batch-size"),
        (["--repo", str(repo), "--graphs", "decoder,vae"], 2, "graphs"),
        (["--repo", str(export / "manifest.json")], 2, "is a file"),
    ]:
        failed = _cli("triton", str(export), *args)
        assert failed.returncode == code, (args, failed.stderr)
        assert failed.stderr.startswith("error:") and words in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
    failed = _cli("triton", str(tmp_path / "none"), "--repo", str(repo))
    assert failed.returncode == 1 and "export folder not found" in failed.stderr


def test_example_client_builds_its_request_and_fails_in_one_line_without_a_server(tmp_path: Path) -> None:
    example = runpy.run_path(str(REPO_ROOT / "examples" / "triton_client.py"))
    z = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    inputs, outputs = example["build_request"](z)
    assert [(i.name(), i.shape(), i.datatype()) for i in inputs] == [("z", [4, 8], "FP32")]
    assert [o.name() for o in outputs] == ["x_hat"]
    assert np.array_equal(example["latents"](4, (8,), seed=0), example["latents"](4, (8,), seed=0))
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "triton_client.py"), "--url", f"127.0.0.1:{port}",
         "--out", str(tmp_path / "s.npy")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.npy").exists()

"""verify and check_manifest: parity catches altered graphs, integrity catches altered bytes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import rehash

from vae_deploy.cli import main
from vae_deploy.errors import ExportError, IntegrityError
from vae_deploy.export import export
from vae_deploy.manifest import MANIFEST
from vae_deploy.parity import VerifyReport, check_manifest, verify

QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def exported(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "exported"
    export(mlp_checkpoint, out, formats=("onnx", "torchscript", "pt2"), fp16=True, verify=False, **QUIET)
    return out


@pytest.fixture
def copy(exported: Path, tmp_path: Path) -> Path:
    """A private copy of the export that a test may tamper with."""
    return Path(shutil.copytree(exported, tmp_path / "exported"))


def _rewrite_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    edit(m)
    (folder / MANIFEST).write_text(json.dumps(m))


# --- parity -------------------------------------------------------------------------------------


def test_verify_passes_and_reports_every_backend(exported: Path, tmp_path: Path, capfd):
    report = verify(exported, batch_sizes=(1, 7, 256), json_path=tmp_path / "r.json", **QUIET)
    assert isinstance(report, VerifyReport) and report.passed
    for fmt in ("onnx", "onnx-fp16", "torchscript", "pt2"):
        rows = [r for r in report.rows if r.format == fmt and r.status == "pass"]
        assert {r.batch_size for r in rows} == {1, 7, 256}, fmt
        assert all(r.max_abs is not None and r.max_abs <= r.atol for r in rows)
    # CUDA rows are either a real CUDA run or reported as skipped with a reason, never silently CPU
    for r in report.rows:
        if r.provider == "CUDAExecutionProvider":
            assert r.status == "pass" or (r.status == "skipped" and r.reason), r
    assert "[E:onnxruntime" not in capfd.readouterr().err  # provider-load spam is captured
    table = report.table()
    assert table.splitlines()[0].split()[:4] == ["graph", "format", "prec", "provider"]
    assert "atol 1e-05" in table and "atol 1e-02" in table and "result: PASS" in table
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["passed"] and data["inputs"] == report.inputs and data["batch_sizes"] == [1, 7, 256]


def test_verify_uses_real_mnist_when_available(exported: Path, data_root: Path):
    report = verify(exported, data_root=data_root, batch_sizes=(1, 300), **QUIET)
    assert report.passed and "mnist images" in report.inputs
    assert {r.batch_size for r in report.rows if r.status == "pass"} == {1, 300}


def test_verify_fails_on_an_altered_weight_even_with_a_matching_sha256(copy: Path):
    """Parity, not integrity, must catch a graph that computes something else."""
    path = copy / "decoder.onnx"
    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if t.name.endswith("bias") and len(t.dims) == 1)
    values = onnx.numpy_helper.to_array(bias) + np.float32(0.05)
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    onnx.save_model(model, str(path))
    rehash(copy, "decoder.onnx")
    check_manifest(copy)  # integrity is fine...
    report = verify(copy, **QUIET)
    assert not report.passed  # ...parity is not
    failed = {(r.graph, r.format, r.provider) for r in report.rows if r.status == "fail"}
    assert failed == {("decoder", "onnx", "CPUExecutionProvider")}
    assert min(r.max_abs for r in report.rows if r.status == "fail") > 1e-3
    assert "FAIL" in report.table() and "failed: decoder onnx" in report.summary()
    assert main(["verify", str(copy)]) == 1


# --- integrity ----------------------------------------------------------------------------------


def test_one_changed_byte_is_an_integrity_error_naming_the_file(copy: Path):
    path = copy / "encoder.torchscript"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="encoder.torchscript"):
        verify(copy, **QUIET)
    path.unlink()
    with pytest.raises(IntegrityError, match="encoder.torchscript is missing"):
        check_manifest(copy)
    assert main(["verify", str(copy)]) == 1


def test_not_an_export_folder(tmp_path: Path, copy: Path):
    with pytest.raises(ExportError, match="not found"):
        check_manifest(tmp_path / "nope")
    with pytest.raises(ExportError, match="no manifest.json"):
        check_manifest(tmp_path)
    (copy / MANIFEST).write_text("{ not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        check_manifest(copy)
    (copy / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ExportError, match="not a vae-deploy export manifest"):
        check_manifest(copy)


def test_file_names_may_not_point_outside_the_folder(copy: Path):
    def edit(m):
        m["graphs"]["decoder"]["onnx"]["file"] = "../decoder.onnx"

    _rewrite_manifest(copy, edit)
    with pytest.raises(IntegrityError, match="plain file name"):
        check_manifest(copy)


def test_onnx_with_external_data_is_refused(copy: Path):
    path = copy / "decoder.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    rehash(copy, "decoder.onnx")
    with pytest.raises(IntegrityError, match="decoder.onnx keeps tensor .* in external file 'weights.bin'"):
        check_manifest(copy)


def test_manifest_checks_do_not_import_torch(exported: Path):
    code = (
        "import sys\nfrom vae_deploy.manifest import check_manifest\n"
        f"m = check_manifest({str(exported)!r})\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint(sorted(m.raw['graphs']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['decoder', 'encoder']"


# --- the source checkpoint ----------------------------------------------------------------------


def test_checkpoint_changed_since_export_or_wrong_architecture(mlp_checkpoint, conv_checkpoint, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    shutil.copy(mlp_checkpoint, ckpt)
    out = tmp_path / "exp"
    export(ckpt, out, formats=("torchscript",), verify=False, **QUIET)
    assert verify(out, **QUIET).passed
    shutil.copy(conv_checkpoint, ckpt)  # retrained in place
    with pytest.raises(IntegrityError, match="has changed since this export"):
        verify(out, **QUIET)
    with pytest.raises(ExportError, match="does not have the exported model's architecture"):
        verify(out, checkpoint=conv_checkpoint, **QUIET)
    assert verify(out, checkpoint=mlp_checkpoint, **QUIET).passed
    ckpt.unlink()
    with pytest.raises(ExportError, match="pass --checkpoint"):
        verify(out, **QUIET)


# --- a real GPU ---------------------------------------------------------------------------------


def _cuda_session_runs(path: Path) -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        s = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # noqa: BLE001
        return False
    return s.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.cuda
def test_cuda_rows_run_on_a_gpu(exported: Path):
    if not _cuda_session_runs(exported / "decoder.onnx"):
        pytest.skip("no working onnxruntime CUDA provider here")
    report = verify(exported, **QUIET)
    cuda = [r for r in report.rows if r.provider == "CUDAExecutionProvider"]
    assert {r.format for r in cuda if r.status == "pass"} == {"onnx", "onnx-fp16"}
    assert report.passed

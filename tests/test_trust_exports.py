"""Trust, export side: the runtime never serves the wrong tensor, no data outside the hashed bytes
reaches a session, errors say nothing about other files, results do not depend on the working
folder, re-export never touches a user's file, and forged manifests give our errors only."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import rehash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from vae_deploy.cli import main
from vae_deploy.contract import MANIFEST
from vae_deploy.errors import ExportError, IntegrityError, OutputDirError, VaeDeployError
from vae_deploy.export import export
from vae_deploy.files import sha256_file
from vae_deploy.manifest import check_manifest
from vae_deploy.runtime import VAERuntime

QUIET = dict(log=lambda _: None)


@pytest.fixture()
def folder(mlp_onnx_export: Path, tmp_path: Path) -> Path:
    return shutil.copytree(mlp_onnx_export, tmp_path / "exp")


def _cli_fails_in_one_line(args: list[str], capsys: pytest.CaptureFixture[str], expected: str) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(expected, err), err
    return err


# --- the runtime binds by name and checks the whole signature -----------------------------------


def test_decoder_with_an_extra_output_first_is_refused(folder: Path, tmp_path: Path, capsys) -> None:
    """A decoder whose first output is its logits (not x_hat) would have been served with exit 0."""
    model = onnx.load(str(folder / "decoder.onnx"))
    sigmoid = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    logits = helper.make_tensor_value_info(sigmoid.input[0], TensorProto.FLOAT, None)
    model.graph.output.insert(0, logits)
    onnx.save_model(model, str(folder / "decoder.onnx"))
    rehash(folder, "decoder.onnx")
    with pytest.raises(ExportError, match=r"decoder.onnx .*does not match its contract.*outputs"):
        VAERuntime(folder, "cpu")
    out = tmp_path / "s.npy"
    _cli_fails_in_one_line(["sample", str(folder), "-n", "2", "--out", str(out)], capsys, "does not match its contract")
    assert not out.exists()


def test_decoder_swapped_for_one_with_another_input_dtype_is_refused(folder: Path) -> None:
    model = onnx.load(str(folder / "decoder.onnx"))
    for node in model.graph.node:
        node.input[:] = ["z_f32" if name == "z" else name for name in node.input]
    model.graph.node.insert(0, helper.make_node("Cast", ["z"], ["z_f32"], to=TensorProto.FLOAT))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    onnx.save_model(model, str(folder / "decoder.onnx"))
    rehash(folder, "decoder.onnx")
    with pytest.raises(ExportError, match=r"input 'z' is tensor\(double\), expected float32"):
        VAERuntime(folder, "cpu")


# --- integrity ----------------------------------------------------------------------------------


def test_a_linked_graph_file_is_refused_without_revealing_its_target(folder: Path, tmp_path: Path, capsys) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(4096))
    (folder / "encoder.onnx").unlink()
    os.symlink(secret, folder / "encoder.onnx")
    digest = sha256_file(secret)
    with pytest.raises(IntegrityError, match="encoder.onnx in .* is a link") as info:
        check_manifest(folder)
    err = _cli_fails_in_one_line(["verify", str(folder)], capsys, "is a link")
    for text in (str(info.value), err):
        assert not any(digest[i : i + 8] in text for i in range(0, 57)), text  # nothing of its hash
    rt = VAERuntime(folder, "cpu")  # the decoder is fine; the link is refused when the encoder is used
    with pytest.raises(IntegrityError, match="is a link"):
        rt.encode(np.zeros((1, 1, 28, 28), np.float32))


def test_external_data_in_training_info_is_refused(folder: Path) -> None:
    """A tensor kind the old walk missed: an initializer of a training-info graph in an external file."""
    model = onnx.load(str(folder / "decoder.onnx"))
    init = helper.make_tensor("t", TensorProto.FLOAT, [1], [0.0])
    init.data_location = TensorProto.EXTERNAL
    init.ClearField("float_data")
    init.external_data.add(key="location", value="../../etc/passwd")
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], [init]))
    (folder / "decoder.onnx").write_bytes(model.SerializeToString())
    rehash(folder, "decoder.onnx")
    with pytest.raises(IntegrityError, match="keeps tensor 't' in external file"):
        check_manifest(folder)


def test_deeply_nested_manifest_is_one_of_our_errors(folder: Path, capsys) -> None:
    (folder / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ExportError, match="nested too deeply"):
        VAERuntime(folder, "cpu")
    _cli_fails_in_one_line(["verify", str(folder)], capsys, "nested too deeply")


# --- the source checkpoint is found the same way from anywhere ----------------------------------


def test_verify_finds_the_source_from_any_folder_and_after_a_move(mlp_checkpoint: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    shutil.copy(mlp_checkpoint, project / "runs" / "checkpoint.pt")
    here = os.getcwd()
    try:
        os.chdir(project)  # export from the project folder, with relative paths
        export("runs/checkpoint.pt", "exported", formats=("onnx",), **QUIET)
    finally:
        os.chdir(here)
    moved = shutil.move(project, tmp_path / "moved")  # the absolute path recorded is gone now
    code = (
        "import sys\nfrom vae_deploy.parity import verify\n"
        f"r = verify({str(Path(moved) / 'exported')!r}, log=lambda _: None)\n"
        "print(r.passed, r.checkpoint)"
    )
    for cwd in ("/", str(tmp_path)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
        assert proc.returncode == 0, proc.stderr[-1500:]
        assert proc.stdout.startswith("True") and "moved" in proc.stdout, proc.stdout


def test_a_changed_source_checkpoint_is_refused(mlp_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = shutil.copy(mlp_checkpoint, tmp_path / "ck.pt")
    out = export(ckpt, tmp_path / "exp", formats=("onnx",), verify=False, **QUIET).out_dir
    Path(ckpt).write_bytes(Path(ckpt).read_bytes() + b"\0")
    from vae_deploy.parity import verify

    with pytest.raises(IntegrityError, match="has changed since this export was made"):
        verify(out, **QUIET)


# --- re-export never touches a user's file --------------------------------------------------------


def test_reexport_refuses_to_replace_a_users_file_with_a_reserved_name(mlp_checkpoint: Path, tmp_path: Path) -> None:
    out = export(mlp_checkpoint, tmp_path / "exp", formats=("onnx",), verify=False, **QUIET).out_dir
    (out / "decoder.pt2").write_text("the user's own file")  # not in the manifest: not ours
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"decoder.pt2 there is not a file of the earlier export"):
        export(mlp_checkpoint, out, formats=("onnx", "pt2"), verify=False, **QUIET)
    assert (out / "decoder.pt2").read_text() == "the user's own file"
    export(mlp_checkpoint, out, formats=("onnx", "torchscript"), verify=False, **QUIET)  # no clash: kept
    assert (out / "decoder.pt2").read_text() == "the user's own file"
    assert (out / "notes.txt").read_text() == "mine" and (out / "decoder.torchscript").is_file()


# --- forged manifests: the runtime works or raises one of our errors ------------------------------

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 30), st.text(max_size=6)), max_size=5),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)
_KEYS = ["format", "format_version", "latent_shape", "latent_dim", "image_shape", "value_range", "has_logvar",
         "scaling_factor", "shift_factor", "source", "graphs"]  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES, st.booleans()), min_size=1, max_size=3))
def test_forged_manifests_give_a_runtime_or_our_error(mlp_onnx_export: Path, tmp_path_factory, edits) -> None:
    folder = shutil.copytree(mlp_onnx_export, tmp_path_factory.mktemp("fuzz") / "exp")
    manifest = json.loads((folder / MANIFEST).read_text())
    for key, value, delete in edits:
        if delete:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (folder / MANIFEST).write_text(json.dumps(manifest))
    try:
        rt = VAERuntime(folder, "cpu")
    except VaeDeployError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    x = rt.sample(2, seed=0)  # whatever loaded must still be the contract it checked
    assert x.shape == (2, *rt.image_shape) and np.isfinite(x).all()

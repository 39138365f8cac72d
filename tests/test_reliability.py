"""Reliability and security on real files and processes: killed exports, truncated or escaping ONNX
files, forged checkpoints, random input thrown at the runtime (hypothesis), and threads.

Training-side faults (SIGKILL/Ctrl-C/NaN, malicious pickles) are in test_faults.py; the runtime's
hand-picked bad inputs in test_runtime.py; flipped bytes and external data in test_verify.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import rehash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vae_deploy.checkpoint import load_checkpoint, save_safetensors
from vae_deploy.contract import MANIFEST
from vae_deploy.errors import CheckpointError, ExportError, IntegrityError, UsageError, VaeDeployError
from vae_deploy.export import export
from vae_deploy.files import sha256_file
from vae_deploy.inputs import MAX_ABS_LATENT
from vae_deploy.manifest import check_manifest
from vae_deploy.parity import verify
from vae_deploy.runtime import VAERuntime

QUIET = dict(log=lambda _: None)
# numpy warns when a huge random input overflows while being checked; the input is then refused
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
D = 8  # latent size of the conftest MLP
IMAGE = (1, 28, 28)


@pytest.fixture(scope="module")
def onnx_export(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX-only export of the conftest MLP, built once for this module."""
    out = tmp_path_factory.mktemp("rel") / "exported"
    return export(mlp_checkpoint, out, formats=("onnx",), verify=False, **QUIET).out_dir


@pytest.fixture(scope="module")
def rt(onnx_export: Path) -> VAERuntime:
    return VAERuntime(onnx_export, "cpu")


# --- export killed midway (a real subprocess, frozen and inspected, then SIGKILLed) -------------

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/stat").exists() or not hasattr(signal, "SIGSTOP"), reason="needs Linux /proc"
)


def _export_cmd(checkpoint: Path, out: Path, formats: str) -> list[str]:
    cmd = ["-m", "vae_deploy.cli", "export", str(checkpoint), "--out", str(out), "--formats", formats]
    return [sys.executable, *cmd, "--no-verify"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_stopped(pid: int) -> None:
    """Until the process is stopped (SIGSTOP delivered) or has exited."""
    for _ in range(2000):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in "TtZX":
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def _files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}


def _inspect(target: Path, old: dict[str, str] | None) -> str:
    """The state the folder is in right now: 'absent', 'old' (byte-identical) or 'new' (complete).

    Also: nothing beside the target looks like an export unless it is a complete one, and every
    leftover is a hidden, export-named sibling (never mistaken for the user's export folder).
    """
    for entry in target.parent.iterdir():
        if entry == target:
            continue
        assert entry.name.startswith(f".{target.name}."), f"unexpected {entry.name} beside the export"
        if (entry / MANIFEST).exists():
            check_manifest(entry)  # a folder holding a manifest is complete: manifest is written last
    if not target.exists():
        return "absent"
    files = _files(target)
    if old is not None and files == old:
        return "old"
    manifest = check_manifest(target)  # raises for anything partial, mixed or unverified
    listed = {entry.file for entry in manifest.files}
    user_files = {"README.md"} if old is not None else set()  # carried over from the old export
    assert set(files) == listed | {MANIFEST} | user_files
    return "new"


def _run_export(cmd: list[str], target: Path, old: dict[str, str] | None, kill, rng: random.Random):
    """Run an export, freezing it (SIGSTOP) at random moments to inspect the folder, and SIGKILL it
    at the first moment ``kill(staging_files)`` says so. Returns (states seen, return code)."""
    seen: list[str] = []
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGSTOP)
            _wait_stopped(proc.pid)
            staging = [p for p in target.parent.glob(f".{target.name}.export-*") if p.is_dir()]
            names = sorted(q.name for p in staging for q in p.iterdir())
            seen.append(_inspect(target, old))
            if kill(names):
                proc.kill()
                proc.wait()
                return seen, -9
            proc.send_signal(signal.SIGCONT)
        return seen, proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="module")
def old_export(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete torchscript export with a user README: the 'previous export' that must survive."""
    out = tmp_path_factory.mktemp("old") / "exported"
    export(mlp_checkpoint, out, formats=("torchscript",), verify=False, **QUIET)
    (out / "README.md").write_text("notes the user keeps here")
    return out


@needs_proc
def test_export_killed_while_writing_leaves_the_previous_export_intact(
    mlp_checkpoint: Path, old_export: Path, tmp_path: Path
) -> None:
    target = shutil.copytree(old_export, tmp_path / "exported")
    old = _files(target)
    rng = random.Random(0)
    seen, rc = _run_export(
        _export_cmd(mlp_checkpoint, target, "onnx,torchscript"),
        target,
        old,
        kill=lambda names: "encoder.onnx" in names,  # mid-export: one graph written, others not
        rng=rng,
    )
    assert rc == -9 and set(seen) == {"old"}, seen
    assert _inspect(target, old) == "old" and _files(target) == old
    check_manifest(target)
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(p.name.startswith(".exported.export-") for p in leftovers)
    assert not any((p / MANIFEST).exists() for p in leftovers)  # never looks like an export
    # the next export (same target) completes and sweeps the dead process's staging folder
    export(mlp_checkpoint, target, formats=("onnx",), verify=False, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert sorted(_files(target)) == ["README.md", "decoder.onnx", "encoder.onnx", MANIFEST]
    assert (target / "README.md").read_text() == "notes the user keeps here"


@needs_proc
def test_export_frozen_at_random_moments_is_always_old_or_new(
    mlp_checkpoint: Path, old_export: Path, tmp_path: Path
) -> None:
    """Inspect the folder at many moments of a whole re-export: never absent, never a mix."""
    target = shutil.copytree(old_export, tmp_path / "exported")
    old = _files(target)
    seen, rc = _run_export(
        _export_cmd(mlp_checkpoint, target, "onnx"), target, old, kill=lambda _: False, rng=random.Random(1)
    )
    assert rc == 0 and len(seen) >= 10
    assert set(seen) <= {"old", "new"} and seen[0] == "old", seen
    assert seen == sorted(seen, key=["old", "new"].index)  # old, then new: never back
    assert _inspect(target, old) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # nothing left behind
    assert (target / "README.md").read_text() == "notes the user keeps here"


@needs_proc
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_fresh_export_killed_at_any_moment_leaves_nothing_that_looks_valid(
    mlp_checkpoint: Path, tmp_path: Path, delay: float
) -> None:
    """A first export into a new folder, killed once its staging folder exists (plus a delay)."""
    target = tmp_path / "exported"
    proc = subprocess.Popen(
        _export_cmd(mlp_checkpoint, target, "torchscript"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if any(tmp_path.glob(".exported.export-*")):
            time.sleep(delay)
            break
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert _inspect(target, None) in ("absent", "new")
    export(mlp_checkpoint, target, formats=("torchscript",), verify=False, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert _inspect(target, None) == "new"


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_old_export_left_aside_by_a_killed_fallback_install_is_put_back(
    mlp_checkpoint: Path, old_export: Path, tmp_path: Path
) -> None:
    """Where no atomic exchange exists the install is two renames; a kill between them leaves the
    old export in '.NAME.old-PID-*'. The next export restores it first, so its README survives."""
    aside = shutil.copytree(old_export, tmp_path / f".exported.old-{_dead_pid()}-0123abcd")
    target = tmp_path / "exported"
    export(mlp_checkpoint, target, formats=("onnx",), verify=False, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"] and not aside.exists()
    assert (target / "README.md").read_text() == "notes the user keeps here"
    assert _inspect(target, _files(old_export)) == "new"


def test_staging_of_a_live_export_is_not_swept(mlp_checkpoint: Path, tmp_path: Path) -> None:
    """Only a dead process's staging folder is removed: a running export (this pid) keeps its own."""
    live = tmp_path / f".exported.export-{os.getpid()}-abcdef012345"
    live.mkdir()
    (live / "decoder.onnx").write_bytes(b"half")
    export(mlp_checkpoint, tmp_path / "exported", formats=("torchscript",), verify=False, **QUIET)
    assert (live / "decoder.onnx").read_bytes() == b"half"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "exported"]


# --- truncated, broken or escaping ONNX files (manifest sha256 updated to match) ----------------


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (0.5, "decoder.onnx is not a readable ONNX model"),
        (0.0, "decoder.onnx is not a readable ONNX model"),  # an empty file
        (0.97, "decoder.onnx is not a readable ONNX model"),
    ],
)
def test_truncated_onnx_with_matching_sha256_is_refused_naming_the_file(
    onnx_export: Path, tmp_path: Path, cut: float, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from vae_deploy.cli import main
    from vae_deploy.parity import verify

    folder = shutil.copytree(onnx_export, tmp_path / "exp")
    data = (folder / "decoder.onnx").read_bytes()
    (folder / "decoder.onnx").write_bytes(data[: int(len(data) * cut)])
    rehash(folder, "decoder.onnx")
    with pytest.raises(ExportError, match=r"decoder.onnx in .* cannot be loaded by onnxruntime"):
        VAERuntime(folder, "cpu")  # the runtime hands onnxruntime the verified bytes themselves
    with pytest.raises(IntegrityError, match=expected):
        verify(folder, **QUIET)
    for args in (
        ["verify", str(folder)],
        ["sample", str(folder), "-n", "2", "--out", str(tmp_path / "s.png")],
    ):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: decoder.onnx") and err.count("\n") == 1, err
    assert not (tmp_path / "s.png").exists()


def test_onnx_graph_onnxruntime_cannot_load_is_a_clear_error(onnx_export: Path, tmp_path: Path) -> None:
    """A well-formed protobuf whose graph is invalid (unknown op): our error, not an ORT dump."""
    folder = shutil.copytree(onnx_export, tmp_path / "exp")
    model = onnx.load(str(folder / "decoder.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save_model(model, str(folder / "decoder.onnx"))
    rehash(folder, "decoder.onnx")
    with pytest.raises(ExportError, match=r"decoder.onnx in .* cannot be loaded by onnxruntime"):
        VAERuntime(folder, "cpu")


def test_truncated_encoder_is_refused_when_first_used(onnx_export: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(onnx_export, tmp_path / "exp")
    data = (folder / "encoder.onnx").read_bytes()
    (folder / "encoder.onnx").write_bytes(data[: len(data) // 2])
    rehash(folder, "encoder.onnx")
    rt = VAERuntime(folder, "cpu")  # opens (and checks) only the decoder
    with pytest.raises(ExportError, match=r"encoder.onnx in .* cannot be loaded by onnxruntime"):
        rt.encode(np.zeros((1, 1, 28, 28), np.float32))  # the encoder's file, when first used
    with pytest.raises(IntegrityError, match="encoder.onnx is not a readable ONNX model"):
        verify(folder, **QUIET)


def test_runtime_refuses_external_data_outside_the_folder(
    onnx_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """decoder.onnx points at '../secret.bin' (beside the export): refused before any session reads it."""
    from vae_deploy.cli import main

    folder = shutil.copytree(onnx_export, tmp_path / "exp")
    model = onnx.load(str(folder / "decoder.onnx"))
    onnx.save_model(model, str(folder / "decoder.onnx"), save_as_external_data=True, location="w.bin")
    escaped = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    for tensor in escaped.graph.initializer:
        for item in tensor.external_data:
            if item.key == "location":
                item.value = "../secret.bin"
    onnx.save_model(escaped, str(folder / "decoder.onnx"))
    os.replace(folder / "w.bin", tmp_path / "secret.bin")
    rehash(folder, "decoder.onnx")
    assert sorted(p.name for p in folder.iterdir()) == ["decoder.onnx", "encoder.onnx", MANIFEST]
    with pytest.raises(ExportError, match=r"decoder.onnx in .* cannot be loaded by onnxruntime.*[Ee]xternal data"):
        VAERuntime(folder, "cpu")  # onnxruntime refuses external data in a model given as bytes
    with pytest.raises(IntegrityError, match=r"decoder.onnx keeps tensor .* in external file '\.\./secret\.bin'"):
        check_manifest(folder)  # verify's check says precisely what is wrong
    assert main(["sample", str(folder), "-n", "2", "--out", str(tmp_path / "s.npy")]) == 1
    assert "../secret.bin" in capsys.readouterr().err


# --- forged checkpoints: valid-looking files that must not load ---------------------------------


def _first(sd: dict) -> str:
    return next(iter(sd))


_FORGERIES = {
    "weights of the wrong shape": (
        lambda s: s["state_dict"].__setitem__(_first(s["state_dict"]), torch.zeros(3, 3)),
        r"weights do not fit the model config \(encoder.* has shape \[3, 3\], the config needs \[64, 784\]",
    ),
    "a missing weight": (lambda s: s["state_dict"].pop(_first(s["state_dict"])), "missing"),
    "an extra weight": (lambda s: s["state_dict"].__setitem__("evil", torch.zeros(1)), "unexpected"),
    "a future format_version": (lambda s: s.__setitem__("format_version", 99), "newer than this"),
    "a string format_version": (lambda s: s.__setitem__("format_version", "2"), "no valid format_version"),
    "no model_config": (lambda s: s.pop("model_config"), "model_config is a NoneType"),
    "a string model_config": (lambda s: s.__setitem__("model_config", "mlp"), "model_config is a str"),
    "a non-numeric latent_dim": (
        lambda s: s["model_config"].__setitem__("latent_dim", "x"),
        "no valid model config",
    ),
    "a huge architecture": (  # must be refused on the meta device, not by running out of memory
        lambda s: s["model_config"].__setitem__("hidden", [10**9]),
        r"has shape \[64, 784\], the config needs \[1000000000, 784\]",
    ),
    "a state_dict that is a list": (lambda s: s.__setitem__("state_dict", [1, 2]), "state_dict is a list"),
    "a weight that is not a tensor": (
        lambda s: s["state_dict"].__setitem__(_first(s["state_dict"]), 5),
        "expected a tensor",
    ),
    "NaN weights": (
        lambda s: s["state_dict"][_first(s["state_dict"])].fill_(float("nan")),
        "NaN or infinite",
    ),
    "a string train_config": (lambda s: s.__setitem__("train_config", "x"), "train_config is a str"),
}


@pytest.mark.parametrize("case", sorted(_FORGERIES))
def test_forged_checkpoint_is_a_clear_checkpoint_error(mlp_checkpoint: Path, tmp_path: Path, case: str) -> None:
    mutate, expected = _FORGERIES[case]
    state = torch.load(mlp_checkpoint, weights_only=True)
    mutate(state)
    path = tmp_path / "forged.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        export(path, tmp_path / "out", formats=("torchscript",), verify=False, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forged.pt"]  # nothing written


def test_forged_safetensors_is_a_clear_checkpoint_error(mlp_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    good = save_safetensors(tmp_path / "good.safetensors", load_checkpoint(mlp_checkpoint))
    with open(good, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta, tensors = header["__metadata__"], load_file(good)

    def forged(name: str, meta_edit: dict, tensor_edit=None) -> Path:
        ts = dict(tensors)
        if tensor_edit:
            tensor_edit(ts)
        save_file(ts, tmp_path / name, metadata={**meta, **meta_edit})
        return tmp_path / name

    cases = [
        (forged("future.safetensors", {"format_version": "7"}), "newer than this"),
        (forged("garbled.safetensors", {"model_config": "{not json"}), "garbled vae-deploy metadata"),
        (forged("version.safetensors", {"format_version": "one"}), "garbled vae-deploy metadata"),
        (forged("cfg.safetensors", {"model_config": json.dumps({"arch": "mlp", "latent_dim": 3})}), "shape"),
        (
            forged("shape.safetensors", {}, lambda ts: ts.__setitem__(_first(ts), torch.zeros(2, 2))),
            r"has shape \[2, 2\]",
        ),
    ]
    for path, expected in cases:
        with pytest.raises(CheckpointError, match=expected):
            load_checkpoint(path)


# --- property-based: random shapes, dtypes and values at the runtime ----------------------------

_DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
    np.complex64,
    object,
    str,
]
_VALUES = ["unit", "normal", "nan", "inf", "-inf", "huge", "float32-max", "negative", "above-one", "255"]


def _fill(shape: tuple[int, ...], kind: str, seed: int) -> np.ndarray:
    """float64 values of one kind: in [0, 1], normal, with a NaN/inf sprinkled in, huge, ..."""
    rng = np.random.default_rng(seed)
    base = rng.random(shape) if kind in ("unit", "nan", "inf", "-inf") else rng.standard_normal(shape)
    special = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    if kind in special and base.size:
        base.flat[rng.integers(base.size)] = special[kind]
    if kind == "float32-max":  # finite in float32, but where a decoder's arithmetic overflows
        return np.full(shape, 3.4e38 * rng.choice([-1.0, 1.0]))
    scale = {"huge": 1e30, "negative": -1.0, "above-one": 1.0, "255": 255.0}
    if kind in scale:
        base = np.abs(base) * scale[kind] + (1.0 if kind == "above-one" else 0.0)
        if kind == "255":
            base = np.round(base) % 256
    return base


def _cast(values: np.ndarray, dtype) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if dtype is str:
            return values.astype(str)
        return values.astype(dtype)


@st.composite
def arrays(draw, right_shapes: list[tuple[int, ...]]):
    """An array of random rank (0-5) and sizes (0-5), or of a right shape; any dtype; any values."""
    if draw(st.booleans()):
        shape = draw(st.sampled_from(right_shapes))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=5)))
    values = _fill(shape, draw(st.sampled_from(_VALUES)), draw(st.integers(0, 2**32 - 1)))
    return _cast(values, draw(st.sampled_from(_DTYPES)))


_PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _is_image(out: np.ndarray, shape: tuple[int, ...]) -> None:
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


@_PROPERTY
@given(z=st.one_of(arrays([(1, D), (2, D), (5, D), (D,), (0, D), (3, D + 1)]), st.sampled_from(["z", None, 3])))
def test_decode_gives_a_correct_result_or_a_documented_error(rt: VAERuntime, z) -> None:
    try:
        out = rt.decode(z)
    except VaeDeployError as exc:
        assert isinstance(exc, UsageError) and str(exc)
        return
    a = np.asarray(z)
    assert a.dtype.kind in "fiu" and a.shape[-1:] == (D,) and a.ndim in (1, 2) and a.size > 0
    z32 = a.astype(np.float32)
    assert np.isfinite(z32).all() and np.abs(z32).max() <= MAX_ABS_LATENT
    _is_image(out, (*a.shape[:-1], *IMAGE))
    assert np.array_equal(out, rt.decode(np.ascontiguousarray(z32)))


_IMAGE_SHAPES = [(1, *IMAGE), (3, *IMAGE), IMAGE, (0, *IMAGE), (2, 1, 28, 27), (2, 3, 28, 28)]


@_PROPERTY
@given(x=arrays(_IMAGE_SHAPES))
def test_encode_and_reconstruct_give_correct_results_or_documented_errors(rt: VAERuntime, x) -> None:
    try:
        mu, logvar = rt.encode(x)
    except VaeDeployError as exc:
        assert isinstance(exc, UsageError) and str(exc)
        with pytest.raises(UsageError):
            rt.reconstruct(x)
        return
    assert x.dtype.kind in "fiu" and x.size > 0 and tuple(x.shape[-3:]) == IMAGE
    x32 = x.astype(np.float32)
    assert np.isfinite(x32).all() and x32.min() >= 0.0 and x32.max() <= 1.0
    lead = x.shape[:-3]
    for out in (mu, logvar):
        assert out.shape == (*lead, D) and out.dtype == np.float32 and np.isfinite(out).all()
    want_mu, want_logvar = rt.encode(np.ascontiguousarray(x32))
    assert np.array_equal(mu, want_mu) and np.array_equal(logvar, want_logvar)
    rec = rt.reconstruct(x)
    _is_image(rec, (*lead, *IMAGE))
    assert np.array_equal(rec, rt.decode(want_mu))


_COUNTS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0, 10**12, 2**63, -(10**12), 2.0, 2.5, float("nan"), "8", None, True, np.int64(5)]),
)


@_PROPERTY
@given(
    n=_COUNTS,
    batch_size=st.one_of(st.none(), _COUNTS, st.just(10**18)),
    seed=st.one_of(st.integers(0, 2**64), st.sampled_from([-1, 1.5, "7", np.uint32(9)])),
    bernoulli=st.booleans(),
)
def test_sample_gives_a_correct_result_or_a_documented_error(rt: VAERuntime, n, batch_size, seed, bernoulli) -> None:
    try:
        images = rt.sample(n, seed=seed, batch_size=batch_size, bernoulli=bernoulli)
    except VaeDeployError as exc:
        assert isinstance(exc, UsageError) and str(exc)
        return
    assert isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 1 <= n <= 40
    assert batch_size is None or (isinstance(batch_size, (int, np.integer)) and batch_size >= 1)
    _is_image(images, (n, *IMAGE))
    if bernoulli:
        assert set(np.unique(images)) <= {0.0, 1.0}
    assert np.array_equal(images, rt.sample(int(n), seed=int(seed), bernoulli=bernoulli))  # batch-size free
    streamed = list(rt.sample_iter(n, seed=seed, batch_size=batch_size, bernoulli=bernoulli))
    assert np.array_equal(np.concatenate(streamed), images)


# --- threads: one runtime, every method at once -------------------------------------------------


def test_sixteen_threads_mixing_every_method_match_sequential_calls(rt: VAERuntime) -> None:
    """test_runtime covers decode+sample on 8 threads; here encode/reconstruct/Bernoulli/streams
    join in, on 16 threads that all start at once, each call checked against its sequential twin."""
    rng = np.random.default_rng(3)
    zs = [rng.standard_normal((b, D), dtype=np.float32) for b in (1, 4, 16, 17, 100, 300)]
    xs = [rt.decode(z) for z in zs]
    calls = []
    for i in range(6):
        calls += [
            ("decode", lambda i=i: rt.decode(zs[i])),
            ("encode", lambda i=i: np.concatenate(rt.encode(xs[i]), axis=1)),
            ("reconstruct", lambda i=i: rt.reconstruct(xs[i])),
            ("sample", lambda i=i: rt.sample(200 + i, seed=i, batch_size=7 + i)),
            ("bernoulli", lambda i=i: rt.sample(50, seed=i, bernoulli=True, batch_size=3)),
            ("stream", lambda i=i: np.concatenate(list(rt.sample_iter(90, seed=i, batch_size=16)))),
        ]
    want = [fn() for _, fn in calls]
    threads = 16
    barrier = threading.Barrier(threads)

    def work(t: int) -> list[tuple[int, np.ndarray]]:
        barrier.wait()
        order = list(range(len(calls)))
        random.Random(t).shuffle(order)
        return [(k, calls[k][1]()) for k in order[:12]]

    with ThreadPoolExecutor(threads) as pool:
        results = [r for rs in pool.map(work, range(threads)) for r in rs]
    assert len(results) == threads * 12
    for k, got in results:
        assert np.array_equal(got, want[k]), calls[k][0]


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
def test_swap_folder_in_replaces_as_a_unit_with_and_without_an_atomic_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, atomic: bool
) -> None:
    """The one folder swap that export and triton use: the target ends as the new folder, staging
    holds the old one, and no '.old-' folder is left beside it, whether or not the filesystem can
    exchange two paths atomically."""
    from vae_deploy import files

    if not atomic:
        monkeypatch.setattr(files, "exchange", lambda a, b: False)
    target = tmp_path / "model"
    target.mkdir()
    (target / "v").write_text("old")
    staging = files.folder_sibling(target, "staging")
    staging.mkdir()
    (staging / "v").write_text("new")
    files.swap_folder_in(staging, target)
    assert (target / "v").read_text() == "new"
    assert not staging.exists() or (staging / "v").read_text() == "old"
    assert not list(tmp_path.glob(".model.old-*"))
    with pytest.raises(ValueError, match="must be one of"):
        files.folder_sibling(target, "tmp")


def test_sweep_folder_leftovers_keeps_live_writers_and_other_names(tmp_path: Path) -> None:
    """Leftovers of dead writers go (an aside old folder comes back when the target is missing);
    a live writer's folder, another target's and a symlink stay."""
    from vae_deploy import files

    dead, live = _dead_pid(), os.getpid()
    target = tmp_path / "exported"
    stale = tmp_path / f".exported.export-{dead}-00ff"
    running = tmp_path / f".exported.staging-{live}-00ff"
    other = tmp_path / f".exported.b.old-{dead}-00ff"  # a target named "exported.b"
    aside = tmp_path / f".exported.old-{dead}-00ff"
    for folder in (stale, running, other, aside):
        folder.mkdir()
    (aside / "manifest.json").write_text("{}")
    files.sweep_folder_leftovers(target)
    assert not stale.exists() and running.exists() and other.exists()
    assert (target / "manifest.json").exists() and not aside.exists()

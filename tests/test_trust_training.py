"""Trust on the training side: output folders, strict configs, honest resume, checkpoint pairs,
bounded checkpoint loading. Each test reproduces a bug an adversarial probe found."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vae_deploy.checkpoint import load_checkpoint, read_checkpoint
from vae_deploy.cli import main
from vae_deploy.config import make_configs, model_config_from_dict, to_dict, train_config_from_dict
from vae_deploy.errors import CheckpointError, ConfigError, OutputDirError
from vae_deploy.files import sha256_file
from vae_deploy.outdir import MARKER, check_output_dir, claim_output_dir, is_ours, marker_kind
from vae_deploy.training import train

QUIET = {"progress": False, "log": lambda _: None}


def _cfg(out: Path, data_root: Path, **kw):
    """A tiny MLP on the first 512 real MNIST training images: 8 batches of 64 per epoch."""
    train_kw = dict(dataset="mnist", data_root=str(data_root), epochs=2, batch_size=64, train_limit=512)
    train_kw.update(val_limit=200, out=str(out), **kw)
    return make_configs({"arch": "mlp", "latent_dim": 4, "hidden": [32]}, train_kw)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _train_args(out: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "train",
        *("--dataset", "mnist", "--data-root", str(data_root), "--train-limit", "512"),
        *("--latent-dim", "4", "--hidden", "32", "--batch-size", "64", "--epochs", "2"),
        *("--out", str(out), "--no-progress", *extra),
    ]


@pytest.fixture
def old_run(mlp_checkpoint: Path, tmp_path: Path) -> Path:
    """A run folder as older vae-deploy left it: a real checkpoint, no marker."""
    run = shutil.copytree(mlp_checkpoint.parent, tmp_path / "old_run")
    (run / MARKER).unlink(missing_ok=True)
    return run


# --- output folders -----------------------------------------------------------------------------


def test_demo_keeps_the_users_files_when_it_fails(old_run: Path, tmp_path: Path, capsys) -> None:
    """Was: ``demo --out DIR`` ran rmtree(DIR) because DIR held a checkpoint.pt, then failed."""
    (old_run / "notes.txt").write_text("mine")
    before = sorted(p.name for p in old_run.iterdir())
    code = main(["demo", "--data-root", str(tmp_path / "nope"), "--out", str(old_run), "--no-bench"])
    assert code == 1 and "mnist not found" in _one_line_error(capsys)
    assert sorted(p.name for p in old_run.iterdir()) == before
    assert (old_run / "notes.txt").read_text() == "mine"


def test_demo_replaces_only_its_own_files(old_run: Path, tmp_path: Path) -> None:
    from vae_deploy.demo import REFERENCE_MODEL, run_demo

    (old_run / "notes.txt").write_text("mine")
    result = run_demo(
        dataset="synthetic",
        epochs=1,
        out=old_run,
        export_dir=tmp_path / "exported",
        bench=False,
        formats=("onnx",),
        log=lambda _: None,
    )
    assert result.verified and result.samples == old_run / "samples.png" and result.samples.is_file()
    assert (old_run / "notes.txt").read_text() == "mine"
    assert load_checkpoint(result.checkpoint).config == REFERENCE_MODEL
    assert [r["epoch"] for r in _rows(old_run)] == [1] and marker_kind(old_run) == "run"
    with pytest.raises(OutputDirError, match="an export into .* a vae-deploy run folder"):  # before training
        run_demo(dataset="synthetic", out=tmp_path / "r2", export_dir=old_run, log=lambda _: None)
    assert not (tmp_path / "r2").exists()


def test_train_refuses_a_folder_holding_the_users_files(tmp_path: Path, data_root: Path, capsys) -> None:
    """Was: ``train --out DIR`` silently overwrote the user's config.json and metrics.jsonl."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "metrics.jsonl").write_text("my numbers\n")
    assert main(_train_args(out, data_root, "--max-steps", "1")) == 1
    assert "refusing to write into" in _one_line_error(capsys)
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl"]


def test_folder_rule(tmp_path: Path, old_run: Path) -> None:
    fresh = tmp_path / "fresh"
    assert not check_output_dir(fresh, "run")
    assert claim_output_dir(fresh, "run") == fresh and marker_kind(fresh) == "run" and is_ours(fresh)
    readme = tmp_path / "readme"
    readme.mkdir()
    (readme / "README.md").write_text("runs go here")
    claim_output_dir(readme, "run")
    assert (readme / "README.md").read_text() == "runs go here"
    with pytest.raises(OutputDirError, match="is a vae-deploy run folder"):
        claim_output_dir(fresh, "export")
    assert is_ours(old_run, "run") and not is_ours(old_run, "export")  # recognised by its checkpoint
    with pytest.raises(OutputDirError, match="nothing to resume"):
        check_output_dir(readme.with_name("absent"), "run", resume=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputDirError, match="not a folder"):
        claim_output_dir(tmp_path / "afile", "run")
    export = tmp_path / "export"
    export.mkdir()
    manifest = {"format": "vae-deploy-export", "format_version": 1, "latent_dim": 8, "image_shape": [1, 28, 28]}
    manifest["graphs"] = {"decoder": {"onnx": {"file": "decoder.onnx", "sha256": "0" * 64}}}
    (export / "manifest.json").write_text(json.dumps(manifest))
    assert is_ours(export, "export") and check_output_dir(export, "export")
    (export / "manifest.json").write_text('{"format": "someone-else"}')
    with pytest.raises(OutputDirError, match="holds manifest.json"):
        check_output_dir(export, "export")


def test_resume_adopts_an_old_run_folder(old_run: Path) -> None:
    mc, tc = make_configs(
        {"arch": "mlp", "latent_dim": 8, "hidden": [64], "conv_channels": [8, 16]},
        {"dataset": "synthetic", "epochs": 1, "batch_size": 64, "max_steps": 22, "out": str(old_run)},
    )
    result = train(mc, tc, resume=True, **QUIET)
    assert result.history[-1]["step"] == 22 and marker_kind(old_run) == "run"


def test_stale_temp_files_are_swept_and_live_ones_kept(tmp_path: Path, data_root: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        train(*_cfg(out, data_root, max_steps=2), **QUIET)
        stale = out / f".checkpoint.pt.{dead.pid}.0123456789ab.tmp"
        busy = out / f".metrics.jsonl.{live.pid}.ba9876543210.tmp"
        stale.write_bytes(b"half a checkpoint")
        busy.write_bytes(b"being written")
        train(*_cfg(out, data_root, max_steps=3), resume=True, **QUIET)
        assert not stale.exists() and busy.exists()
    finally:
        live.kill()
        live.wait()


# --- strict configs -----------------------------------------------------------------------------

_BAD_RECIPES = {
    'binarize = "false"': ("train", "binarize must be a boolean"),
    "latent_dim = true": ("model", "latent_dim must be an integer, got True"),
    'latent_dim = "3"': ("model", "latent_dim must be an integer, got '3'"),
    "latent_dim = 3.0": ("model", "latent_dim must be an integer"),
    "lr = nan": ("train", "lr must be a finite number"),
    "beta = inf": ("train", "beta must be a finite number"),
    "hidden = 400": ("model", "hidden must be a list of integers"),
    "hidden = [400, true]": ("model", "hidden must be a list of integers"),
    "image_shape = [1, 28]": ("model", "image_shape must be a list of 3 integers"),
    "seed = -1": ("train", "seed must be an integer >= 0"),
    "max_steps = 0": ("train", "max_steps must be a positive integer"),
    "epochs = 9223372036854775807": ("train", "epochs must be at most"),
}


@pytest.mark.parametrize("line", sorted(_BAD_RECIPES))
def test_recipe_values_are_strictly_typed(line: str, tmp_path: Path, capsys) -> None:
    """Was: ``binarize = "false"`` trained on binarized data (a non-empty string is truthy)."""
    table, message = _BAD_RECIPES[line]
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[{table}]\n{line}\n")
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--dataset", "synthetic", "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"bad value in [{table}]" in err and message in err
    assert not out.exists()


def test_typed_values_that_are_right_pass() -> None:
    mc, tc = make_configs({"hidden": [64, 32], "image_shape": (1, 28, 28)}, {"lr": 1, "binarize": False})
    assert mc.hidden == (64, 32) and tc.lr == 1.0 and isinstance(tc.lr, float) and tc.binarize is False
    assert model_config_from_dict(to_dict(mc)) == mc and train_config_from_dict(to_dict(tc)) == tc


_CHECKPOINT_CONFIGS = {
    "lr nan": ("train_config", "lr", float("nan")),
    "lr text": ("train_config", "lr", "0.1"),
    "binarize text": ("train_config", "binarize", "false"),
    "latent_dim inf": ("model_config", "latent_dim", float("inf")),
    "hidden nan": ("model_config", "hidden", [float("nan")]),
    "latent_dim huge": ("model_config", "latent_dim", 10**30),
}


@pytest.mark.parametrize("case", sorted(_CHECKPOINT_CONFIGS))
def test_bad_config_values_in_a_checkpoint_are_checkpoint_errors(
    case: str, mlp_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    table, key, value = _CHECKPOINT_CONFIGS[case]
    state = torch.load(mlp_checkpoint, weights_only=True)
    state[table][key] = value
    path = tmp_path / "forged.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"no valid {table.replace('_config', '')} config: .*{key}"):
        read_checkpoint(path)
    assert main(["evaluate", str(path), "--limit", "8", "--k", "2"]) == 1
    assert key in _one_line_error(capsys)


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 2**40), st.booleans(), st.floats(), st.text(max_size=3)), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_MODEL_KEYS = ["arch", "latent_dim", "hidden", "activation", "conv_channels", "image_shape", "width"]
_TRAIN_KEYS = ["dataset", "binarize", "epochs", "batch_size", "lr", "beta", "seed", "max_steps", "out", "x"]


@settings(max_examples=100, deadline=None)
@given(
    model=st.dictionaries(st.sampled_from(_MODEL_KEYS), _VALUES, max_size=4),
    train_=st.dictionaries(st.sampled_from(_TRAIN_KEYS), _VALUES, max_size=4),
)
def test_random_configs_are_valid_or_a_config_error(model: dict, train_: dict) -> None:
    try:
        mc, tc = make_configs(model, train_)
    except ConfigError as exc:
        assert str(exc).startswith(("bad value in", "unknown key")), exc
        return
    for cfg in (mc, tc):  # a valid config holds exactly the declared types, and round-trips
        for key, value in to_dict(cfg).items():
            assert not isinstance(value, float) or math.isfinite(value), key
    assert isinstance(tc.binarize, bool) and type(mc.latent_dim) is int and 1 <= mc.latent_dim < 2**31
    assert model_config_from_dict(to_dict(mc)) == mc and train_config_from_dict(to_dict(tc)) == tc


# --- resume -------------------------------------------------------------------------------------


def test_max_steps_then_resume_gives_one_row_per_whole_epoch(tmp_path: Path, data_root: Path) -> None:
    """Was: a second row for the same epoch, its train loss over the resumed part only."""
    full = train(*_cfg(tmp_path / "full", data_root), **QUIET)
    part = tmp_path / "part"
    first = train(*_cfg(part, data_root, max_steps=3), **QUIET)
    assert [(r["epoch"], r.get("partial"), r["batches"]) for r in _rows(part)] == [(1, True, 3)]
    assert first.history == _rows(part)
    resumed = train(*_cfg(part, data_root), resume=True, **QUIET)
    rows = _rows(part)
    assert [r["epoch"] for r in rows] == [1, 2] and not any(r.get("partial") for r in rows)
    assert resumed.history == rows
    for got, want in zip(rows, full.history):
        for key in ("step", "train_loss", "train_recon", "train_kl", "val_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_resume_with_nothing_left_writes_no_empty_epoch(tmp_path: Path, data_root: Path) -> None:
    """Was: resuming at --max-steps logged an epoch of zero steps as 'train 0.00'."""
    out = tmp_path / "run"
    train(*_cfg(out, data_root, max_steps=3), **QUIET)
    before = (out / "metrics.jsonl").read_text()
    result = train(*_cfg(out, data_root, max_steps=3), resume=True, **QUIET)
    assert (out / "metrics.jsonl").read_text() == before and all(r["train_loss"] > 0 for r in _rows(out))
    assert result.history == []  # no finished epoch


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("--batch-size", "32", "batch_size=64"),
        ("--seed", "5", "seed=0"),
        ("--train-limit", "640", "train_limit=512"),
        ("--dataset", "synthetic", "dataset='mnist'"),
    ],
)
def test_resume_refuses_a_changed_data_order(
    option: str, value: str, field: str, tmp_path: Path, data_root: Path, capsys
) -> None:
    """Was: accepted, and an epoch of zero steps was logged as 'train 0.00'."""
    out = tmp_path / "run"
    assert main(_train_args(out, data_root, "--max-steps", "3")) == 0
    digest = sha256_file(out / "checkpoint.pt")
    capsys.readouterr()
    assert main([*_train_args(out, data_root, "--resume"), option, value]) == 2
    err = _one_line_error(capsys)
    assert field in err and value in err
    assert sha256_file(out / "checkpoint.pt") == digest


def _set(path: list, value):
    def mutate(state: dict) -> None:
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


_FORGED_PROGRESS = {
    "epoch text": (_set(["epoch"], "1"), "epoch='1'"),
    "negative step": (_set(["step"], -4), "step=-4"),
    "batch beyond the epoch": (_set(["extra", "batch_in_epoch"], 10**6), "batch_in_epoch"),
    "nan loss sum": (_set(["extra", "run_sum"], float("nan")), "run_sum"),
    "history text": (_set(["extra", "history"], "x"), "malformed history"),
    "generator state": (_set(["extra", "eps_gen_state"], torch.zeros(3, dtype=torch.uint8)), "eps_gen_state"),
    "moment shape": (_set(["optimizer", "state", 0, "exp_avg"], torch.zeros(2)), "optimizer state"),
    "no train config": (_set(["train_config"], None), "records no train config"),
    "extra a list": (_set(["extra"], [1]), "no progress record"),
}


@pytest.mark.parametrize("case", sorted(_FORGED_PROGRESS))
def test_resume_from_a_forged_checkpoint_is_one_checkpoint_error(
    case: str, tmp_path: Path, data_root: Path, capsys
) -> None:
    mutate, message = _FORGED_PROGRESS[case]
    out = tmp_path / "run"
    assert main(_train_args(out, data_root, "--max-steps", "3")) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    mutate(state)
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(_train_args(out, data_root, "--resume")) == 1
    assert message in _one_line_error(capsys)


# --- the checkpoint.pt / model.safetensors pair -------------------------------------------------


def test_a_torn_pair_is_detected_and_mended_by_resume(tmp_path: Path, data_root: Path) -> None:
    """Was: a kill between the two writes left model.safetensors older than checkpoint.pt, unnoticed."""
    out = tmp_path / "run"
    train(*_cfg(out, data_root, max_steps=2), **QUIET)
    old_st, old_pt = (out / "model.safetensors").read_bytes(), (out / "checkpoint.pt").read_bytes()
    train(*_cfg(out, data_root, max_steps=4), resume=True, **QUIET)
    new_st = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(old_st)  # killed after checkpoint.pt, before safetensors
    with pytest.raises(CheckpointError, match=r"different saves \(step 2 vs 4"):
        load_checkpoint(out / "model.safetensors")
    assert load_checkpoint(out / "checkpoint.pt")  # the authoritative file still loads
    (out / "model.safetensors").write_bytes(new_st)
    (out / "checkpoint.pt").write_bytes(old_pt)  # the other order
    with pytest.raises(CheckpointError, match=r"different saves \(step 4 vs 2"):
        load_checkpoint(out / "model.safetensors")
    train(*_cfg(out, data_root, max_steps=5), resume=True, **QUIET)  # resume writes both again
    a, b = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(out / "model.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    copy = tmp_path / "shared" / "model.safetensors"  # alone, nothing to compare with: loads
    copy.parent.mkdir()
    copy.write_bytes(old_st)
    assert load_checkpoint(copy).latent_dim == 4


# --- bounded loading ----------------------------------------------------------------------------


def _refuse_torch_load(*args, **kwargs):
    raise AssertionError("torch.load reached")


def test_a_compressed_checkpoint_cannot_unpack_to_gigabytes(mlp_checkpoint: Path, tmp_path: Path) -> None:
    """Was: a checkpoint of a few hundred KB was decompressed in full before anything was checked."""
    state = torch.load(mlp_checkpoint, weights_only=True)
    state["extra"]["blob"] = torch.zeros(24 << 20)  # 96 MB of zeros: deflates to ~100 KB
    buf = io.BytesIO()
    torch.save(state, buf)
    del state
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    stored = tmp_path / "big.pt"  # the same, uncompressed: above the model config's bound
    stored.write_bytes(buf.getvalue())
    del buf
    assert bomb.stat().st_size * 40 < stored.stat().st_size
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", _refuse_torch_load)
        with pytest.raises(CheckpointError, match="expands from"):
            load_checkpoint(bomb)
        with pytest.raises(CheckpointError, match=r"unpacks to 1\d\d,\d{3},\d{3} bytes, more than"):
            load_checkpoint(stored)


def test_names_and_shapes_are_checked_from_the_index(mlp_checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(mlp_checkpoint, weights_only=True)
    first = next(iter(state["state_dict"]))
    state["state_dict"][first] = torch.zeros(4000, 784)
    torch.save(state, tmp_path / "shapes.pt")
    del state["state_dict"][first]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", _refuse_torch_load)
        with pytest.raises(CheckpointError, match=r"has shape \[4000, 784\], the config needs \[64, 784\]"):
            load_checkpoint(tmp_path / "shapes.pt")
        with pytest.raises(CheckpointError, match="missing"):
            load_checkpoint(tmp_path / "missing.pt")
        with pytest.raises(CheckpointError, match="torch.load reached"):  # a good file gets that far
            load_checkpoint(mlp_checkpoint)


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header: dict | bytes, data: bytes, path: Path) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def test_deeply_nested_safetensors_metadata_is_a_checkpoint_error(mlp_checkpoint: Path, tmp_path: Path) -> None:
    """Was: RecursionError (a traceback) from json.loads of the metadata's model_config."""
    header, data = _header(mlp_checkpoint.parent / "model.safetensors")
    header["__metadata__"]["model_config"] = "[" * 100_000 + "]" * 100_000
    path = _with_header(header, data, tmp_path / "deep.safetensors")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checkpoint(path)
    deep_header = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_checkpoint(_with_header(deep_header, b"", tmp_path / "deep2.safetensors"))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((200 << 20).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        load_checkpoint(huge)


def test_safetensors_index_is_checked_before_the_data_is_read(mlp_checkpoint: Path, tmp_path: Path) -> None:
    header, data = _header(mlp_checkpoint.parent / "model.safetensors")
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**6, 784]
    with pytest.MonkeyPatch.context() as mp:
        import safetensors.torch

        mp.setattr(safetensors.torch, "load", _refuse_torch_load)
        with pytest.raises(CheckpointError, match="does not fit its byte range"):
            load_checkpoint(_with_header(header, data, tmp_path / "big.safetensors"))


@pytest.fixture(scope="module")
def safetensors_parts(mlp_checkpoint: Path) -> tuple[dict, bytes]:
    return _header(mlp_checkpoint.parent / "model.safetensors")


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def _mutated_headers(draw, parts: tuple[dict, bytes]) -> bytes:
    header, data = json.loads(json.dumps(parts[0])), parts[1]
    how = draw(st.sampled_from(["entry", "field", "meta", "config", "bytes", "length", "truncate"]))
    names = sorted(header)
    if how == "entry":
        header[draw(st.sampled_from(names))] = draw(_JSON)
    elif how == "field":
        entry = header[draw(st.sampled_from([n for n in names if n != "__metadata__"]))]
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(
            st.one_of(_JSON, st.sampled_from(["F16", "I64", "BOOL", "F32"]), st.lists(st.integers(-1, 2**40)))
        )
    elif how == "meta":
        header["__metadata__"][draw(st.sampled_from(["format", "format_version", "save_id", "step"]))] = draw(
            st.one_of(st.text(max_size=8), st.sampled_from(["7", "-1", "1e9", "²", "vae-deploy-checkpoint"]))
        )
    elif how == "config":
        cfg = json.loads(header["__metadata__"]["model_config"])
        cfg[draw(st.sampled_from(sorted(cfg) + ["extra"]))] = draw(_JSON)
        header["__metadata__"]["model_config"] = json.dumps(cfg)
    blob = json.dumps(header).encode()
    if how == "bytes":
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([draw(st.integers(0, 255))]) + blob[i + 1 :]
    prefix = len(blob).to_bytes(8, "little")
    if how == "length":
        prefix = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    out = prefix + blob + data
    if how == "truncate":
        out = out[: draw(st.integers(0, len(out) - 1))]
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_safetensors_headers_load_or_are_a_checkpoint_error(
    data, safetensors_parts: tuple[dict, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data.draw(_mutated_headers(safetensors_parts)))
    try:
        model = load_checkpoint(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())

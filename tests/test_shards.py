"""Sample shards on one machine: the stream behind them, the files, the index, the folder rule,
bounded memory, resuming, and the CLI. Real exports, real files; Ray is in test_ray_sampling.py."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vae_deploy.cli import main
from vae_deploy.contract import SAMPLE_BLOCK_ROWS, SAMPLE_STREAM_VERSION
from vae_deploy.errors import DataError, ResourceError, UsageError
from vae_deploy.runtime import VAERuntime
from vae_deploy.shards import INDEX, ShardSpec, ShardWriter, check_out_dir, read_index, write_shards
from vae_deploy.streams import sample_streams

REPO = Path(__file__).resolve().parents[1]


def _recipe(seed: int, start: int, stop: int, row_shape: tuple[int, ...], pixels: bool = False) -> np.ndarray:
    """docs/CONTRACT.md's recipe, copied as an app would."""
    out = []
    for k in range(start // 1024, (stop - 1) // 1024 + 1):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, 1) if pixels else (k,)))
        first = k * 1024
        draw = rng.random if pixels else rng.standard_normal
        rows = draw((min(stop, first + 1024) - first, *row_shape), dtype=np.float32)
        out.append(rows[max(0, start - first) :])
    return np.concatenate(out)


def _concat(out_dir: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in read_index(out_dir).paths(out_dir)])


@pytest.fixture(scope="module")
def rt(mlp_onnx_export: Path) -> VAERuntime:
    return VAERuntime(mlp_onnx_export, "cpu")


# --- the stream ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**64),
    start=st.integers(0, 5000),
    length=st.integers(1, 2100),
    shape=st.sampled_from([(3,), (20,), (2, 3, 5), (4, 1, 1)]),
    pixels=st.booleans(),
)
def test_any_row_range_of_the_stream_is_the_recipe(seed, start, length, shape, pixels) -> None:
    """Vector or spatial rows, any range (inside a block, across blocks), drawn after another range."""
    z, u = sample_streams(seed, shape, shape)
    stream = u if pixels else z
    stream.rows(7, 9)  # an earlier, unrelated range must not matter
    want = _recipe(seed, start, start + length, shape, pixels)
    assert np.array_equal(stream.rows(start, start + length), want)
    assert np.array_equal(stream.take(3), _recipe(seed, start + length, start + length + 3, shape, pixels))


def test_stream_constants_and_the_example_app(mlp_onnx_export: Path, rt: VAERuntime) -> None:
    """The documented block size, and examples/embed_decoder.py (no vae-deploy) draws the same rows."""
    assert (SAMPLE_BLOCK_ROWS, SAMPLE_STREAM_VERSION) == (1024, 2)
    spec = importlib.util.spec_from_file_location("embed_decoder", REPO / "examples" / "embed_decoder.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    z = example.latents(5, 1000, 3100, (rt.latent_dim,))
    assert np.array_equal(rt.decode(z), rt.sample(3100, seed=5)[1000:])


# --- shards --------------------------------------------------------------------------------------


def test_shards_concatenate_to_the_sample(mlp_onnx_export: Path, rt: VAERuntime, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    result = write_shards(mlp_onnx_export, 5000, out, seed=4, shard_rows=1500, provider="cpu", batch_size=333)
    want = rt.sample(5000, seed=4)
    index = read_index(out)
    assert [p.name for p in index.paths(out)] == [f"shard-0000{i}.npy" for i in range(4)]
    assert [(e.start, e.rows) for e in index.shards] == [(0, 1500), (1500, 1500), (3000, 1500), (4500, 500)]
    assert np.array_equal(_concat(out), want)
    for entry, path in zip(index.shards, index.paths(out)):
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        buf = io.BytesIO()
        np.save(buf, want[entry.start : entry.start + entry.rows])
        assert data == buf.getvalue()  # exactly np.save's bytes
    raw = json.loads((out / INDEX).read_text())
    assert raw["complete"] and raw["n"] == 5000 and raw["seed"] == 4 and raw["shape"] == [5000, 1, 28, 28]
    assert raw["stream"] == {"version": 2, "block_rows": 1024} and raw["provider"] == "cpu"
    decoder = (mlp_onnx_export / "decoder.onnx").read_bytes()
    assert raw["export"]["decoder_sha256"] == hashlib.sha256(decoder).hexdigest()
    assert result.rows_written == 5000 and result.shards_kept == 0
    assert sorted(os.listdir(out)) == [INDEX, *(e.file for e in index.shards)]  # no temp files left


def test_bernoulli_shards_and_the_default_shard_size(mlp_onnx_export: Path, rt: VAERuntime, tmp_path: Path) -> None:
    write_shards(mlp_onnx_export, 2000, tmp_path / "b", seed=8, shard_rows=999, bernoulli=True, provider="cpu")
    assert np.array_equal(_concat(tmp_path / "b"), rt.sample(2000, seed=8, bernoulli=True))
    result = write_shards(mlp_onnx_export, 100, tmp_path / "d", seed=8, provider="cpu")
    assert result.index.spec.shard_rows == 32768  # 3136-byte rows: the largest power of two within 128 MiB
    assert np.array_equal(_concat(tmp_path / "d"), rt.sample(100, seed=8))


def test_rows_arriving_in_any_order_make_the_same_files(mlp_onnx_export: Path, rt: VAERuntime, tmp_path: Path) -> None:
    """What Ray workers do: batches of any size, out of order, spanning shards."""
    first = write_shards(mlp_onnx_export, 3000, tmp_path / "a", seed=1, shard_rows=700, provider="cpu")
    images = rt.sample(3000, seed=1)
    rng = np.random.default_rng(0)
    cuts = np.unique(np.concatenate([[0, 3000], rng.integers(1, 3000, 40)]))
    pieces = list(zip(cuts[:-1], cuts[1:]))
    rng.shuffle(pieces)
    with ShardWriter.open(tmp_path / "b", first.index.spec) as writer:
        for a, b in pieces:
            writer.put(int(a), images[a:b])
        index = writer.finish()
    assert [e.sha256 for e in index.shards] == [e.sha256 for e in first.index.shards]
    assert np.array_equal(_concat(tmp_path / "b"), images)
    with ShardWriter.open(tmp_path / "c", first.index.spec) as writer:
        writer.put(10, images[10:20])
        for bad_start, bad in ((15, images[15:16]), (2999, images[:2]), (0, images[:3].astype(np.float64))):
            with pytest.raises(UsageError):
                writer.put(bad_start, bad)
    assert not (tmp_path / "c").exists()  # an aborted writer with no shard done leaves nothing


def test_memory_stays_bounded_whatever_n(mlp_onnx_export: Path, tmp_path: Path) -> None:
    """Peak Python-side memory is about one batch (1.6 MB here) for 60,000 images (188 MB of shards)."""
    peaks = []
    for n in (6_000, 60_000):
        tracemalloc.start()
        write_shards(mlp_onnx_export, n, tmp_path / str(n), seed=2, shard_rows=4096, provider="cpu", batch_size=512)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 8 * 2**20 and peaks[1] < 1.5 * peaks[0] + 2**20, peaks


def test_an_interrupted_run_resumes_and_keeps_verified_shards(mlp_onnx_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"

    def stop_at_once(k: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # no shard finished: the new folder is not left behind
        write_shards(
            mlp_onnx_export, 5000, out, seed=6, shard_rows=1000, provider="cpu", batch_size=500, progress=stop_at_once
        )
    assert not out.exists()
    seen = []

    def stop_after_3000(k: int) -> None:
        seen.append(k)
        if sum(seen) >= 3000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run = dict(seed=6, shard_rows=1000, provider="cpu", batch_size=500)
        write_shards(mlp_onnx_export, 5000, out, progress=stop_after_3000, **run)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    with pytest.raises(DataError, match="unfinished run"):
        read_index(out)
    partial = read_index(out, complete=False)
    assert [e.sha256 is not None for e in partial.shards] == [True, True, True, False, False]
    (out / "shard-00001.npy").write_bytes(b"damaged")  # a kept shard must still match its hash
    again = write_shards(mlp_onnx_export, 5000, out, seed=6, shard_rows=1000, provider="cpu")
    assert (again.shards_kept, again.rows_written) == (2, 3000)
    fresh = write_shards(mlp_onnx_export, 5000, tmp_path / "fresh", seed=6, shard_rows=1000, provider="cpu")
    assert [e.sha256 for e in again.index.shards] == [e.sha256 for e in fresh.index.shards]
    done = write_shards(mlp_onnx_export, 5000, out, seed=6, shard_rows=1000, provider="cpu")
    assert (done.shards_kept, done.rows_written) == (5, 0)


def test_the_output_folder_rule(mlp_onnx_export: Path, tmp_path: Path) -> None:
    run = dict(seed=1, shard_rows=400, provider="cpu")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not vae-deploy shards .*'notes.txt'"):
        write_shards(mlp_onnx_export, 1000, foreign, **run)
    assert os.listdir(foreign) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        write_shards(mlp_onnx_export, 10, tmp_path / "file", **run)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / INDEX).write_text('{"format": "something-else"}')
    with pytest.raises(UsageError, match="not a vae-deploy shard index"):
        write_shards(mlp_onnx_export, 10, fake, **run)
    (fake / INDEX).write_text("[" * 100_000)  # json's RecursionError: still one of our errors
    with pytest.raises(UsageError, match="not a vae-deploy shard index"):
        write_shards(mlp_onnx_export, 10, fake, **run)
    with pytest.raises(DataError, match="nested too deeply"):
        read_index(fake)

    readme = tmp_path / "readme"
    readme.mkdir()
    (readme / "README.md").write_text("samples go here")
    write_shards(mlp_onnx_export, 1000, readme, **run)  # 3 shards
    (readme / "extra.txt").write_text("a user's file in our folder")
    write_shards(mlp_onnx_export, 500, readme, **run)  # other settings: 2 shards; shard-00002 was ours
    assert sorted(os.listdir(readme)) == ["README.md", "extra.txt", INDEX, "shard-00000.npy", "shard-00001.npy"]


def test_two_writers_cannot_share_a_folder(mlp_onnx_export: Path, tmp_path: Path) -> None:
    first = write_shards(mlp_onnx_export, 300, tmp_path / "a", seed=1, shard_rows=100, provider="cpu")
    with ShardWriter.open(tmp_path / "b", first.index.spec):
        with pytest.raises(UsageError, match="another run is writing shards"):
            ShardWriter.open(tmp_path / "b", first.index.spec)
    with ShardWriter.open(tmp_path / "b", first.index.spec):  # released by the first one's abort
        pass


def test_a_forged_index_cannot_make_us_delete_other_files(mlp_onnx_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(mlp_onnx_export, 300, out, seed=1, shard_rows=100, provider="cpu")
    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"precious")
    index = json.loads((out / INDEX).read_text())
    index["shards"][1]["file"] = "../victim.npy"
    (out / INDEX).write_text(json.dumps(index))
    with pytest.raises(UsageError, match="not a vae-deploy shard index"):
        write_shards(mlp_onnx_export, 100, out, seed=1, shard_rows=100, provider="cpu")
    assert victim.read_bytes() == b"precious"
    assert check_out_dir(tmp_path / "absent") is None


def test_bad_arguments_fail_before_any_work(mlp_onnx_export: Path, tmp_path: Path) -> None:
    for kwargs, match in (
        (dict(n=0), "n must be"),
        (dict(n=10, seed=-1), "seed must be"),
        (dict(n=10, shard_rows=0), "shard_rows must be"),
        (dict(n=10, seed=1.5), "seed must be"),
    ):
        with pytest.raises(UsageError, match=match):
            write_shards(mlp_onnx_export, out_dir=tmp_path / "x", provider="cpu", **kwargs)
    with pytest.raises(ResourceError, match="on the disk of"):
        write_shards(mlp_onnx_export, 10**15, tmp_path / "huge", seed=0, provider="cpu")
    assert not (tmp_path / "x").exists() and not (tmp_path / "huge").exists()


def test_spec_round_trips_through_the_index(mlp_onnx_export: Path, tmp_path: Path) -> None:
    result = write_shards(mlp_onnx_export, 10, tmp_path / "s", seed=2**100, provider="cpu")
    assert read_index(tmp_path / "s").spec == result.index.spec
    assert ShardSpec.from_dict(result.index.spec.to_dict()) == result.index.spec


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_writes_shards_and_keeps_out_file(mlp_onnx_export: Path, rt: VAERuntime, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    args = ["sample", str(mlp_onnx_export), "-n", "2500", "--seed", "3", "--provider", "cpu", "--no-progress"]
    assert main([*args, "--out-dir", str(out), "--shard-rows", "1000"]) == 0
    assert "to 3 shards in" in capsys.readouterr().out
    assert np.array_equal(_concat(out), rt.sample(2500, seed=3))
    assert main([*args, "--out-dir", str(out), "--shard-rows", "1000"]) == 0
    assert "already holds these 2500 samples" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "s.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "s.npy"), rt.sample(2500, seed=3))


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give either --out FILE or --out-dir DIR"),
        (["--out", "a.npy", "--out-dir", "d"], "give either --out FILE or --out-dir DIR"),
        (["--out", "a.npy", "--shard-rows", "5"], "--shard-rows goes with --out-dir"),
        (["--out", "a.npy", "--ray"], "--ray goes with --out-dir"),
        (["--out-dir", "d", "--workers", "2"], "--workers goes with --ray"),
        (["--out-dir", "d", "--nrow", "2"], "--nrow goes with a .png --out"),
        (["--out-dir", "d", "--shard-rows", "0"], "shard_rows must be a positive integer"),
    ],
)
def test_cli_option_errors_are_one_line(
    mlp_onnx_export: Path, tmp_path: Path, capsys, monkeypatch, extra, message
) -> None:
    monkeypatch.chdir(tmp_path)  # restored after the test
    code = main(["sample", str(mlp_onnx_export), "-n", "10", "--provider", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()

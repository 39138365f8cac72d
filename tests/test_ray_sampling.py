"""Shards through Ray Data on a real local Ray: bitwise the local shards, actors sized so reads
fit, strict CUDA actors, one-line errors.

The default run starts one local Ray (2 CPUs) for this module and runs one end-to-end job in it.
The variations (the CLI starting its own Ray, Bernoulli, one actor with two threads, three actors
on two CPUs, finishing an interrupted local run) are marked slow and run with VAE_DEPLOY_SLOW=1:
each Ray job costs seconds of actor start on two shared cores.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vae_deploy.contract import SAMPLE_STREAM_VERSION
from vae_deploy.errors import IntegrityError, ProviderError, UsageError
from vae_deploy.manifest import read_manifest, read_verified
from vae_deploy.ray_sampling import READ_TASK_CPUS, DecoderActor, RayOptions, actor_plan, write_shards_ray
from vae_deploy.runtime import VAERuntime
from vae_deploy.shards import read_index, write_shards

REPO = Path(__file__).resolve().parents[1]
slow = pytest.mark.skipif(os.environ.get("VAE_DEPLOY_SLOW") != "1", reason="slow Ray variation: VAE_DEPLOY_SLOW=1")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray with 2 CPUs for this module (write_shards_ray uses the Ray it finds)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _same_shards(a: Path, b: Path) -> None:
    ia, ib = read_index(a), read_index(b)
    assert ia.spec == ib.spec
    assert [e.sha256 for e in ia.shards] == [e.sha256 for e in ib.shards]
    for pa, pb in zip(ia.paths(a), ib.paths(b)):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_ray_shards_are_bitwise_the_local_shards(ray_local, mlp_onnx_export: Path, tmp_path: Path) -> None:
    """Two actors, an odd batch size, 5 dataset blocks, shards not aligned to stream blocks."""
    run = dict(seed=9, shard_rows=1500, provider="cpu")
    write_shards(mlp_onnx_export, 6000, tmp_path / "local", **run)
    options = RayOptions(workers=2, batch_size=777, num_blocks=5)
    seen: list[int] = []
    result = write_shards_ray(mlp_onnx_export, 6000, tmp_path / "ray", options=options, progress=seen.append, **run)
    _same_shards(tmp_path / "local", tmp_path / "ray")
    assert sum(seen) == 6000 and result.rows_written == 6000
    d = result.details
    assert (d["workers"], d["actor_num_cpus"], d["threads_per_worker"]) == (2, 0.5, 1)
    assert read_index(tmp_path / "ray").raw["writer"]["kind"] == "ray"
    assert np.array_equal(
        np.concatenate([np.load(p) for p in read_index(tmp_path / "ray").paths(tmp_path / "ray")]),
        VAERuntime(mlp_onnx_export, "cpu").sample(6000, seed=9),
    )


def test_cuda_on_a_cluster_without_gpus_is_refused_at_once(ray_local, mlp_onnx_export: Path, tmp_path: Path) -> None:
    if ray_local.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this cluster has a GPU")
    with pytest.raises(ProviderError, match="has none"):
        write_shards_ray(mlp_onnx_export, 100, tmp_path / "out", seed=0, provider="cuda")
    assert not (tmp_path / "out").exists()


def test_cuda_actors_write_the_local_cuda_shards(ray_local, mlp_onnx_export: Path, tmp_path: Path) -> None:
    """One actor per GPU, num_gpus=1, strict CUDA; skipped where the cluster has no GPU."""
    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("no GPU in this Ray cluster")
    run = dict(seed=3, shard_rows=2000, provider="cuda")
    write_shards(mlp_onnx_export, 5000, tmp_path / "local", **run)
    result = write_shards_ray(mlp_onnx_export, 5000, tmp_path / "ray", options=RayOptions(batch_size=999), **run)
    assert result.provider == "cuda" and result.details["actor_num_gpus"] == 1.0
    _same_shards(tmp_path / "local", tmp_path / "ray")


# --- the actor and the plan, without Ray -----------------------------------------------------------


def _actor_args(export: Path, **over) -> dict:
    entry = read_manifest(export).entry("decoder", "onnx")
    args = dict(
        model=read_verified(export, entry),
        sha256=entry.sha256,
        spec=entry.spec,
        provider="cpu",
        threads=1,
        seed=4,
        bernoulli=False,
        ranges=[(100, 300), (1000, 1100)],
        stream_version=SAMPLE_STREAM_VERSION,
    )
    return {**args, **over}


def test_decoder_actor_decodes_the_rows_its_ids_stand_for(mlp_onnx_export: Path) -> None:
    actor = DecoderActor(**_actor_args(mlp_onnx_export))
    ids = np.array([0, 1, 2, 150, 151, 199, 200, 201, 299, 5])  # runs, a jump back, across the two ranges
    out = actor({"id": ids})
    rows = np.array([100, 101, 102, 250, 251, 299, 1000, 1001, 1099, 105])
    assert np.array_equal(out["row"], rows)
    assert np.array_equal(out["image"], VAERuntime(mlp_onnx_export, "cpu").sample(1100, seed=4)[rows])


def test_decoder_actor_refuses_wrong_bytes_another_stream_and_cuda_without_a_gpu(
    mlp_onnx_export: Path, monkeypatch
) -> None:
    with pytest.raises(IntegrityError, match="sha256"):
        DecoderActor(**_actor_args(mlp_onnx_export, sha256="0" * 64))
    with pytest.raises(UsageError, match="same vae-deploy version"):
        DecoderActor(**_actor_args(mlp_onnx_export, stream_version=1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what Ray gives an actor without num_gpus
    with pytest.raises(ProviderError, match="no GPU"):
        DecoderActor(**_actor_args(mlp_onnx_export, provider="cuda"))


@given(
    cpus=st.integers(2, 512),
    threads=st.integers(1, 8),
    workers=st.one_of(st.none(), st.integers(1, 64)),
)
def test_actor_plans_always_leave_the_read_tasks_a_cpu(cpus: int, threads: int, workers: int | None) -> None:
    plan = actor_plan(float(cpus), 0.0, "cpu", RayOptions(threads_per_worker=threads, workers=workers))
    assert plan.workers * plan.num_cpus <= cpus - READ_TASK_CPUS + 1e-9
    assert plan.threads == threads and plan.num_cpus <= threads and plan.num_gpus == 0


def test_actor_plans_on_small_clusters() -> None:
    assert actor_plan(2.0, 0.0, "cpu", RayOptions()) == actor_plan(2.0, 0.0, "cpu", RayOptions(workers=2))
    plan = actor_plan(2.0, 0.0, "cpu", RayOptions())
    assert (plan.workers, plan.num_cpus, plan.threads) == (2, 0.5, 1)  # what facts.md saw work
    with pytest.raises(UsageError, match="at least 2 CPUs"):
        actor_plan(1.0, 0.0, "cpu", RayOptions())
    cuda = actor_plan(8.0, 2.0, "cuda", RayOptions())
    assert (cuda.workers, cuda.num_gpus, cuda.provider) == (2, 1.0, "cuda")
    with pytest.raises(UsageError, match="need 3 GPUs"):
        actor_plan(8.0, 2.0, "cuda", RayOptions(workers=3))
    with pytest.raises(UsageError, match="batch_size"):
        RayOptions(batch_size=0)


def test_without_ray_the_error_names_the_extra(mlp_onnx_export: Path, tmp_path: Path) -> None:
    args = ["sample", str(mlp_onnx_export), "-n", "10", "--out-dir", str(tmp_path / "o"), "--ray"]
    code = f"import sys; sys.modules['ray'] = None\nfrom vae_deploy.cli import main\nsys.exit(main({args!r}))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "pip install 'vae-deploy[ray]'" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# --- slow variations -------------------------------------------------------------------------------


@pytest.mark.slow
@slow
def test_cli_starts_its_own_ray_one_actor_two_threads_bernoulli(mlp_onnx_export: Path, tmp_path: Path) -> None:
    """In a fresh process: the CLI starts a local Ray, runs, and shuts it down."""
    write_shards(mlp_onnx_export, 3000, tmp_path / "local", seed=5, shard_rows=1024, bernoulli=True, provider="cpu")
    args = [str(mlp_onnx_export), "-n", "3000", "--seed", "5", "--shard-rows", "1024", "--bernoulli"]
    args += ["--provider", "cpu", "--out-dir", str(tmp_path / "ray"), "--ray", "--workers", "1", "--no-progress"]
    code = f"import sys; from vae_deploy.cli import main; sys.exit(main(['sample', *{args!r}]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ray: started a local Ray" in done.stdout and "1 decoder actors" in done.stdout
    _same_shards(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow
@slow
def test_more_actors_than_cpus_small_batches_many_blocks(ray_local, mlp_onnx_export: Path, tmp_path: Path) -> None:
    run = dict(seed=1, shard_rows=2500, provider="cpu")
    write_shards(mlp_onnx_export, 7000, tmp_path / "local", **run)
    options = RayOptions(workers=3, batch_size=1024, num_blocks=40)
    write_shards_ray(mlp_onnx_export, 7000, tmp_path / "ray", options=options, **run)
    _same_shards(tmp_path / "local", tmp_path / "ray")
    options = RayOptions(workers=1, threads_per_worker=2, batch_size=5000)
    write_shards_ray(mlp_onnx_export, 7000, tmp_path / "ray2", options=options, **run)
    _same_shards(tmp_path / "local", tmp_path / "ray2")


@pytest.mark.slow
@slow
def test_ray_finishes_an_interrupted_local_run(ray_local, mlp_onnx_export: Path, tmp_path: Path) -> None:
    run = dict(seed=2, shard_rows=1000, provider="cpu")
    written: list[int] = []

    def stop(k: int) -> None:
        written.append(k)
        if sum(written) >= 2500:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(mlp_onnx_export, 6000, tmp_path / "run", progress=stop, batch_size=500, **run)
    result = write_shards_ray(mlp_onnx_export, 6000, tmp_path / "run", options=RayOptions(batch_size=700), **run)
    assert result.shards_kept == 2 and result.rows_written == 4000
    write_shards(mlp_onnx_export, 6000, tmp_path / "fresh", **run)
    _same_shards(tmp_path / "fresh", tmp_path / "run")


@pytest.mark.slow
@slow
def test_a_cuda_actor_that_cannot_use_cuda_fails_in_one_line(mlp_onnx_export: Path, tmp_path: Path) -> None:
    """A cluster that claims a GPU the actor cannot use: ProviderError from inside the actor, not a
    silent CPU run; the new folder is not left behind. (Skips where CUDA really works.)"""
    code = f"""
import logging, sys, ray
from vae_deploy.errors import ProviderError
from vae_deploy.runtime import VAERuntime
from vae_deploy.ray_sampling import write_shards_ray
try:
    VAERuntime({str(mlp_onnx_export)!r}, "cuda")
    sys.exit(3)  # CUDA really works here
except ProviderError:
    pass
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
         logging_level=logging.WARNING)
try:
    write_shards_ray({str(mlp_onnx_export)!r}, 2000, {str(tmp_path / "out")!r}, seed=0, provider="cuda")
except ProviderError as exc:
    print("ONE LINE:", str(exc).count(chr(10)) == 0, str(exc)[:80])
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode == 3:
        pytest.skip("CUDA works here")
    assert "ONE LINE: True CUDA execution provider unavailable" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / "out").exists()

"""Training on several processes: real torchrun, real gloo processes on CPU, real MNIST.

A 2-process run (``train --nproc 2``) has its rank 1 killed with SIGKILL after a checkpoint and is
resumed with the plain torchrun form; it is compared with the 1-process run at the same global
batch and epochs. The slow test stops another run with Ctrl-C, resumes it, and checks that both
interrupted runs end with the weights and metrics of an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vae_deploy.checkpoint import read_checkpoint
from vae_deploy.cli import main
from vae_deploy.config import make_configs
from vae_deploy.distributed import (
    Group,
    Ranks,
    batches_per_epoch,
    rank_batches,
    rank_device,
    rank_seed,
    ranks_from_env,
    reported_elsewhere,
    shared,
)
from vae_deploy.errors import CheckpointError, UsageError
from vae_deploy.training import VAL_BATCH, evaluate_split, evaluate_sums, train

MODEL = {"arch": "mlp", "latent_dim": 10, "hidden": [128]}
EPOCHS, BATCH, TRAIN_LIMIT, EVERY = 2, 64, 3000, 5


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _args(out: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--dataset",
        "mnist",
        "--data-root",
        str(data_root),
        "--train-limit",
        str(TRAIN_LIMIT),
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        str(BATCH),
        "--latent-dim",
        str(MODEL["latent_dim"]),
        "--hidden",
        "128",
        "--checkpoint-every",
        str(EVERY),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- pieces, in this process ----------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(3000, 2), (1001, 2), (1000, 3), (7, 4)])
def test_rank_batches_split_the_global_batch_like_distributed_sampler(n: int, world: int) -> None:
    batch = 8 * world
    per_rank = [rank_batches(n, batch, seed=3, epoch=1, ranks=Ranks(r, world)) for r in range(world)]
    assert {len(b) for b in per_rank} == {batches_per_epoch(n, batch, world)}  # every rank steps alike
    for step in zip(*per_rank):
        assert len({len(b) for b in step}) == 1 and len(step[0]) <= batch // world
    seen = torch.cat([torch.cat(b) for b in per_rank])
    assert sorted(set(seen.tolist())) == list(range(n))  # every image, padded to a multiple of N only
    assert len(seen) == -(-n // world) * world
    again = rank_batches(n, batch, seed=3, epoch=1, ranks=Ranks(0, world))
    assert all(torch.equal(a, b) for a, b in zip(again, per_rank[0]))
    if n >= 1000:  # another epoch, another order
        assert not torch.equal(torch.cat(rank_batches(n, batch, seed=3, epoch=2, ranks=Ranks(0, world))), again[0])


def test_ranks_from_env_and_rank_seeds() -> None:
    assert ranks_from_env({}) == Ranks()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert ranks_from_env(env) == Ranks(3, 4, 1, 2)
    for bad in ({**env, "RANK": "x"}, {**env, "RANK": "4"}, {"WORLD_SIZE": "2"}):
        with pytest.raises(UsageError):
            ranks_from_env(bad)
    assert rank_seed(7, 0) == 7  # rank 0 keeps the one-process noise stream
    assert len({rank_seed(7, r) for r in range(8)}) == 8


def test_each_rank_gets_its_own_gpu_or_a_clear_error() -> None:
    ranks = Ranks(1, 2, 1, 2)
    assert rank_device(torch.device("cpu"), ranks) == torch.device("cpu")
    if torch.cuda.device_count() >= 2:
        assert rank_device(torch.device("cuda"), ranks) == torch.device("cuda", 1)
    else:
        with pytest.raises(UsageError, match="2 processes per node need one GPU each"):
            rank_device(torch.device("cuda"), ranks)


def test_ddp_batches_get_the_parameters_layout() -> None:
    """A one-channel batch stored channels-last would give conv weight gradients other strides than
    DDP's buckets (a warning and a copy every step): the batch is laid out as NCHW first."""
    x = torch.zeros(10, 8, 8, 1, dtype=torch.uint8).permute(0, 3, 1, 2)
    assert x.stride() == (64, 1, 8, 1)
    assert Group(Ranks(0, 2), torch.device("cpu")).batch(x).stride() == (64, 64, 8, 1)
    assert Group(Ranks(), torch.device("cpu")).batch(x) is x  # one process: untouched


def test_only_the_reporting_rank_prints_a_shared_error() -> None:
    exc = shared(UsageError("x"))
    assert not reported_elsewhere(exc, Ranks(0, 2)) and reported_elsewhere(exc, Ranks(1, 2))
    assert not reported_elsewhere(UsageError("own"), Ranks(1, 2))


def test_validation_split_over_ranks_adds_up_to_one_process(mnist_splits) -> None:
    mc, tc = make_configs(MODEL, {"dataset": "mnist", "out": "unused"})
    from vae_deploy.model import VAE

    torch.manual_seed(0)
    model, x = VAE(mc), mnist_splits.val_x[:2500]
    whole = evaluate_split(model, x, tc, torch.device("cpu"), batch_size=300, seed=4)
    parts = [evaluate_sums(model, x, tc, torch.device("cpu"), 300, 4, part=(r, 3)) for r in range(3)]
    for k, v in whole.items():
        assert sum(p[k] for p in parts) / len(x) == pytest.approx(v, rel=1e-12)


def test_bad_nproc_requests_are_one_line_before_any_process_starts(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mc, tc = make_configs(MODEL, {"dataset": "synthetic", "epochs": 1, "max_steps": 2, "out": str(tmp_path / "one")})
    train(mc, tc, progress=False, log=lambda _: None)
    cases = [
        (["--batch-size", "65", "--nproc", "2"], "must split evenly over 2 processes"),
        (["--out", str(tmp_path / "one"), "--resume", "--nproc", "2"], "trained on 1 process(es), this run has 2"),
    ]
    if torch.cuda.device_count() < 2:
        cases.append((["--device", "cuda", "--nproc", "2"], "GPU"))
    for extra, expected in cases:
        assert main(_args(tmp_path / "run", data_root, *extra)) == 2  # the last --out given wins
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "0")
    assert main(_args(tmp_path / "run", data_root, "--nproc", "2")) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


# --- real processes ---------------------------------------------------------------------------------


def _launch(out: Path, data_root: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vae_deploy.cli", *_args(out, data_root, "--nproc", "2", *extra)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(path: Path, proc: subprocess.Popen, beyond: int) -> int:
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be stopped (rc {proc.returncode}): {proc.stderr.read()}")
        try:
            step = read_checkpoint(path)["step"] if path.is_file() else -1
        except CheckpointError:
            step = -1
        if step > beyond:
            return step
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared")


def _rank_pids(root: int, rank: int) -> list[int]:
    """Descendants of ``root`` whose environment says RANK=rank (the torchrun workers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                if f"RANK={rank}".encode() in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                    found.append(pid)
            except OSError:
                continue
    return found


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """The documented plain form: torchrun --nproc-per-node 2 -m vae_deploy train ..."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vae_deploy"]
    return subprocess.run([*cmd, *args], env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same run on 1 process (here, with 1 thread) and on 2: ``train --nproc 2``, whose rank 1
    is killed with SIGKILL after a checkpoint, then resumed with the plain torchrun form."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("finds the ranks through /proc (Linux)")
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: the comparison is of results, not speed
    try:
        assert main(_args(one, data_root)) == 0
    finally:
        torch.set_num_threads(threads)
    proc = _launch(two, data_root)
    _wait_for_step(two / "checkpoint.pt", proc, beyond=0)
    victims = _rank_pids(proc.pid, 1)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    killed = {
        "victims": victims,
        "rc": proc.returncode,
        "err": err,
        "step": read_checkpoint(two / "checkpoint.pt")["step"],
    }
    resumed = _torchrun(*_args(two, data_root, "--resume"))
    return {"one": one, "two": two, "killed": killed, "resumed": resumed}


def test_a_killed_rank_stops_the_job_in_one_line_and_resume_continues(
    runs: dict[str, Any], data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    killed, resumed, ckpt = runs["killed"], runs["resumed"], runs["two"] / "checkpoint.pt"
    assert len(killed["victims"]) == 1
    assert killed["rc"] == 128 + signal.SIGKILL, killed["err"]
    lines = killed["err"].strip().splitlines()
    assert len(lines) == 1 and "rank 1" in lines[0] and "SIGKILL" in lines[0] and "--resume --nproc 2" in lines[0]
    assert 0 < killed["step"] < batches_per_epoch(TRAIN_LIMIT, BATCH, 2)  # saved before the kill, in epoch 1
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = killed["step"]
    assert f"resuming from {ckpt}: epoch 1, batch {step}, step {step}" in resumed.stdout
    assert resumed.stdout.count("epoch 2/") == 1  # rank 0 logs, rank 1 is silent
    assert [r["epoch"] for r in _rows(runs["two"])] == list(range(1, EPOCHS + 1))
    # another number of processes is refused in one line
    assert main(_args(runs["two"], data_root, "--resume")) == 2
    err = capsys.readouterr().err
    assert "trained on 2 process(es), this run has 1; resume with --nproc 2" in err and len(err.splitlines()) == 1


def test_two_processes_learn_like_one(runs: dict[str, Any]) -> None:
    one, two = _rows(runs["one"]), _rows(runs["two"])
    assert [r["processes"] for r in two] == [2] * EPOCHS and [r["processes"] for r in one] == [1] * EPOCHS
    assert two[0]["step"] == one[0]["step"]  # the global batch: as many steps per epoch
    for rows in (one, two):
        assert rows[0]["val_nelbo"] > rows[-1]["val_nelbo"]
    assert two[-1]["val_nelbo"] == pytest.approx(one[-1]["val_nelbo"], rel=0.03)
    extra = read_checkpoint(runs["two"] / "checkpoint.pt")["extra"]
    assert extra["world_size"] == 2 and len(extra["eps_gen_states"]) == 2
    assert not torch.equal(*extra["eps_gen_states"])  # each rank draws its own noise


def test_distributed_validation_is_the_one_process_value(runs: dict[str, Any], mnist_splits) -> None:
    """Validation sums reduced over ranks equal a one-process evaluation of the same weights."""
    from vae_deploy.checkpoint import load_checkpoint

    _, tc = make_configs(MODEL, {"dataset": "mnist", "out": "unused", "seed": 0})
    model = load_checkpoint(runs["two"] / "checkpoint.pt")
    val = evaluate_split(model, mnist_splits.val_x, tc, torch.device("cpu"), VAL_BATCH, seed=tc.seed)
    assert _rows(runs["two"])[-1]["val_nelbo"] == pytest.approx(val["nelbo"], rel=1e-6)


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_resumed_runs_equal_an_uninterrupted_one(
    runs: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    full = _torchrun(*_args(reference, data_root))
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    proc = _launch(out, data_root)
    _wait_for_step(ckpt, proc, beyond=0)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the command
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"error: training interrupted; state saved to {ckpt} (continue with --resume)"]
    stopped = read_checkpoint(ckpt)["step"]
    proc = _launch(out, data_root, "--resume")
    out_text, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"epoch 1, batch {stopped}, step {stopped}" in out_text
    want = read_checkpoint(reference / "checkpoint.pt")["state_dict"]
    timing = {"images_per_s", "seconds"}
    for run in (out, runs["two"]):  # interrupted by Ctrl-C, and by a killed rank
        got = read_checkpoint(run / "checkpoint.pt")["state_dict"]
        for k in want:
            assert torch.equal(got[k], want[k]), (run, k)
        rows = [{k: v for k, v in r.items() if k not in timing} for r in _rows(run)]
        assert rows == [{k: v for k, v in r.items() if k not in timing} for r in _rows(reference)]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one per process)")
def test_two_gpus_train_with_nccl(data_root: Path, tmp_path: Path) -> None:
    proc = _launch(tmp_path / "gpu", data_root, "--device", "cuda")
    out_text, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "training on 2 processes (nccl)" in out_text
    assert [r["processes"] for r in _rows(tmp_path / "gpu")] == [2] * EPOCHS

"""Training on several processes: torchrun starts one process per rank, DistributedDataParallel
averages their gradients (gloo on CPU, nccl on GPU with one device per LOCAL_RANK).

``vae-deploy train ... --nproc N`` starts torchrun for you (:func:`launch`); on a cluster run
``torchrun --nproc-per-node N [--nnodes ...] -m vae_deploy.cli train ...`` yourself (``--out`` on a
filesystem every node sees). What is kept equal to a one-process run, and how:

- ``--batch-size`` is the global batch: every rank takes batch/N images per step, the same count on
  every rank, so the averaged gradient is the gradient of the global batch's mean loss.
- Data order: ``DistributedSampler(shuffle=True, seed=--seed)`` with ``set_epoch(epoch)``: every
  rank draws the same permutation (padded to a multiple of N) and takes every N-th index.
- Noise: each rank has its own reparameterization generator (:func:`rank_seed`; rank 0 keeps the
  one-process stream). The checkpoint keeps every rank's generator state, so ``--resume`` with the
  same N continues bit for bit on CPU; a different N is refused (order and noise depend on it).
- Metrics: each step all-reduces the sums n*loss, n*recon, n*kl and n (never a mean of means);
  validation is split over ranks with the noise a single process would draw for each image.
- Stopping: a Ctrl-C (torchrun forwards SIGINT once to every rank) or a launcher that died is folded
  into the same per-step all-reduce, so every rank stops after the same step and rank 0 writes the
  checkpoint (atomically, as every write). A rank that dies makes the others fail in their next
  collective and torchrun stops them: the last checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vae_deploy.errors import UsageError, VaeDeployError, first_line

CONTROL_TIMEOUT_S = 60  # how long a rank waits for the rank that reports an error to leave
LAUNCHER_ENV = "VAE_DEPLOY_LAUNCHER"  # set by launch(): a failed rank is reported by the launcher


class RankLost(VaeDeployError):
    """A collective operation failed because another rank stopped (died, was killed, or failed)."""


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: Mapping[str, str] | None = None) -> Ranks:
    """This process's ranks from the environment torchrun sets; one process when it is unset."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return Ranks()

    def number(name: str, default: str | None = None) -> int:
        text = env.get(name, default)
        if text is None or not text.isascii() or not text.isdigit():
            raise UsageError(f"environment variable {name}={text!r} is not a rank number (is torchrun running this?)")
        return int(text)

    world = number("WORLD_SIZE")
    ranks = Ranks(number("RANK"), world, number("LOCAL_RANK", "0"), number("LOCAL_WORLD_SIZE", str(world)))
    if not (ranks.world_size >= 1 and ranks.rank < ranks.world_size and ranks.local_rank < ranks.local_world_size):
        raise UsageError(f"inconsistent torchrun environment: {ranks}")
    return ranks


# --- errors: one rank reports, the others end quietly -----------------------------------------------


class RankFailed(VaeDeployError):
    """Raised on the ranks that passed a check another rank failed (that rank reports why)."""


def shared(exc: BaseException, reporter: int = 0) -> BaseException:
    """Mark ``exc`` as raised on every rank, reported by rank ``reporter`` alone."""
    exc.reporter = reporter  # type: ignore[attr-defined]
    return exc


def reported_elsewhere(exc: BaseException, ranks: Ranks | None = None) -> bool:
    """Whether this rank may end quietly on ``exc``: another rank reports it (see :func:`shared`),
    or the ``--nproc`` launcher reports the rank whose failure made this one lose contact."""
    ranks = ranks_from_env() if ranks is None else ranks
    reporter = getattr(exc, "reporter", None)
    if reporter is not None and reporter != ranks.rank:
        return True
    return isinstance(exc, RankLost) and os.environ.get(LAUNCHER_ENV) == "1"


# --- data order and noise -----------------------------------------------------------------------


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s noise generator: ``seed`` on rank 0 (the one-process stream), a
    32-bit hash of both elsewhere (torch's CPU generator keeps only 32 bits of a seed)."""
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"vae-deploy/rank-seed/{seed}/{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def batches_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch of ``n`` images at global batch ``batch_size`` over ``world_size`` ranks."""
    if world_size == 1:
        return math.ceil(n / batch_size)
    return math.ceil(math.ceil(n / world_size) / (batch_size // world_size))


def rank_batches(n: int, batch_size: int, *, seed: int, epoch: int, ranks: Ranks) -> list[Tensor]:
    """This rank's index batches for ``epoch``: ``DistributedSampler(shuffle=True, seed=seed)`` after
    ``set_epoch(epoch)``, cut into batches of ``batch_size // world_size`` (the global batch split)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(n), num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return list(torch.tensor(list(sampler), dtype=torch.long).split(batch_size // ranks.world_size))


def check_batch_split(batch_size: int, world_size: int) -> None:
    """The global batch must split evenly over the ranks (each takes batch/N)."""
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size or world_size
        raise UsageError(
            f"--batch-size {batch_size} is the global batch and must split evenly over {world_size} processes "
            f"(each takes batch/{world_size}); use a multiple of {world_size}, e.g. {lower}"
        )


# --- devices and the process group --------------------------------------------------------------


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` on GPUs (one per process), else ``device``."""
    if ranks.world_size == 1 or device.type != "cuda":
        return device
    check_gpus(ranks.local_world_size)
    return torch.device("cuda", ranks.local_rank)


def check_gpus(processes_per_node: int) -> None:
    """One GPU per process on each node: refuse more processes than visible GPUs."""
    found = torch.cuda.device_count()
    if processes_per_node > found:
        raise UsageError(
            f"{processes_per_node} processes per node need one GPU each, but torch sees {found}; "
            f"use --nproc {max(found, 1)} or --device cpu"
        )


@dataclass
class Group:
    """The ranks of one training job, with the few collectives training needs. With one process
    every method is the trivial local version, so the training loop reads the same either way."""

    ranks: Ranks
    device: torch.device
    backend: str | None = None
    control: Any = None  # a gloo group with a short timeout, for waiting on a reporting rank
    parent_pid: int = field(default_factory=os.getppid)
    stop_agreed: bool = False

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (gradients averaged over ranks), or itself alone."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def batch(self, x: Tensor) -> Tensor:
        """``x`` with the standard (NCHW) strides on several processes. DDP's gradient buckets follow
        the parameters' layout; an image batch stored channels-last (or ambiguously, with one
        channel) makes conv weight gradients arrive in another layout: a warning and a copy per step."""
        if self.world_size == 1 or x.stride() == _standard_strides(x.shape):
            return x
        return x.clone(memory_format=torch.contiguous_format)

    def sum(self, values: Sequence[Tensor | float]) -> list[float]:
        """Each value summed over every rank (float64); with one process the values themselves."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.stack([torch.as_tensor(v, device=self.device).detach().to(torch.float64).reshape(()) for v in values])
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def step_sums(self, terms: Sequence[Tensor], n: int, stop: bool) -> tuple[list[float], int]:
        """n * each term summed over every rank's batch, and the global n. On several processes the
        same all-reduce carries each rank's stop request (Ctrl-C, or its launcher gone): see
        :meth:`should_stop`."""
        if self.world_size == 1:
            return [float(t.detach()) * n for t in terms], n
        gone = os.getppid() != self.parent_pid  # torchrun died: its ranks must not train on alone
        *sums, total, stops = self.sum([*(t.detach() * n for t in terms), n, float(stop or gone)])
        self.stop_agreed = stops > 0
        return sums, int(total)

    def should_stop(self, requested: bool) -> bool:
        """Whether to stop before the next step: this process's own request when it is alone, else
        what every rank agreed in the last :meth:`step_sums` (so all stop after the same step)."""
        return requested if self.world_size == 1 else self.stop_agreed

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (a collective: every rank must call it)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def agree(self) -> Iterator[None]:
        """Run checks on every rank and agree on the outcome: if any rank fails, every rank raises
        (the failed ones their own error, the others :class:`RankFailed`), all reported by the
        lowest failed rank, so a job never half-starts and its error is printed once."""
        failure: Exception | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            failure = exc
        if self.world_size > 1:
            outcomes = self.gather(None if failure is None else first_line(failure))
            failed = [r for r, message in enumerate(outcomes) if message is not None]
            if failed and failure is None:
                failure = RankFailed(f"rank {failed[0]} failed: {outcomes[failed[0]]}")
            if failure is not None:
                shared(failure, reporter=failed[0])
        if failure is not None:
            raise failure

    def wait_for_reporter(self) -> None:
        """Block until the rank that reports this rank's error has left the group (at most the
        control group's timeout): a rank that ended first would make torchrun stop the reporter
        before it printed."""
        with contextlib.suppress(Exception):  # the reporter never joins: this fails once it has left
            dist.barrier(group=self.control)

    @contextlib.contextmanager
    def guard(self, checkpoint: os.PathLike | str) -> Iterator[None]:
        """Turn a collective that failed because another rank stopped into :class:`RankLost`."""
        try:
            yield
        except RuntimeError as exc:
            text = str(exc)
            lost = isinstance(exc, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "Connection"))
            if self.world_size == 1 or not lost:
                raise
            raise RankLost(
                f"rank {self.rank} lost contact with another process of this run (it stopped, failed or was "
                f"killed: {first_line(exc, 120)}); the last good checkpoint is {checkpoint} (continue with --resume)"
            ) from None


def _standard_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[Group]:
    """Join the job's process group (gloo on CPU, nccl on CUDA, plus a gloo group for control) for
    the duration; nothing to join with one process. A group initialised by the caller is used as
    it is and left open. A rank leaving on an error another rank reports waits for that rank first."""
    if ranks.world_size == 1:
        yield Group(ranks, device)
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    elif dist.get_world_size() != ranks.world_size or dist.get_rank() != ranks.rank:
        raise UsageError("the initialised process group does not match RANK/WORLD_SIZE of this process")
    group = Group(ranks, device, backend=str(dist.get_backend()))
    group.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
    try:
        yield group
    except BaseException as exc:
        if reported_elsewhere(exc, ranks) and not isinstance(exc, RankLost):
            group.wait_for_reporter()
        raise
    finally:
        if owned:
            with contextlib.suppress(Exception):  # a lost peer can make teardown fail; the job is over
                dist.destroy_process_group()


# --- the launcher behind `vae-deploy train --nproc N` -------------------------------------------------


def launch(
    argv: Sequence[str], nproc: int, *, hint: str = "", debug: bool = False, module: str = "vae_deploy.cli"
) -> int:
    """Run ``python -m MODULE ARGV`` on ``nproc`` local processes under torchrun; its exit code.

    torchrun runs in a session of its own and gets each SIGINT/SIGTERM/SIGHUP this process receives,
    once (it forwards them to the ranks once), and dies with this process (Linux). A failed rank
    is reported in one line ending with ``hint`` (see :mod:`vae_deploy.torchrun`); ``debug`` keeps
    torchrun's own logs and the ranks' tracebacks.
    """
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    cmd = [sys.executable, "-m", "vae_deploy.torchrun", "--hint", hint]
    cmd += ["--standalone", "--nproc-per-node", str(nproc), "-m", module, *argv]
    env = dict(os.environ)
    env[LAUNCHER_ENV] = "1"
    if debug:
        env["VAE_DEPLOY_DEBUG"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: gloo over loopback, whatever the hostname resolves to
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cpus() // nproc)))  # torchrun's default would be 1
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    with _forwarding_signals(proc):
        return proc.wait()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _forwarding_signals(proc: subprocess.Popen) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""The same shards through Ray Data: a dataset of row indices mapped through decoder actors.

    write_shards_ray("exported", 1_000_000, "samples/", seed=0)                     # a local Ray here
    write_shards_ray(..., options=RayOptions(address="ray://head:10001"))            # the user's cluster

How: ``ray.data.range(rows to write)`` -> ``map_batches(DecoderActor, compute=ActorPoolStrategy(size=
workers), num_cpus=.., num_gpus=..)``. Each actor holds one onnxruntime session of the verified
decoder bytes (shipped with the actor, so workers need no access to the export folder; they need
vae-deploy[ray] installed) and decodes the rows of its batch from the seeded stream through
decoding.py, the path ``VAERuntime.sample_iter`` takes. The driver takes (row, image) batches in
whatever order they finish and hands them to ``ShardWriter``, which puts every row at its offset.
Ray Data does all scheduling and backpressure; nothing here queues or schedules.

Sizing: Ray Data's read tasks ask for one CPU each; actors that hold every CPU leave them none and
the pipeline stalls forever (seen on a 2-CPU cluster with actors of 1 and of 0.9 CPUs). So CPU
actors ask Ray for ``(cluster CPUs - READ_TASK_CPUS) / workers`` CPUs each (a scheduling token),
while each runs exactly ``threads_per_worker`` onnxruntime threads (Ray sets OMP_NUM_THREADS,
which onnxruntime ignores). ``workers`` defaults to cluster CPUs // threads_per_worker.

CUDA: ``provider="cuda"`` gives each actor ``num_gpus=1`` and a strict CUDA engine; an actor with an
empty CUDA_VISIBLE_DEVICES, or whose session would fall back to the CPU, raises ProviderError
instead of decoding on the CPU. A cluster without GPUs is refused before anything starts.
``"auto"`` is CUDA when the cluster has GPUs, else CPU.

Determinism: on the same provider the shards are bitwise identical to ``write_shards``' whatever
the number of workers, the dataset's block count or the batch size (tests/test_ray_sampling.py).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy import errors, inputs
from vae_deploy.contract import DECODER, SAMPLE_STREAM_VERSION, GraphSpec
from vae_deploy.decoding import sample_batches
from vae_deploy.engines import CpuPlan, cpu_count, open_engine
from vae_deploy.errors import (
    ClusterError,
    ExportError,
    IntegrityError,
    ProviderError,
    UsageError,
    VaeDeployError,
    first_line,
    missing_extra,
)
from vae_deploy.files import sha256_bytes
from vae_deploy.manifest import read_manifest, read_verified
from vae_deploy.shard_index import default_batch_rows
from vae_deploy.shards import ShardsResult, ShardWriter, check_out_dir, check_seed, shard_spec
from vae_deploy.streams import sample_streams

READ_TASK_CPUS = 1.0  # what Ray Data's read tasks ask for; actors always leave this much free
PROVIDERS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray. None fields are chosen from the cluster.

    ``address``: None starts a local Ray (or uses the one this process already joined); otherwise
    ``ray.init(address=...)`` joins it ("auto", "host:port", "ray://host:10001").
    ``workers``: decoder actors. ``threads_per_worker``: onnxruntime intra-op threads per CPU actor.
    ``batch_size``: rows per ``map_batches`` call (default: ``shard_index.default_batch_rows``,
    4096 rows or 16 MiB of images). ``num_blocks``: blocks of the row dataset.
    ``num_cpus`` / ``object_store_memory``: for a local Ray started here.
    """

    address: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    batch_size: int | None = None
    num_blocks: int | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None

    def __post_init__(self) -> None:
        for name in ("workers", "batch_size", "num_blocks", "num_cpus", "object_store_memory"):
            if getattr(self, name) is not None:
                inputs.count(getattr(self, name), name)
        inputs.count(self.threads_per_worker, "threads_per_worker")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise UsageError(f"address must be a Ray address such as 'auto' or 'host:6379', got {self.address!r}")


@dataclass(frozen=True)
class ActorPlan:
    """What each decoder actor asks Ray for and runs with."""

    workers: int
    num_cpus: float
    num_gpus: float
    threads: int
    provider: str


def actor_plan(cpus: float, gpus: float, provider: str, options: RayOptions) -> ActorPlan:
    """Actor count and resources for a cluster of ``cpus``/``gpus``, leaving the read tasks a CPU."""
    spare = cpus - READ_TASK_CPUS
    if spare <= 0:
        raise UsageError(
            f"the Ray cluster has {cpus:g} CPU(s): Ray Data's read tasks need {READ_TASK_CPUS:g} and the "
            "decoder actors more; use a cluster with at least 2 CPUs, or write shards without --ray"
        )
    if provider == "cuda":
        if gpus < 1:
            raise ProviderError(
                "provider 'cuda' on Ray needs GPUs, and this Ray cluster has none; use provider 'cpu' or 'auto'",
                reason="the Ray cluster has no GPUs",
            )
        workers = options.workers or int(gpus)
        if workers > gpus:
            raise UsageError(f"{workers} CUDA workers need {workers} GPUs; the Ray cluster has {gpus:g}")
        return ActorPlan(workers, min(1.0, spare / workers), 1.0, 1, "cuda")
    threads = options.threads_per_worker
    workers = options.workers or max(1, int(cpus // threads))
    return ActorPlan(workers, min(float(threads), spare / workers), 0.0, threads, "cpu")


class DecoderActor:
    """One decoder session in a Ray actor: a batch of dataset ids -> {"row", "image"}.

    Dataset id j stands for the j-th row still to write (``ranges`` lists them), so a resumed run
    decodes only the missing shards. Checks the bytes it was given against the manifest's sha256,
    and that this worker's vae-deploy draws the same stream as the driver's.
    """

    def __init__(
        self,
        model: bytes,
        sha256: str,
        spec: GraphSpec,
        provider: str,
        threads: int,
        seed: int,
        bernoulli: bool,
        ranges: list[tuple[int, int]],
        stream_version: int,
    ) -> None:
        if stream_version != SAMPLE_STREAM_VERSION:
            raise UsageError(
                f"this Ray worker's vae-deploy draws sampling stream {SAMPLE_STREAM_VERSION}, the driver's "
                f"{stream_version}: install the same vae-deploy version on the cluster"
            )
        if sha256_bytes(model) != sha256:
            raise IntegrityError("the decoder bytes a Ray actor received do not match the manifest's sha256")
        if provider == "cuda" and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            raise ProviderError(
                "this Ray actor was given no GPU (CUDA_VISIBLE_DEVICES is empty); refusing to decode on the CPU",
                reason="no GPU assigned to the actor",
            )
        plan = CpuPlan(small_batch_max=0, threads=threads, spinning=False)
        self.engine = open_engine(model, "decoder (Ray actor)", spec, provider, plan=plan)
        self.image_shape = tuple(spec.outputs[0].row_shape)
        latent_shape = tuple(spec.inputs[0].row_shape)
        self.latents, self.pixels = sample_streams(seed, latent_shape, self.image_shape if bernoulli else None)
        self.starts = np.array([a for a, _ in ranges], np.int64)
        self.offsets = np.cumsum([0] + [b - a for a, b in ranges])[:-1].astype(np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], np.int64)
        k = np.searchsorted(self.offsets, ids, side="right") - 1
        rows = self.starts[k] + ids - self.offsets[k]
        parts = []  # one decode per run of consecutive rows (usually the whole batch: no copy)
        for a, b in _runs(rows):
            start = int(rows[a])
            parts.extend(sample_batches(self.engine, self.latents, self.pixels, start, start + b - a, b - a))
        return {"row": rows, "image": parts[0] if len(parts) == 1 else np.concatenate(parts)}


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int]]:
    """Positions [a, b) of the runs of consecutive row numbers in ``rows``."""
    breaks = [0, *(np.flatnonzero(np.diff(rows) != 1) + 1).tolist(), len(rows)]
    return ((a, b) for a, b in zip(breaks[:-1], breaks[1:]) if b > a)


def import_ray() -> Any:
    """``ray`` with Ray Data, or the one-line error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ModuleNotFoundError as exc:
        raise (missing_extra(exc) or exc) from None
    return ray


@contextmanager
def ray_cluster(options: RayOptions) -> Iterator[dict[str, Any]]:
    """Start a local Ray, join ``options.address``, or use the Ray this process already joined.
    Yields what happened (started, seconds, address); shuts down only a Ray it started."""
    ray = import_ray()
    began = time.perf_counter()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if options.address is None:
            # address="local": a new Ray of our own, never one that `ray start` left running here
            kwargs.update(address="local", num_cpus=options.num_cpus or cpu_count(), include_dashboard=False)
            if options.object_store_memory:
                kwargs["object_store_memory"] = options.object_store_memory
        else:
            kwargs["address"] = options.address
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - connection and start failures are the user's to fix
            where = f"join the Ray cluster at {options.address}" if options.address else "start a local Ray"
            raise ClusterError(f"cannot {where}: {first_line(exc)}") from None
        started = True
    try:
        yield {"started": started, "seconds": time.perf_counter() - began, "address": options.address or "local"}
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _quiet_data_context(ray: Any) -> Iterator[None]:
    """No Ray Data progress bars, banners or log records while we run (restored afterwards); its
    full logs stay in Ray's session folder."""
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats")}
    for k in saved:
        setattr(ctx, k, False)
    data_logger = logging.getLogger("ray.data")  # its errors repeat the actors' tracebacks: we raise one line
    level = data_logger.level
    data_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        data_logger.setLevel(level)


_RAISED = re.compile(r"^vae_deploy\.errors\.(\w+): (.+)$", re.MULTILINE)


def _user_error(exc: BaseException) -> VaeDeployError:
    """The documented error an actor raised, out of Ray's wrapping (the object where Ray keeps it,
    else its class and message from the remote traceback Ray passes on), or a one-line ClusterError."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    for e in chain:
        if isinstance(e, VaeDeployError) and not hasattr(e, "cause"):  # ours, not Ray's dual-class wrapper
            return e
    for e in chain:
        found = _RAISED.findall(str(e))
        if found:
            name, message = found[-1]
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, VaeDeployError):
                return cls(message.strip())
    said = [first_line(e) for e in chain if str(e).strip()]
    return ClusterError(f"Ray sampling failed: {said[-1] if said else type(chain[-1]).__name__}")


def write_shards_ray(
    export_dir: str | os.PathLike,
    n: int,
    out_dir: str | os.PathLike,
    *,
    seed: int | None = None,
    shard_rows: int | None = None,
    provider: str = "auto",
    bernoulli: bool = False,
    resume: bool = True,
    options: RayOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> ShardsResult:
    """``shards.write_shards`` on Ray Data: the same shards, decoded by actors across a cluster.

    ``result.setup_seconds`` is the cluster start (or join); ``result.seconds`` the writing,
    actor start included; ``result.details`` the plan (workers, CPUs/GPUs per actor, threads).
    """
    options = options or RayOptions()
    n = inputs.count(n, "n")
    seed = check_seed(seed)
    if provider not in PROVIDERS:
        raise UsageError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    check_out_dir(out_dir)
    manifest = read_manifest(export_dir)
    entry = manifest.entry(DECODER, "onnx")
    if entry is None:
        raise ExportError(f"{export_dir} lists no decoder 'onnx' file")
    spec = entry.spec
    if not (spec.inputs[0].static_rows and spec.outputs[0].static_rows):
        raise UsageError(f"shards need fixed latent and image shapes; this decoder is {spec.signature()}")
    model = read_verified(export_dir, entry)
    ray = import_ray()
    with ray_cluster(options) as cluster:
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        wanted = ("cuda" if gpus >= 1 else "cpu") if provider == "auto" else provider
        plan = actor_plan(cpus, gpus, wanted, options)
        image_shape = tuple(spec.outputs[0].row_shape)
        sspec = shard_spec(manifest, export_dir, n, seed, shard_rows, image_shape, bernoulli, plan.provider)
        batch = options.batch_size or default_batch_rows(sspec.row_bytes)  # as write_shards sizes it
        details = {
            "kind": "ray",
            "address": cluster["address"],
            "cluster_cpus": cpus,
            "cluster_gpus": gpus,
            "workers": plan.workers,
            "actor_num_cpus": plan.num_cpus,
            "actor_num_gpus": plan.num_gpus,
            "threads_per_worker": plan.threads,
            "batch_size": batch,
            "num_blocks": options.num_blocks,
        }
        info = {"export_dir": str(Path(export_dir).resolve()), "writer": details}
        began = time.perf_counter()
        with ShardWriter.open(out_dir, sspec, resume=resume, info=info) as writer:
            if progress is not None and writer.rows_kept:
                progress(writer.rows_kept)
            todo = writer.todo()
            if todo:
                total = sum(b - a for a, b in todo)
                actor_args = dict(
                    model=model,
                    sha256=entry.sha256,
                    spec=spec,
                    provider=plan.provider,
                    threads=plan.threads,
                    seed=seed,
                    bernoulli=bernoulli,
                    ranges=todo,
                    stream_version=SAMPLE_STREAM_VERSION,
                )
                with _quiet_data_context(ray):
                    ds = ray.data.range(total, override_num_blocks=options.num_blocks).map_batches(
                        DecoderActor,
                        fn_constructor_kwargs=actor_args,
                        batch_size=batch,
                        batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=plan.workers),
                        num_cpus=plan.num_cpus,
                        num_gpus=plan.num_gpus,
                    )
                    try:
                        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                            rows, images = out["row"], out["image"]
                            for a, b in _runs(rows):
                                writer.put(int(rows[a]), images[a:b])
                            if progress is not None:
                                progress(len(rows))
                    except Exception as exc:  # noqa: BLE001 - Ray wraps what actors raise
                        error = _user_error(exc)
                        if error is exc:
                            raise
                        raise error from None
            index = writer.finish()
    return ShardsResult(
        Path(out_dir),
        index,
        time.perf_counter() - began,
        writer.rows_written,
        writer.rows_kept,
        writer.shards_kept,
        plan.provider,
        setup_seconds=cluster["seconds"],
        details=details,
    )

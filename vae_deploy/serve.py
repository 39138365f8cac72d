"""``vae-deploy serve``: an export folder behind HTTP on Ray Serve, with dynamic batching.

    server = start("exported", ServeConfig(max_batch_size=64, batch_wait_ms=2), port=0)
    server.url            # http://127.0.0.1:PORT: GET /healthz /metadata /sample, POST /decode /encode
    server.shutdown()     # or use it as a context manager

Ray Serve does the serving: its HTTP proxy, routing across ``replicas``, queueing and
backpressure (503 over ``max_queued_requests``), and ``@serve.batch`` for dynamic batching. Each
replica holds one :class:`~vae_deploy.runtime.VAERuntime`. With batching on, ``/decode`` and
``/encode`` requests that wait together are stacked into one engine run of up to
``max_batch_size`` rows (counted in rows, as Triton does; a request of that many rows or more runs
alone); ``max_batch_size=1`` serves each request on its own. ``/sample`` is never batched: it is
``VAERuntime.sample(n, seed)``, bit for bit.

Requests are parsed and checked by the plain functions of :mod:`vae_deploy.serve_api` before any
model runs, so a bad request gets its 4xx and never reaches a batch shared with others, nor takes a
replica down. Needs the ``serve`` extra (``ray[serve]``); this module is imported only by the
commands that serve.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations
# (``request: Request``) at runtime, through Ray Serve's ingress wrapper.
import asyncio
import errno
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.config import HTTPOptions
from ray.serve.schema import LoggingConfig
from starlette.exceptions import HTTPException

from vae_deploy import serve_api
from vae_deploy.contract import DECODER, ENCODER, PRECISION_FORMAT
from vae_deploy.engines import CpuPlan, cpu_count
from vae_deploy.errors import ExportError, ServeError, UsageError, first_line
from vae_deploy.manifest import read_manifest, read_verified
from vae_deploy.runtime import PRECISIONS, PROVIDERS, VAERuntime
from vae_deploy.serve_api import ServeLimits

logger = logging.getLogger("vae_deploy.serve")
OFFLOAD_BYTES = 1 << 16  # bodies/answers bigger than this are parsed/encoded off the event loop


@dataclass(frozen=True)
class ServeConfig:
    """How one export is served.

    ``max_batch_size``: rows per engine run that dynamic batching may form from waiting requests
    (1: no dynamic batching). ``batch_wait_ms``: how long the first request of a batch waits for
    others. ``threads``: onnxruntime intra-op threads per replica (default: all cores for one
    replica, else an equal share). ``cpus_per_replica``/``gpus_per_replica``: what Ray reserves for
    each replica (default: up to one CPU; a GPU share when the provider may use CUDA and the cluster
    has GPUs). ``max_ongoing_requests``: requests one replica takes at once (default: twice
    ``max_batch_size``, at least 8); ``max_queued_requests``: requests waiting for a replica before
    Ray Serve answers 503 (-1: no limit).
    """

    replicas: int = 1
    max_batch_size: int = 64
    batch_wait_ms: float = 2.0
    provider: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    cpus_per_replica: float | None = None
    gpus_per_replica: float | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 1024
    limits: ServeLimits = field(default_factory=ServeLimits)
    access_log: bool = False

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive("replicas", self.replicas)
        positive("max_batch_size", self.max_batch_size)
        if isinstance(self.batch_wait_ms, bool) or not isinstance(self.batch_wait_ms, (int, float)):
            raise UsageError(f"batch_wait_ms must be a number of milliseconds, got {self.batch_wait_ms!r}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise UsageError(f"batch_wait_ms must be between 0 and 10000, got {self.batch_wait_ms}")
        if self.provider not in PROVIDERS:
            raise UsageError(f"provider must be one of {PROVIDERS}, got {self.provider!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.threads is not None:
            positive("threads", self.threads, 0)
        for name in ("cpus_per_replica", "gpus_per_replica"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise UsageError(f"{name} must be a number >= 0, got {value!r}")
        if self.max_ongoing_requests is not None:
            positive("max_ongoing_requests", self.max_ongoing_requests)
        if self.max_queued_requests != -1:
            positive("max_queued_requests", self.max_queued_requests)
        if not isinstance(self.limits, ServeLimits):
            raise UsageError(f"limits must be a ServeLimits, got {type(self.limits).__name__}")

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    def intra_op_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        return 0 if self.replicas == 1 else max(1, cpu_count() // self.replicas)

    def ongoing(self) -> int:
        return self.max_ongoing_requests or max(8, 2 * self.max_batch_size)

    def batching_info(self) -> dict[str, Any]:
        return {
            "dynamic": self.batching,
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": self.batch_wait_ms if self.batching else 0,
            "replicas": self.replicas,
            "max_ongoing_requests": self.ongoing(),
        }


# --- the deployment -----------------------------------------------------------------------------
# Everything the handlers use is defined above the class: ``serve.ingress`` pickles the app when the
# class is decorated.

api = FastAPI(title="vae-deploy", docs_url=None, redoc_url=None, openapi_url=None)


def _response(status: int, body: bytes, media: str, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type=media, headers=headers)


def _error(status: int, message: str) -> Response:
    return _response(*serve_api.error_answer(status, message))


async def _offload(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a worker thread when its input is large, so the event loop keeps serving."""
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


@api.exception_handler(HTTPException)
async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Unknown paths (404) and wrong methods (405) answer ``{"error": ...}`` like everything else."""
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


@serve.deployment(name="VAEService")
@serve.ingress(api)
class VAEService:
    """One replica: a VAERuntime behind the HTTP API (see the module docstring)."""

    def __init__(self, export_dir: str, config: ServeConfig) -> None:
        self.config, self.limits = config, config.limits
        threads = config.intra_op_threads()
        # no spinning: a replica's idle pool threads would take CPU from the proxy and other replicas
        plan = CpuPlan(small_batch_max=0, threads=threads, spinning=False)
        self.runtime = VAERuntime(export_dir, config.provider, precision=config.precision, cpu_plan=plan)
        self.has_encoder = self.runtime.manifest.entry(ENCODER, "onnx") is not None
        self.metadata = serve_api.metadata(self.runtime, self.limits, config.batching_info(), self.has_encoder)
        self.metadata["threads"] = threads
        self.replica = serve.get_replica_context().replica_id.unique_id
        # per replica, updated on the event loop only: requests, engine runs and rows per graph
        self.stats = {g: {"requests": 0, "engine_runs": 0, "rows": 0} for g in (DECODER, ENCODER)}
        for batched in (self._decode_rows, self._encode_rows):
            batched.set_max_batch_size(config.max_batch_size)
            batched.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    # dynamic batching: stacked rows of waiting requests, one engine run per row shape
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, batch_size_fn=serve_api.total_rows)
    async def _decode_rows(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        self._count_run(DECODER, batches)
        return await asyncio.to_thread(serve_api.run_batched, self.runtime.decode, batches)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, batch_size_fn=serve_api.total_rows)
    async def _encode_rows(self, batches: list[np.ndarray]) -> list[tuple]:
        self._count_run(ENCODER, batches)
        return await asyncio.to_thread(serve_api.run_batched, self.runtime.encode, batches)

    def _count_run(self, graph: str, batches: list[np.ndarray]) -> None:
        stats = self.stats[graph]
        stats["engine_runs"] += len({b.shape[1:] for b in batches})
        stats["rows"] += serve_api.total_rows(batches)

    async def _run(self, graph: str, rows: np.ndarray) -> Any:
        """One request's rows through the graph: into a dynamic batch when batching and it is
        small, else an engine run of its own (in a worker thread: the event loop keeps serving)."""
        self.stats[graph]["requests"] += 1
        if self.config.batching and len(rows) < self.config.max_batch_size:
            return await (self._decode_rows if graph == DECODER else self._encode_rows)(rows)
        self._count_run(graph, [rows])
        return await asyncio.to_thread(self.runtime.decode if graph == DECODER else self.runtime.encode, rows)

    # HTTP --------------------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it passes the limit, declared or not."""
        serve_api.check_content_length(request.headers.get("content-length"), self.limits)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            serve_api.check_body_size(size, self.limits)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer(self, work: Callable[[], Any]) -> Response:
        """Run a request's work; every failure becomes a JSON error answer (the replica lives on)."""
        try:
            body, media, headers = await work()
            return _response(200, body, media, headers)
        except Exception as exc:  # noqa: BLE001 - a request must never take the replica down
            status, message = serve_api.status_of(exc)
            if status >= 500:
                logger.exception("request failed")
            return _error(status, message)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return _response(200, serve_api.json_bytes({"status": "ok", "replica": self.replica}), serve_api.JSON)

    @api.get("/metadata")
    async def get_metadata(self) -> Response:
        return _response(200, serve_api.json_bytes(self.metadata), serve_api.JSON)

    @api.get("/stats")
    async def get_stats(self) -> Response:
        """This replica's counters: requests, engine runs and rows per graph (rows/run = batching)."""
        return _response(200, serve_api.json_bytes({"replica": self.replica, **self.stats}), serve_api.JSON)

    @api.post("/decode")
    async def decode(self, request: Request) -> Response:
        async def work() -> tuple[bytes, str, None]:
            body = await self._body(request)
            kind = serve_api.body_kind(request.headers.get("content-type"), body)
            out = serve_api.answer_kind(request.headers.get("accept"), kind)
            rt = self.runtime
            z, single = await _offload(len(body), serve_api.parse_latents, body, kind, rt.latent_shape, self.limits)
            serve_api.check_answer_size(len(z), rt.image_shape, self.limits)
            images = await self._run(DECODER, z)
            return (*await _offload(images.nbytes, serve_api.images_answer, images[0] if single else images, out), None)

        return await self._answer(work)

    @api.post("/encode")
    async def encode(self, request: Request) -> Response:
        async def work() -> tuple[bytes, str, None]:
            if not self.has_encoder:
                raise serve_api.HttpError(404, "this export has no encoder graph; /encode is not available")
            body = await self._body(request)
            kind = serve_api.body_kind(request.headers.get("content-type"), body)
            out = serve_api.answer_kind(request.headers.get("accept"), kind)
            rt = self.runtime
            x, single = await _offload(
                len(body), serve_api.parse_images, body, kind, rt.image_shape, rt.value_range, self.limits
            )
            mu, logvar = await self._run(ENCODER, x)
            if single:
                mu, logvar = mu[0], None if logvar is None else logvar[0]
            return (*await _offload(mu.nbytes, serve_api.latents_answer, mu, logvar, out), None)

        return await self._answer(work)

    @api.get("/sample")
    async def sample(self, request: Request) -> Response:
        async def work() -> tuple[bytes, str, dict[str, str]]:
            query = serve_api.parse_sample_query(dict(request.query_params), self.runtime.image_shape, self.limits)
            seed = serve_api.fresh_seed() if query.seed is None else query.seed

            def run() -> tuple[bytes, str]:
                images = self.runtime.sample(query.n, seed, bernoulli=query.bernoulli)
                return serve_api.sample_answer(images, query)

            body, media = await asyncio.to_thread(run)
            return body, media, {"X-Seed": str(seed)}

        return await self._answer(work)


# --- starting and stopping ----------------------------------------------------------------------


def check_export(export_dir: str | Path, precision: str = "fp32") -> None:
    """Fail before starting anything when the export cannot be served: manifest, files, sha256s."""
    manifest = read_manifest(export_dir)
    fmt = PRECISION_FORMAT[precision]
    decoder = manifest.entry(DECODER, fmt)
    if decoder is None:
        raise ExportError(f"{export_dir} lists no decoder {fmt!r} file; it has {manifest.formats(DECODER) or 'none'}")
    for entry in (decoder, manifest.entry(ENCODER, "onnx")):
        if entry is not None:
            read_verified(export_dir, entry)


def _check_address(host: str, port: int) -> None:
    if not isinstance(host, str) or not host:
        raise UsageError(f"host must be a host name or address, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UsageError(f"port must be between 0 and 65535 (0: any free port), got {port!r}")


def _bind_probe(host: str, port: int) -> int:
    """Bind ``host:port`` once to learn that it is free (port 0: which port the OS picks)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(f"cannot serve on host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} on {host} is in use; pick another --port (0: any free port)") from None
            raise ServeError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
        return s.getsockname()[1]


def _replica_resources(config: ServeConfig) -> dict[str, float]:
    """Ray resources per replica, checked against what the cluster has free (else Serve would wait forever)."""
    total, free = ray.cluster_resources(), ray.available_resources()
    cpus = config.cpus_per_replica
    if cpus is None:
        cpus = min(1.0, total.get("CPU", 1.0) / config.replicas)
    gpus = config.gpus_per_replica
    if gpus is None:
        cluster_gpus = total.get("GPU", 0.0)
        gpus = min(1.0, cluster_gpus / config.replicas) if config.provider != "cpu" and cluster_gpus else 0.0
    if config.provider == "cuda" and gpus == 0:
        raise UsageError("provider 'cuda' needs GPUs for the replicas, and the Ray cluster has none")
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        need, have = each * config.replicas, free.get(name, 0.0)
        if need > have + 1e-9:
            raise ServeError(
                f"{config.replicas} replica(s) x {each:g} {name} need {need:g} {name}s, and the Ray cluster has "
                f"{have:g} free; use fewer --replicas or a smaller {name.lower()}s_per_replica"
            )
    return {"num_cpus": cpus, "num_gpus": gpus}


def _deploy_error(app: str, exc: BaseException) -> str:
    """Why an app's replicas failed: the last exception line of their traceback in the app's
    status (``IntegrityError: decoder.onnx ...``), else Ray's own message."""
    try:
        deployments = serve.status().applications[app].deployments.values()
        message = "\n".join(d.message for d in deployments)
    except Exception:  # noqa: BLE001 - the status is a nicety; Ray's message is the fallback
        message = ""
    found = re.findall(r"^(?:[\w]+\.)*(\w+(?:Error|Exception)): (.+)$", message, flags=re.MULTILINE)
    if found:
        kind, text = found[-1]
        return f"{kind}: {text}"[:300]
    return first_line(exc, 300)


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"{url} did not answer 200 within {timeout_s:g} s")
        time.sleep(0.1)


class Server:
    """A running Ray Serve HTTP server holding vae-deploy apps; :meth:`shutdown` stops what it started."""

    def __init__(self, host: str, port: int, owns_ray: bool) -> None:
        self.host, self.port, self.owns_ray = host, port, owns_ray
        self.apps: dict[str, str] = {}
        self._stopped = False

    @property
    def url(self) -> str:
        """The base URL (``http://host:port``) of the first app deployed."""
        return next(iter(self.apps.values()), self.base_url)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "[::1]" if self.host == "::" else self.host
        return f"http://{host}:{self.port}"

    def deploy(
        self,
        export_dir: str | Path,
        config: ServeConfig | None = None,
        *,
        name: str = "vae",
        route_prefix: str = "/",
        timeout_s: float = 120.0,
    ) -> str:
        """Serve another export (or the same with other settings) as app ``name`` under
        ``route_prefix``; returns its URL once it answers. Replaces an app of the same name."""
        config = config or ServeConfig()
        if not route_prefix.startswith("/"):
            raise UsageError(f"route_prefix must start with '/', got {route_prefix!r}")
        check_export(export_dir, config.precision)
        resources = _replica_resources(config)
        deployment = VAEService.options(
            num_replicas=config.replicas,
            max_ongoing_requests=config.ongoing(),
            max_queued_requests=config.max_queued_requests,
            ray_actor_options=resources,
            logging_config=LoggingConfig(log_level="WARNING", enable_access_log=config.access_log),
        )
        try:
            serve.run(deployment.bind(str(Path(export_dir).resolve()), config), name=name, route_prefix=route_prefix)
        except Exception as exc:  # noqa: BLE001 - the replicas' error is in the app's status
            reason = _deploy_error(name, exc)
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - best effort; the error below is what matters
                pass
            raise ServeError(f"could not deploy {export_dir}: {reason}") from None
        url = self.base_url + route_prefix.rstrip("/")
        _wait_healthy(url + "/healthz", timeout_s)
        self.apps[name] = url
        return url

    def wait(self) -> None:
        """Block until interrupted (Ctrl-C or SIGTERM turned into KeyboardInterrupt by the caller)."""
        while True:
            time.sleep(3600)

    def shutdown(self) -> None:
        """Stop Serve (and Ray, if this server started it). Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.owns_ray:
            ray.shutdown()  # takes Serve's actors with it (serve.shutdown first only adds ~4 s)
        else:
            serve.shutdown()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def start(
    export_dir: str | Path,
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "vae",
    route_prefix: str = "/",
    address: str | None = None,
    quiet: bool = False,
    timeout_s: float = 120.0,
) -> Server:
    """Serve an export folder over HTTP on Ray Serve; returns once it answers (non-blocking).

    Starts a local Ray instance unless Ray is already initialised in this process or ``address``
    names a cluster (replicas there must see ``export_dir`` at the same path). ``port=0`` picks a
    free port. One Server per Ray cluster: add more apps with :meth:`Server.deploy`. ``quiet``
    keeps Ray's own log lines out of the console (they still go to Ray's log files).
    """
    config = config or ServeConfig()
    _check_address(host, port)
    check_export(export_dir, config.precision)  # fail in one line before Ray starts
    port = _bind_probe(host, port)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        level = logging.WARNING if quiet else logging.INFO
        if address:
            ray.init(address=address, logging_level=level, log_to_driver=not quiet)
        else:
            ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=not quiet)
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    server = Server(host, port, owns_ray)
    try:
        try:
            serve.start(
                http_options=HTTPOptions(host=host, port=server.port),
                logging_config=LoggingConfig(log_level="WARNING", enable_access_log=config.access_log),
            )
        except Exception as exc:  # noqa: BLE001 - Ray's own failures (actors dying, timeouts) in one line
            raise ServeError(f"Ray Serve did not start: {type(exc).__name__}: {first_line(exc)}") from None
        server.deploy(export_dir, config, name=name, route_prefix=route_prefix, timeout_s=timeout_s)
    except BaseException:
        server.shutdown()
        raise
    return server

"""Batched, seeded VAE inference on ONNX Runtime for an export folder: onnxruntime + numpy only.

    rt = VAERuntime("exported")                 # provider="auto": CUDA if it really works, else CPU
    images = rt.sample(10_000, seed=0)          # [n, C, H, W] float32 in the model's value range
    mu, logvar = rt.encode(x)                   # x [n, C, H, W]
    x_hat = rt.decode(mu)

Exports that take any image size (diffusers-style VAEs: spatial latents [c, h, w], height and width
multiples of ``model.downsampling_factor``) encode and decode any size, and sample at the size
asked for: ``rt.sample(4, seed=0, latent_size=(64, 64))`` (or ``image_size=(512, 512)``).

Determinism: image i of ``sample(n, seed)`` depends only on (seed, i), never on ``batch_size``,
n or the provider: its first k images are ``sample(k, seed)`` and ``sample_rows(a, b, seed)`` is
its slice [a, b) (stream version 2, vae_deploy/streams.py; docs/CONTRACT.md gives the recipe).
On CPU the images are bitwise identical for every batch size and CPU plan; on CUDA z is identical
and the pixels agree to float rounding (cuBLAS picks kernels per shape).

Providers: ``"cuda"`` is the CUDA execution provider or a ``ProviderError`` saying what is missing
(onnxruntime itself silently falls back to CPU); ``"auto"`` uses CUDA when a session really got it
and records why not otherwise (``fallback_reason``). ``provider`` says what is used.

Integrity: only graph files listed in the manifest are opened, each read once, checked against its
sha256 and handed to onnxruntime as those very bytes; each graph's inputs and outputs are checked
against the contract at load and bound by name. Never imports torch or onnx.

Threads: ``decode``/``encode``/``sample`` may be called from several threads at once. CPU sessions
are thread-safe; the CUDA engine serialises its calls.

CPU plans (threads, spinning, small/large sessions, row chunking; ``CpuPlan``): ``cpu_plan="auto"``
(the default) uses the plan ``vae-deploy tune`` cached for this CPU, onnxruntime version and graph
file (vae_deploy.plans), else the built-in default; ``"tuned"`` also tunes and caches one on first
use (a few seconds, once per machine and file); ``"default"`` ignores the cache; a ``CpuPlan``
fixes everything (tests, Ray actors). ``plan_source`` says which plan each graph got. A plan never
changes results.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vae_deploy import inputs, plans, sessions
from vae_deploy.config import DEVICES
from vae_deploy.contract import DECODER, ENCODER, LOGVAR, MEAN, PRECISION_FORMAT, GraphSpec, ModelSpec
from vae_deploy.decoding import sample_batches
from vae_deploy.engines import CpuEngine, CpuPlan, Engine, open_engine
from vae_deploy.errors import ExportError, ProviderError, UsageError
from vae_deploy.files import sha256_bytes
from vae_deploy.manifest import read_manifest, read_verified
from vae_deploy.resources import require_memory
from vae_deploy.streams import sample_streams

PROVIDERS = DEVICES
PRECISIONS = tuple(PRECISION_FORMAT)
PLAN_CHOICES = ("auto", "tuned", "default")
CUDA_SAMPLE_BATCH = 1024
SPATIAL_BATCH_BYTES = 4 << 20  # default sample batch of any-size exports: ~4 MB of images per run
EXPORT_HINTS = {"fp16": " (export with --fp16)", "int8": " (export with --int8)"}
_F32 = np.dtype(np.float32)

GraphLoader = Callable[[], tuple[bytes, str]]  # -> (verified model bytes, name for errors)


class VAERuntime:
    """Decoder (and lazily the encoder) of an export folder on ONNX Runtime.

    ``provider``: "auto" (CUDA when a session really gets it, else CPU), "cuda" (or ProviderError),
    "cpu". ``intra_op_threads`` fixes the CPU thread count (one session); ``cpu_plan`` is "auto"
    (a cached tuned plan, else the default), "tuned" (tune on first use), "default" or a
    ``CpuPlan`` (see the module doc). ``precision="fp16"`` loads the optional ``decoder.fp16.onnx``,
    ``"int8"`` the optional ``decoder.int8.onnx`` (``vae-deploy export --int8``; CPU).
    ``cuda_graphs`` captures one CUDA graph per batch bucket for host-output decode/sample;
    ``tf32`` lets CUDA use TF32 for fp32 math (off: CUDA matches the CPU to the contract's
    tolerance). Sets onnxruntime's process-wide default log severity to ``log_severity``.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        provider: str = "auto",
        *,
        intra_op_threads: int | None = None,
        cpu_plan: CpuPlan | str | None = "auto",
        precision: str = "fp32",
        device_id: int = 0,
        cuda_graphs: bool = True,
        tf32: bool = False,
        log_severity: int = sessions.LOG_ERRORS_ONLY,
    ) -> None:
        _check_options(provider, precision, intra_op_threads, cpu_plan)
        self.export_dir: Path | None = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        fmt = PRECISION_FORMAT[precision]
        loaders: dict[str, tuple[GraphLoader, GraphSpec]] = {}
        self._digests = {}
        for graph, wanted in ((DECODER, fmt), (ENCODER, "onnx")):
            entry = self.manifest.entry(graph, wanted)
            if entry is not None:
                loaders[graph] = (self._folder_loader(entry), entry.spec)
                self._digests[graph] = entry.sha256
        if DECODER not in loaders:
            hint = EXPORT_HINTS.get(precision, "")
            have = self.manifest.formats(DECODER)
            raise ExportError(f"{self.export_dir} lists no decoder {fmt!r} file{hint}; it has {have or 'none'}")
        self._setup(self.manifest.model, loaders, provider, precision, intra_op_threads, cpu_plan,
                    device_id, cuda_graphs, tf32, log_severity)  # fmt: skip

    @classmethod
    def from_files(
        cls,
        model: ModelSpec,
        decoder: str | os.PathLike,
        encoder: str | os.PathLike | None = None,
        provider: str = "auto",
        *,
        precision: str = "fp32",
        intra_op_threads: int | None = None,
        cpu_plan: CpuPlan | str | None = "auto",
        device_id: int = 0,
        cuda_graphs: bool = True,
        tf32: bool = False,
        log_severity: int = sessions.LOG_ERRORS_ONLY,
    ) -> VAERuntime:
        """A runtime over ONNX files outside an export folder (e.g. a benchmark's quantized copy).

        The caller vouches for the files (there is no manifest to check them against); their
        inputs and outputs must still be ``model``'s contract.
        """
        _check_options(provider, precision, intra_op_threads, cpu_plan)
        self = cls.__new__(cls)
        self.export_dir, self.manifest = None, None
        self._digests = {}  # hashed from the bytes, if a cached plan is looked up

        def loader(path: str | os.PathLike) -> GraphLoader:
            return lambda: (Path(path).read_bytes(), Path(path).name)

        loaders = {DECODER: (loader(decoder), model.decoder(precision))}
        if encoder is not None:
            loaders[ENCODER] = (loader(encoder), model.encoder())
        self._setup(model, loaders, provider, precision, intra_op_threads, cpu_plan,
                    device_id, cuda_graphs, tf32, log_severity)  # fmt: skip
        return self

    def _folder_loader(self, entry: Any) -> GraphLoader:
        folder = self.export_dir
        return lambda: (read_verified(folder, entry), f"{entry.file} in {folder}")

    def _setup(
        self,
        model: ModelSpec,
        loaders: dict[str, tuple[GraphLoader, GraphSpec]],
        provider: str,
        precision: str,
        intra_op_threads: int | None,
        cpu_plan: CpuPlan | str | None,
        device_id: int,
        cuda_graphs: bool,
        tf32: bool,
        log_severity: int,
    ) -> None:
        if intra_op_threads is not None:
            cpu_plan = CpuPlan(small_batch_max=0, threads=inputs.count(intra_op_threads, "intra_op_threads"))
        self._plan_choice = "auto" if cpu_plan is None else cpu_plan
        self.cpu_plan = cpu_plan if isinstance(cpu_plan, CpuPlan) else CpuPlan()  # the decoder's, once open
        self.plan_source: dict[str, str] = {}
        self.model = model
        self.latent_shape: tuple = tuple(model.latent_shape)
        self.image_shape: tuple = tuple(model.image_shape)
        self.latent_dim: int | None = model.latent_dim
        self.value_range = model.value_range
        self.precision = precision
        self.fallback_reason: str | None = None
        self._loaders = loaders
        self._engine_options = dict(device_id=device_id, log_level=log_severity, tf32=tf32)
        self._cuda_graphs = cuda_graphs
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        sessions.set_log_severity(log_severity)
        self.provider = self._resolve_provider(provider)
        self._engines[DECODER] = self._open(DECODER)
        static = all(isinstance(d, int) for d in self.latent_shape)
        # decode's common path, decided once: the shape it accepts and (CPU) the session call it
        # makes directly; None sends every call through the checked path
        self._latent_rows = self.latent_shape if static else None
        decoder = self._engines[DECODER]
        self._lean = decoder.lean_call() if isinstance(decoder, CpuEngine) else None

    # engines ------------------------------------------------------------------------------------

    def _resolve_provider(self, provider: str) -> str:
        if provider == "cpu":
            return "cpu"
        if self.precision == "int8":  # QGemm and friends are onnxruntime CPU kernels
            if provider == "cuda":
                raise UsageError("the int8 decoder runs on the CPU: use provider='cpu' or 'auto'")
            self.fallback_reason = "the int8 decoder runs on the CPU (onnxruntime's int8 kernels are CPU kernels)"
            return "cpu"
        unavailable = sessions.cuda_unavailable()
        if unavailable:
            if provider == "cuda":
                raise sessions.cuda_error(unavailable)
            self.fallback_reason = unavailable
            return "cpu"
        return provider  # "cuda" or "auto": settled when the decoder's engine is created

    def _open(self, graph: str) -> Engine:
        load, spec = self._loaders[graph]
        model, name = load()
        cuda_graphs = self._cuda_graphs and graph == DECODER
        if self.provider == "auto":
            try:
                engine = open_engine(
                    model,
                    name,
                    spec,
                    "cuda",
                    plan=CpuPlan(),
                    cuda_graphs=cuda_graphs,
                    **self._engine_options,
                )
                self.provider = "cuda"
                return engine
            except ProviderError as exc:
                self.fallback_reason = exc.reason
                self.provider = "cpu"
        plan = self._plan_for(graph, model, name, spec) if self.provider == "cpu" else CpuPlan()
        return open_engine(
            model,
            name,
            spec,
            self.provider,
            plan=plan,
            cuda_graphs=cuda_graphs,
            **self._engine_options,
        )

    def _plan_for(self, graph: str, model: bytes, name: str, spec: GraphSpec) -> CpuPlan:
        """The CPU plan of one graph: explicit, cached for this machine and file, tuned now, or the default."""
        choice = self._plan_choice
        if isinstance(choice, CpuPlan):
            plan, source = choice, "given"
        elif choice == "default":
            plan, source = CpuPlan(), "default"
        else:
            digest = self._digests.get(graph) or sha256_bytes(model)
            cached = plans.load_plan(digest)
            if cached is None and choice == "tuned":
                from vae_deploy.tune import tune_bytes  # measures for a few seconds, once per machine and file

                cached = tune_bytes(model, spec, name)
            plan, source = (cached.plan, f"cached ({cached.path})") if cached else (CpuPlan(), "default (none cached)")
        self.plan_source[graph] = source
        if graph == DECODER:
            self.cpu_plan = plan
        return plan

    def engine(self, graph: str) -> Engine:
        """The engine running ``"decoder"`` or ``"encoder"`` (the encoder is opened, and its file
        checked, on first use). Benchmarks use its ``session_for``/``settings_for`` seams."""
        if graph not in self._engines:
            if graph not in self._loaders:
                raise ExportError(f"{self.export_dir or 'this runtime'} has no {graph} graph")
            with self._lock:
                if graph not in self._engines:
                    self._engines[graph] = self._open(graph)
        return self._engines[graph]

    @property
    def providers(self) -> list[str]:
        """The execution providers the decoder session really uses, in priority order."""
        return list(self._engines[DECODER].session_for(1).get_providers())

    # inference ----------------------------------------------------------------------------------

    def decode(self, z: Any, *, device_output: bool = False) -> Any:
        """Images [batch, C, H, W] float32 for latents z [batch, *latent_shape].

        One unbatched latent gives one image. float64/int input is cast. ``device_output=True`` on
        CUDA returns a CUDA OrtValue (``torch.from_dlpack`` takes it); on CPU the numpy result.
        """
        # The common call (a C-contiguous float32 batch of finite, bounded latents, on the CPU) costs
        # a few attribute checks and one float32 dot product (inputs.plain_latents, inlined: each
        # Python frame here is ~2% of a batch-1 run) before onnxruntime runs; anything else takes
        # the checked path, which converts or says what was expected.
        lean = self._lean
        if (
            lean is not None
            and type(z) is np.ndarray
            and z.dtype is _F32
            and z.shape[1:] == self._latent_rows
            and 0 < z.shape[0] <= lean.max_batch
            and not device_output
            and z.flags.c_contiguous
            and np.vdot(z, z) <= inputs.MAX_ABS_LATENT_SQ
        ):
            return lean.run(lean.names, {lean.input: z}, lean.options)[0]
        return self._decode_checked(z, device_output)

    def _decode_checked(self, z: Any, device_output: bool) -> Any:
        z, single = inputs.batch_of(z, "z", self.latent_shape)
        inputs.check_latents(z)
        engine = self._engines[DECODER]
        if device_output:
            if single:
                raise UsageError(
                    f"device_output=True needs a batched z [batch, {', '.join(map(str, self.latent_shape))}]"
                )
            if self.provider == "cuda":
                return engine.run_device(z)[0]
        x = engine.run_first(z)
        return x[0] if single else x

    def encode(self, x: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """(mu, logvar), each [batch, *latent_shape], for images x [batch, C, H, W] in the value
        range. logvar is None for a model that encodes deterministically."""
        x, single = self._images(x)
        engine = self.engine(ENCODER)
        outs = dict(zip(engine.outputs, engine.run(x)))
        mu, logvar = outs[MEAN], outs.get(LOGVAR)
        if single:
            return mu[0], None if logvar is None else logvar[0]
        return mu, logvar

    def reconstruct(self, x: Any) -> np.ndarray:
        """Deterministic reconstruction through the posterior mean: decode(encode(x).mu)."""
        x, single = self._images(x)
        engine = self.engine(ENCODER)
        mu = dict(zip(engine.outputs, engine.run(x)))[MEAN]
        out = self._engines[DECODER].run(np.ascontiguousarray(mu, dtype=np.float32))[0]
        return out[0] if single else out

    def _images(self, x: Any) -> tuple[np.ndarray, bool]:
        x, single = inputs.batch_of(x, "x", self.image_shape)
        inputs.check_images(x, self.value_range)
        if self.model.dynamic_size and self.model.downsampling_factor:
            inputs.check_multiple(x.shape[2:], self.model.downsampling_factor, "x's height and width")
        return x, single

    # sampling -----------------------------------------------------------------------------------

    def _static(self, what: str, shape: tuple) -> tuple[int, ...]:
        if not all(isinstance(d, int) for d in shape):
            raise UsageError(f"this export's {what} {list(shape)} has symbolic sizes; sampling needs fixed ones")
        return shape

    def _sample_shapes(self, latent_size: Any, image_size: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(latent, image) shapes of one sample: the export's fixed ones, or at the size asked for."""
        if self.model.dynamic_size and latent_size is None and image_size is None:
            f = self.model.downsampling_factor
            raise UsageError(
                f"this export takes any size: pass latent_size=(latent_height, latent_width) or image_size=(height, "
                f"width) (images are {f or '?'}x the latent size)"
            )
        return self.model.shapes_at(image_size=image_size, latent_size=latent_size)

    def _check_sample_args(
        self, n: Any, batch_size: Any, rows_kept: int | None, image_shape: tuple[int, ...] | None = None
    ) -> tuple[int, int]:
        n = inputs.count(n, "n")
        image_shape = image_shape or self._static("image shape", self.image_shape)
        default = CUDA_SAMPLE_BATCH if self.provider == "cuda" else self.cpu_plan.sample_batch
        row_bytes = 4 * math.prod(image_shape)
        if self.model.dynamic_size:  # large images: default to about SPATIAL_BATCH_BYTES of them per run
            default = max(1, min(default, SPATIAL_BATCH_BYTES // row_bytes))
        batch = min(n, default if batch_size is None else inputs.count(batch_size, "batch_size"))
        need = row_bytes * (n if rows_kept is None else min(n, max(batch, rows_kept)))
        require_memory(
            need,
            f"{n} samples of shape {list(image_shape)}",
            "use sample_iter() to stream them in batches" if rows_kept is None else "use a smaller batch_size",
        )
        return n, batch

    def _streams(self, seed: Any, bernoulli: bool, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[Any, Any]:
        latent, image = shapes
        return sample_streams(seed, latent, image if bernoulli else None)

    def sample_iter(
        self,
        n: int,
        seed: Any = None,
        batch_size: int | None = None,
        bernoulli: bool = False,
        *,
        start: int = 0,
        latent_size: tuple[int, int] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield images ``start .. start + n - 1`` of ``sample(start + n, seed, ...)`` batch by batch:
        memory bounded by one batch, and no rows before ``start`` are drawn or decoded."""
        shapes = self._sample_shapes(latent_size, image_size)
        n, batch = self._check_sample_args(n, batch_size, rows_kept=0, image_shape=shapes[1])
        start = inputs.index(start, "start")
        z_stream, pixel_stream = self._streams(seed, bernoulli, shapes)
        yield from sample_batches(self._engines[DECODER], z_stream, pixel_stream, start, start + n, batch)

    def sample_rows(
        self,
        start: int,
        stop: int,
        seed: Any,
        batch_size: int | None = None,
        bernoulli: bool = False,
        *,
        latent_size: tuple[int, int] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Images [start, stop) of ``sample(stop, seed, ...)`` as one array: what one shard or one
        worker draws, without touching the rows before ``start``. Pass an int seed."""
        start, stop = inputs.row_range(start, stop)
        image_shape = self._sample_shapes(latent_size, image_size)[1]
        n, _ = self._check_sample_args(stop - start, batch_size, rows_kept=None, image_shape=image_shape)
        out = np.empty((n, *image_shape), np.float32)
        row = 0
        sizes = dict(latent_size=latent_size, image_size=image_size)
        for x in self.sample_iter(n, seed, batch_size, bernoulli, start=start, **sizes):
            out[row : row + len(x)] = x
            row += len(x)
        return out

    def sample(
        self,
        n: int,
        seed: Any = None,
        batch_size: int | None = None,
        bernoulli: bool = False,
        device_output: bool = False,
        progress: Callable[[int], None] | None = None,
        *,
        latent_size: tuple[int, int] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> Any:
        """n images [n, C, H, W] float32 decoded from z ~ N(0, I); image i depends only on the seed.

        ``bernoulli=True`` returns 0/1 pixel draws from the decoded probabilities (seeded too).
        ``batch_size`` only changes speed and memory. ``progress(k)`` is called after each batch
        with the number of samples it added. ``device_output=True`` on CUDA returns one CUDA
        OrtValue holding all n images (DLPack-capable); on CPU a numpy array.

        Exports that take any size need ``latent_size=(h, w)`` or ``image_size=(H, W)``. The prior
        is the VAE's own: z ~ N(0, I) in the decoder's input space (unscaled latents; a diffusion
        model's latents are ``z * scaling_factor`` shifted). A KL VAE's decodes of prior draws are
        rarely pictures (its KL weight is tiny; diffusion models generate its latents); a VAE without
        logvar (AutoencoderTiny) has no prior, and N(0, I) is only a convention there.
        """
        shapes = self._sample_shapes(latent_size, image_size)
        image_shape = shapes[1]
        n, batch = self._check_sample_args(n, batch_size, rows_kept=None, image_shape=image_shape)
        z_stream, pixel_stream = self._streams(seed, bernoulli, shapes)
        engine = self._engines[DECODER]
        # On CUDA, plain samples go straight into one device buffer; Bernoulli draws are made on the
        # host (numpy's generator) and uploaded at the end.
        to_device = device_output and self.provider == "cuda"
        device = None
        if to_device and pixel_stream is None:
            device = sessions.device_array([n, *image_shape], np.float32, self._engine_options["device_id"])
        host = None if device is not None else np.empty((n, *image_shape), np.float32)
        for start in range(0, n, batch):
            b = min(batch, n - start)
            z = z_stream.take(b)
            if device is not None:
                engine.run_device_into(z, device, start)
            else:
                rows = host[start : start + b]
                engine.run_into(z, rows)  # no intermediate copy on CPU
                if pixel_stream is not None:
                    rows[...] = pixel_stream.take(b) < rows
            if progress is not None:
                progress(b)
        if to_device and device is None:
            return ort.OrtValue.ortvalue_from_numpy(host, "cuda", self._engine_options["device_id"])
        return device if device is not None else host

    def __repr__(self) -> str:
        return (
            f"VAERuntime({str(self.export_dir)!r}, provider={self.provider!r}, "
            f"latent_shape={list(self.latent_shape)}, image_shape={list(self.image_shape)})"
        )


def _check_options(provider: str, precision: str, intra_op_threads: Any, cpu_plan: Any) -> None:
    if provider not in PROVIDERS:
        raise UsageError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    named = isinstance(cpu_plan, str) and cpu_plan in PLAN_CHOICES
    if not (cpu_plan is None or named or isinstance(cpu_plan, CpuPlan)):
        raise UsageError(f"cpu_plan must be one of {PLAN_CHOICES} or a CpuPlan, got {cpu_plan!r:.80}")
    if intra_op_threads is not None:
        if cpu_plan not in (None, "auto"):
            raise UsageError("give either intra_op_threads or cpu_plan, not both")
        inputs.count(intra_op_threads, "intra_op_threads")

"""The export contract, in one place: what each graph takes and gives, file names, metadata keys,
tolerances, and the manifest that records them (docs/CONTRACT.md describes it for users).

The exporter writes from it, ``verify`` checks against it, and the runtime binds inputs and
outputs by its names; nobody else spells a tensor name, a file name or a metadata key. Torch-free
and onnxruntime-free, so every side can import it.

Version 2 of the contract (this one) holds what version 1 could not: symbolic dimensions (batch,
and height/width for spatial latents), vector ``[N, d]`` or spatial ``[N, c, h, w]`` latents, an
optional logvar, the image value range, latent scale/shift factors, the source of the weights and
a tolerance per graph file. Version-1 manifests are still read (:func:`parse_manifest`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from vae_deploy.errors import ExportError, UsageError

FORMAT = "vae-deploy-export"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"

# --- the sampling stream ------------------------------------------------------------------------
# How ``VAERuntime.sample(n, seed)`` draws its randomness (docs/CONTRACT.md has the numpy recipe).
# It belongs to the runtime, not to the export files: every export, old or new, samples with the
# stream of the vae-deploy that runs it, and sample files (shard indexes) record its version.
# Version 1 (vae-deploy 0.1): one sequential PCG64 stream per seed, so row i could not be drawn
# without drawing rows 0..i-1. Version 2: rows come in blocks of SAMPLE_BLOCK_ROWS, block k with
# its own key (seed, spawn_key=(k,)), so row i depends only on (seed, i) and any worker can draw
# any row range.
SAMPLE_STREAM_VERSION = 2
SAMPLE_BLOCK_ROWS = 1024  # rows per keyed block; fixed forever for stream version 2
SAMPLE_PIXEL_KEY = 1  # Bernoulli uniforms of block k: spawn_key=(k, SAMPLE_PIXEL_KEY)

# --- names --------------------------------------------------------------------------------------

ENCODER, DECODER = "encoder", "decoder"
GRAPHS = (ENCODER, DECODER)
IMAGE = "x"  # encoder input: images [batch, C, H, W] in value_range
MEAN = "mu"  # encoder output: posterior mean (the latents themselves when there is no logvar)
LOGVAR = "logvar"  # encoder output: posterior log-variance (optional)
LATENT = "z"  # decoder input: latents [batch, *latent_shape]
RECON = "x_hat"  # decoder output: images [batch, C, H, W] in value_range
BATCH = "batch"  # the symbolic dimension every tensor starts with
HEIGHT, WIDTH = "height", "width"  # symbolic image sizes of spatial-latent VAEs
LATENT_HEIGHT, LATENT_WIDTH = "latent_height", "latent_width"  # = height / downsampling_factor, ...

# (graph, format) -> file name. A format names the file kind and its precision.
FILES: dict[tuple[str, str], str] = {
    (ENCODER, "onnx"): "encoder.onnx",
    (DECODER, "onnx"): "decoder.onnx",
    (DECODER, "onnx-fp16"): "decoder.fp16.onnx",
    (DECODER, "onnx-int8"): "decoder.int8.onnx",
    (ENCODER, "torchscript"): "encoder.torchscript",
    (DECODER, "torchscript"): "decoder.torchscript",
    (ENCODER, "pt2"): "encoder.pt2",
    (DECODER, "pt2"): "decoder.pt2",
}
ONNX_FORMATS = ("onnx", "onnx-fp16", "onnx-int8")  # the files onnxruntime runs
TORCH_FORMATS = ("torchscript", "pt2")
PRECISION = {"onnx": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8", "torchscript": "fp32", "pt2": "fp32"}
PRECISION_FORMAT = {"fp32": "onnx", "fp16": "onnx-fp16", "int8": "onnx-int8"}  # the ONNX decoder file of each
PRECISIONS = tuple(PRECISION_FORMAT)
EXPORT_FILES = (MANIFEST, *FILES.values())  # every name an export may hold; anything else is not ours


def file_name(graph: str, fmt: str) -> str:
    """The file name of one graph in one format (ExportError for a pair the contract lacks)."""
    try:
        return FILES[(graph, fmt)]
    except KeyError:
        raise ExportError(f"the export contract has no {graph} file in format {fmt!r}") from None


# ONNX metadata_props keys (string values), so an app holding only the .onnx file knows its contract.
META_GRAPH = "vae_deploy.graph"
META_LATENT_DIM = "vae_deploy.latent_dim"  # vector latents only ("20")
META_LATENT_SHAPE = "vae_deploy.latent_shape"  # JSON, e.g. "[20]" or "[4, \"latent_height\", ...]"
META_IMAGE_SHAPE = "vae_deploy.image_shape"
META_VALUE_RANGE = "vae_deploy.value_range"
META_SCALING_FACTOR = "vae_deploy.scaling_factor"
META_SHIFT_FACTOR = "vae_deploy.shift_factor"
META_DOWNSAMPLING_FACTOR = "vae_deploy.downsampling_factor"  # spatial latents only ("8")
META_PRECISION = "vae_deploy.precision"
META_PRODUCER_VERSION = "vae_deploy.producer_version"
META_FORMAT_VERSION = "vae_deploy.format_version"
METADATA_KEYS = (
    META_GRAPH,
    META_LATENT_DIM,
    META_LATENT_SHAPE,
    META_IMAGE_SHAPE,
    META_VALUE_RANGE,
    META_SCALING_FACTOR,
    META_SHIFT_FACTOR,
    META_DOWNSAMPLING_FACTOR,
    META_PRECISION,
    META_PRODUCER_VERSION,
    META_FORMAT_VERSION,
)

Dim = int | str  # a fixed size, or a symbolic name ("batch", "height", ...)


def format_shape(shape: Any) -> str:
    """``[batch, 1, 28, 28]``: a shape as people write it (names unquoted, unknown sizes as ?)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# --- tensors and graphs -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape (``shape[0]`` is ``"batch"``), dtype (a numpy name) and,
    for values confined to an interval (images), that closed interval."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None

    @property
    def row_shape(self) -> tuple[Dim, ...]:
        return self.shape[1:]

    @property
    def static_rows(self) -> bool:
        """Whether every dimension after the batch is a fixed size."""
        return all(isinstance(d, int) for d in self.row_shape)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.value_range is not None:
            out["range"] = list(self.value_range)
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ExportError(f"{where}: a tensor entry needs a 'name' (got {_short(d)})")
        shape = d.get("shape")
        if not isinstance(shape, list) or not shape or not all(_is_dim(s) for s in shape):
            raise ExportError(f"{where}: tensor {d['name']!r} needs a shape of sizes or names")
        dtype = d.get("dtype", "float32")
        if dtype not in ("float32", "float16"):
            raise ExportError(f"{where}: tensor {d['name']!r} has dtype {_short(dtype)}; expected float32")
        rng = d.get("range")
        if rng is not None and not _is_range(rng):
            raise ExportError(f"{where}: tensor {d['name']!r} has a bad range {_short(rng)}")
        return cls(d["name"], tuple(shape), dtype, tuple(float(v) for v in rng) if rng else None)


@dataclass(frozen=True)
class Tolerance:
    """Pass rule of verify for one graph file: ``|exported - eager| <= atol + rtol * |eager|``."""

    atol: float
    rtol: float = 0.0

    def __str__(self) -> str:
        return f"atol {self.atol:.0e}" + (f" rtol {self.rtol:.0e}" if self.rtol else "")

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Tolerance:
        ok = isinstance(d, dict) and all(_is_number(d.get(k, 0.0)) and d.get(k, 0.0) >= 0 for k in d)
        if not ok or not _is_number(d.get("atol")):
            raise ExportError(f"{where}: tolerance must be {{'atol': >= 0, 'rtol': >= 0}}, got {_short(d)}")
        return cls(float(d["atol"]), float(d.get("rtol", 0.0)))


# Default tolerances per (precision, graph). fp32, measured on MNIST-trained MLP and conv models
# (onnxruntime CPU vs eager, batch 1-256): x_hat <= 2.4e-7, mu/logvar <= 1.2e-6 (float32
# re-association in fused kernels); TorchScript and pt2 match exactly. 40-80x headroom, yet any
# real bug (a wrong weight, op or layout) moves outputs by 1e-3 or more. fp16 (11-bit significand):
# the fp16 decoder's x_hat measured <= 1.5e-4. Exporters of larger graphs record larger ones.
# int8 (static, per-tensor; vae_deploy.quantize): the export gate's default largest error,
# INT8_MAX_ERROR_255 levels of 255 over the value range (measured on the MNIST MLP: max 0.9/255
# against fp32 over 4096 prior draws); the exporter records the one it checked.
INT8_MEAN_ERROR_255 = 0.5  # the int8 export gate: mean |int8 - fp32| in 1/255 of the value range
INT8_MAX_ERROR_255 = 4.0  # ... and the largest
DEFAULT_TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("fp32", ENCODER): Tolerance(atol=1e-4, rtol=1e-5),
    ("fp32", DECODER): Tolerance(atol=1e-5),
    ("fp16", ENCODER): Tolerance(atol=5e-2, rtol=1e-2),
    ("fp16", DECODER): Tolerance(atol=1e-2),
    ("int8", ENCODER): Tolerance(atol=5e-2, rtol=1e-2),
    ("int8", DECODER): Tolerance(atol=INT8_MAX_ERROR_255 / 255),
}


@dataclass(frozen=True)
class GraphSpec:
    """Everything the exporter, verify and the runtime need to know about one graph file."""

    name: str  # ENCODER | DECODER
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(1e-5))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def io(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    def signature(self) -> str:
        def fmt(ts: tuple[TensorSpec, ...]) -> str:
            return ", ".join(f"{t.name} {t.dtype}{format_shape(t.shape)}" for t in ts)

        return f"{fmt(self.inputs)} -> {fmt(self.outputs)}"


# --- the model's contract -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What a VAE's two graphs take and give, independent of file formats.

    ``latent_shape`` is ``(d,)`` for vector latents or ``(c, "latent_height", "latent_width")`` for
    spatial ones; ``image_shape`` is ``(C, H, W)`` with sizes or names. An app holding diffusion
    latents converts them with ``z = latents / scaling_factor + shift_factor`` before decoding.
    ``source`` says where the weights came from (``{"kind": "checkpoint", "path": ..., "sha256": ...}``).
    """

    latent_shape: tuple[Dim, ...]
    image_shape: tuple[Dim, ...]
    value_range: tuple[float, float] = (0.0, 1.0)
    has_logvar: bool = True
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    source: dict[str, Any] = field(default_factory=dict, compare=False)
    downsampling_factor: int | None = None

    @property
    def latent_dim(self) -> int | None:
        """d for vector latents ``[N, d]``; None for spatial ones."""
        return self.latent_shape[0] if len(self.latent_shape) == 1 and isinstance(self.latent_shape[0], int) else None

    @property
    def dynamic_size(self) -> bool:
        """Whether image (and latent) height and width are symbolic: any multiple of the factor."""
        return any(isinstance(d, str) for d in (*self.image_shape, *self.latent_shape))

    def shapes_at(
        self, image_size: tuple[int, int] | None = None, latent_size: tuple[int, int] | None = None
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(latent_shape, image_shape) with every size fixed: as declared for a fixed-size model, else
        at ``image_size`` (H, W: multiples of ``downsampling_factor``) or ``latent_size`` (h, w).
        UsageError saying what is expected otherwise."""
        if not self.dynamic_size:
            fixed = (tuple(self.latent_shape), tuple(self.image_shape))
            for name, value, own in (("image_size", image_size, fixed[1]), ("latent_size", latent_size, fixed[0])):
                if value is not None and (len(own) < 3 or tuple(value) != tuple(own[-2:])):
                    raise UsageError(
                        f"this model has fixed sizes (latent {list(fixed[0])}, image {list(fixed[1])}); "
                        f"{name}={value!r} does not fit them"
                    )
            return fixed  # type: ignore[return-value]
        f = self.downsampling_factor
        if (image_size is None) == (latent_size is None):
            raise UsageError(
                f"this model takes any image size (multiples of {f or '?'}): give exactly one of "
                "image_size=(height, width) or latent_size=(latent_height, latent_width)"
            )
        if f is None:
            raise UsageError("this export records no downsampling_factor, so sizes cannot be derived")
        named = "image_size" if image_size is not None else "latent_size"
        size = image_size if image_size is not None else latent_size
        ok = isinstance(size, (tuple, list)) and len(size) == 2
        if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
            raise UsageError(f"{named} must be two positive integers (height, width), got {size!r}")
        if image_size is not None and (size[0] % f or size[1] % f):
            raise UsageError(f"image_size must be multiples of the downsampling factor {f}, got {list(size)}")
        h, w = (size[0] // f, size[1] // f) if image_size is not None else tuple(size)
        values = {HEIGHT: h * f, WIDTH: w * f, LATENT_HEIGHT: h, LATENT_WIDTH: w}
        try:
            return (
                tuple(values[d] if isinstance(d, str) else d for d in self.latent_shape),
                tuple(values[d] if isinstance(d, str) else d for d in self.image_shape),
            )
        except KeyError as exc:
            raise UsageError(f"unknown symbolic size {exc.args[0]!r} in this export's shapes") from None

    def encoder(self, precision: str = "fp32", tolerance: Tolerance | None = None) -> GraphSpec:
        latent = (BATCH, *self.latent_shape)
        outputs = (TensorSpec(MEAN, latent),) + ((TensorSpec(LOGVAR, latent),) if self.has_logvar else ())
        return GraphSpec(
            ENCODER,
            inputs=(TensorSpec(IMAGE, (BATCH, *self.image_shape), value_range=self.value_range),),
            outputs=outputs,
            precision=precision,
            tolerance=tolerance or DEFAULT_TOLERANCES[(precision, ENCODER)],
        )

    def decoder(self, precision: str = "fp32", tolerance: Tolerance | None = None) -> GraphSpec:
        return GraphSpec(
            DECODER,
            inputs=(TensorSpec(LATENT, (BATCH, *self.latent_shape)),),
            outputs=(TensorSpec(RECON, (BATCH, *self.image_shape), value_range=self.value_range),),
            precision=precision,
            tolerance=tolerance or DEFAULT_TOLERANCES[(precision, DECODER)],
        )

    def graph(self, name: str, precision: str = "fp32", tolerance: Tolerance | None = None) -> GraphSpec:
        return (self.encoder if name == ENCODER else self.decoder)(precision, tolerance)

    def metadata(self, graph: str, precision: str, producer_version: str) -> dict[str, str]:
        """The ONNX metadata_props of one graph file (all values strings, JSON where structured)."""
        import json

        props = {
            META_GRAPH: graph,
            META_LATENT_SHAPE: json.dumps(list(self.latent_shape)),
            META_IMAGE_SHAPE: json.dumps(list(self.image_shape)),
            META_VALUE_RANGE: json.dumps(list(self.value_range)),
            META_SCALING_FACTOR: repr(float(self.scaling_factor)),
            META_SHIFT_FACTOR: repr(float(self.shift_factor)),
            META_PRECISION: precision,
            META_PRODUCER_VERSION: producer_version,
            META_FORMAT_VERSION: str(FORMAT_VERSION),
        }
        if self.latent_dim is not None:
            props[META_LATENT_DIM] = str(self.latent_dim)
        if self.downsampling_factor is not None:
            props[META_DOWNSAMPLING_FACTOR] = str(self.downsampling_factor)
        return props

    def to_dict(self) -> dict[str, Any]:
        out = {
            "latent_shape": list(self.latent_shape),
            "image_shape": list(self.image_shape),
            "value_range": list(self.value_range),
            "has_logvar": self.has_logvar,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "source": dict(self.source),
        }
        if self.downsampling_factor is not None:
            out["downsampling_factor"] = self.downsampling_factor
        return out


# --- the manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of an export: which graph and format, its sha256, and its graph contract."""

    graph: str
    format: str
    file: str
    sha256: str
    spec: GraphSpec

    @property
    def precision(self) -> str:
        return self.spec.precision

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.spec.precision,
            "tolerance": self.spec.tolerance.to_dict(),
            **self.spec.io(),
        }


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``: the model's contract and its files (``raw`` keeps the rest)."""

    format_version: int
    model: ModelSpec
    files: tuple[FileEntry, ...]
    raw: dict[str, Any] = field(compare=False, repr=False)

    def entry(self, graph: str, fmt: str) -> FileEntry | None:
        return next((e for e in self.files if e.graph == graph and e.format == fmt), None)

    def formats(self, graph: str) -> list[str]:
        return [e.format for e in self.files if e.graph == graph]


def manifest_dict(model: ModelSpec, files: list[FileEntry], **extra: Any) -> dict[str, Any]:
    """The JSON of a version-2 manifest (``extra``: producer, created, checkpoint, opset, ...)."""
    graphs: dict[str, dict[str, Any]] = {}
    for e in files:
        graphs.setdefault(e.graph, {})[e.format] = e.to_dict()
    out: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, **extra}
    out.update(model.to_dict())
    if model.latent_dim is not None:
        out["latent_dim"] = model.latent_dim  # what version-1 readers looked for
    out["graphs"] = graphs
    return out


def parse_manifest(data: Any, where: str = MANIFEST) -> Manifest:
    """Check a manifest's JSON (version 1 or 2) and return it parsed; ExportError naming the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{where} is not a vae-deploy export manifest (expected format={FORMAT!r})")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"{where} has no valid format_version (expected an integer >= 1)")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{where} has export format {version}, newer than this vae-deploy understands "
            f"({FORMAT_VERSION}); upgrade vae-deploy"
        )
    model = _model_v1(data, where) if version == 1 else _model_v2(data, where)
    graphs = data.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise ExportError(f"{where} lists no graphs (expected graphs -> encoder/decoder -> format)")
    files = []
    for graph, formats in graphs.items():
        if graph not in GRAPHS or not isinstance(formats, dict) or not formats:
            raise ExportError(f"{where}: graph {_short(graph)} is not one of {GRAPHS} with files")
        for fmt, entry in formats.items():
            files.append(_file_entry(model, graph, fmt, entry, version, f"{where}: graphs.{graph}.{fmt}"))
    return Manifest(version, model, tuple(files), data)


def _model_v2(data: dict[str, Any], where: str) -> ModelSpec:
    latent, image = data.get("latent_shape"), data.get("image_shape")
    if not _is_shape(latent) or not _is_shape(image, 3):
        raise ExportError(
            f"{where} needs latent_shape (sizes or names) and image_shape [C, H, W]; "
            f"got {_short(latent)} and {_short(image)}"
        )
    rng = data.get("value_range", [0.0, 1.0])
    if not _is_range(rng):
        raise ExportError(f"{where}: value_range must be [low, high] with low < high, got {_short(rng)}")
    factors = [data.get("scaling_factor", 1.0), data.get("shift_factor", 0.0)]
    if not all(_is_number(f) for f in factors) or factors[0] == 0:
        raise ExportError(f"{where}: scaling_factor/shift_factor must be finite numbers (scale != 0)")
    has_logvar = data.get("has_logvar", True)
    if not isinstance(has_logvar, bool):
        raise ExportError(f"{where}: has_logvar must be true or false")
    source = data.get("source", {})
    factor = data.get("downsampling_factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int) or factor < 1):
        raise ExportError(f"{where}: downsampling_factor must be a positive integer, got {_short(factor)}")
    return ModelSpec(
        tuple(latent),
        tuple(image),
        (float(rng[0]), float(rng[1])),
        has_logvar,
        float(factors[0]),
        float(factors[1]),
        source if isinstance(source, dict) else {},
        factor,
    )


def _model_v1(data: dict[str, Any], where: str) -> ModelSpec:
    """Version 1: vector latents ``latent_dim``, images in [0, 1], source = the checkpoint entry."""
    d, image = data.get("latent_dim"), data.get("image_shape")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or not _is_shape(image, 3, static=True):
        raise ExportError(
            f"{where} needs latent_dim (a positive int) and image_shape [C, H, W]; got {_short(d)} and {_short(image)}"
        )
    ckpt = data.get("checkpoint")
    source = {"kind": "checkpoint", **ckpt} if isinstance(ckpt, dict) else {}
    return ModelSpec((d,), tuple(image), (0.0, 1.0), source=source)


def _file_entry(model: ModelSpec, graph: str, fmt: str, entry: Any, version: int, where: str) -> FileEntry:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise ExportError(f"{where} has no 'file'")
    if not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
        raise ExportError(f"{where} has no valid 'sha256'")
    precision = entry.get("precision", PRECISION.get(fmt, "fp32"))
    if precision not in PRECISIONS:
        raise ExportError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {_short(precision)}")
    tolerance = Tolerance.from_dict(entry["tolerance"], where) if "tolerance" in entry else None
    spec = model.graph(graph, precision, tolerance)
    if version >= 2:  # the file's own I/O record must be the model's contract
        for key, expected in (("inputs", spec.inputs), ("outputs", spec.outputs)):
            listed = entry.get(key)
            got = tuple(TensorSpec.from_dict(t, where) for t in listed) if isinstance(listed, list) else None
            if got != expected:
                raise ExportError(f"{where}: {key} do not match the model's contract ({spec.signature()})")
    return FileEntry(graph, fmt, entry["file"], entry["sha256"], spec)


def with_source(model: ModelSpec, source: dict[str, Any]) -> ModelSpec:
    return replace(model, source=dict(source))


# --- small checks -------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_dim(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (isinstance(v, str) and v.isidentifier())


def _is_shape(v: Any, rank: int | None = None, static: bool = False) -> bool:
    ok = isinstance(v, list) and bool(v) and len(v) <= 8 and (rank is None or len(v) == rank)
    return ok and all((_is_dim(s) and not (static and isinstance(s, str))) for s in v)


def _is_range(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] < v[1]


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."

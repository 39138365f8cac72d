"""The HTTP API of ``vae-deploy serve`` as plain functions: limits, request parsing, answers.

Everything a request can get wrong is decided here, before any model runs, and becomes an
:class:`HttpError` with a status and a one-line message (JSON ``{"error": "..."}`` on the wire):

- 400: the body is not what it claims to be (bad JSON, a broken or truncated ``.npy``, no ``z``/``x``);
- 404: the export has no encoder (``/encode``);
- 406 / 415: an ``Accept`` or ``Content-Type`` we cannot answer or read;
- 413: over a documented limit (:class:`ServeLimits`: body bytes, rows per request, samples, answer bytes);
- 422: well-formed but wrong for this model (shape, NaN/inf, pixels outside the value range, bad query).

Bodies are JSON (``{"z": [[...], ...]}``, ``{"x": [...]}``) or ``application/x-npy`` (what
``numpy.save`` writes; no pickles). Answers mirror the request unless ``Accept`` asks otherwise:
JSON (``{"images": ..., "shape": ...}``, ``{"mu": ..., "logvar": ...}``) or ``.npy`` (``/encode``
answers ``.npz`` holding ``mu`` and ``logvar``). The Ray Serve deployment (serve.py) is a thin shell
over these, so they are tested without Ray. numpy only.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vae_deploy import __version__, inputs
from vae_deploy.contract import IMAGE, LATENT, LOGVAR, MEAN
from vae_deploy.errors import ResourceError, UsageError, VaeDeployError, first_line

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"
PNG = "image/png"
SAMPLE_FORMATS = {"npy": NPY, "png": PNG, "json": JSON}
SAMPLE_PARAMS = ("n", "seed", "format", "nrow", "bernoulli")
MAX_SEED = 2**128 - 1  # fresh seeds are 128-bit SeedSequence entropy
NPY_MAGIC = b"\x93NUMPY"


class HttpError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; anything more is refused with 413 before any work.

    ``max_body_bytes``: request body size. ``max_rows``: latents or images in one ``/decode`` or
    ``/encode`` request. ``max_samples``: ``n`` of ``/sample``. ``max_answer_bytes``: the float32
    payload of one answer (rows x image size; JSON text is about 4-5x larger on the wire).
    """

    max_body_bytes: int = 32 << 20
    max_rows: int = 4096
    max_samples: int = 4096
    max_answer_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"ServeLimits.{name} must be a positive integer, got {value!r}")


# --- errors -------------------------------------------------------------------------------------


def error_answer(status: int, message: str) -> tuple[int, bytes, str]:
    """(status, body, media type) of an error answer: JSON ``{"error": message}``."""
    return status, json.dumps({"error": message}).encode(), JSON


def status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and one-line message for an exception raised while answering a request.

    Our refusals keep their status; a ``UsageError`` from the runtime (a check we did not make
    first) is the client's input (422, 413 for memory); anything else is the server's (500).
    """
    if isinstance(exc, HttpError):
        return exc.status, exc.message
    if isinstance(exc, ResourceError):
        return 413, first_line(exc)
    if isinstance(exc, UsageError):
        return 422, first_line(exc)
    if isinstance(exc, VaeDeployError):
        return 500, first_line(exc)
    return 500, f"internal error {type(exc).__name__}: {first_line(exc)}"


# --- request bodies -----------------------------------------------------------------------------


def check_content_length(header: str | None, limits: ServeLimits) -> None:
    """Refuse a declared body size over the limit before reading any of it (413), or a bad header (400)."""
    if header is None:
        return
    if not header.strip().isdigit():
        raise HttpError(400, f"Content-Length must be a byte count, got {header[:40]!r}")
    check_body_size(int(header), limits)


def check_body_size(size: int, limits: ServeLimits) -> None:
    if size > limits.max_body_bytes:
        raise HttpError(
            413, f"request body of {size:,} bytes is over the limit of {limits.max_body_bytes:,} bytes; send fewer rows"
        )


def body_kind(content_type: str | None, body: bytes = b"") -> str:
    """``"json"`` or ``"npy"`` from the Content-Type header; 415 for a type we cannot read.

    No type, or the form type that ``curl -d`` and urllib send by default, is read by its first
    bytes: ``.npy`` magic means ``.npy``, anything else JSON.
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if media in (JSON, "text/json"):
        return "json"
    if media in (NPY, "application/octet-stream"):
        return "npy"
    if media in ("", "application/x-www-form-urlencoded"):
        return "npy" if body.startswith(NPY_MAGIC) else "json"
    raise HttpError(415, f"Content-Type {media!r} is not supported; send {JSON} or {NPY} (numpy.save bytes)")


def read_npy(body: bytes, name: str) -> np.ndarray:
    """The array in ``.npy`` bytes, checked against its header without trusting it (400 otherwise).

    Only numeric dtypes; no pickles; the data must be exactly as long as the header says; the
    array is a view of ``body`` (no copy).
    """
    if not body.startswith(NPY_MAGIC):
        raise HttpError(400, f"{name}: the body is not a .npy file (expected the bytes numpy.save writes)")
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise HttpError(400, f"{name}: .npy format version {version} is not supported (1.0 or 2.0)")
    except HttpError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many kinds (tokenize, ast, ...)
        raise HttpError(400, f"{name}: broken .npy header ({type(exc).__name__})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "fiu":
        raise HttpError(422, f"{name}: .npy dtype {dtype} is not numeric; send float32")
    count = math.prod(shape)
    offset = f.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise HttpError(
            400,
            f"{name}: .npy data is {len(body) - offset:,} bytes but its header ({dtype}, shape {list(shape)}) "
            f"says {count * dtype.itemsize:,}; the file is truncated or padded",
        )
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")


def read_json_field(body: bytes, name: str, limits: ServeLimits) -> np.ndarray:
    """``body[name]`` of a JSON object as a float32 array (400 for bad JSON, 422 for non-numbers)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON ({first_line(exc, 120)})") from None
    except RecursionError:
        raise HttpError(400, "the body is JSON nested too deeply") from None
    if not isinstance(data, dict) or name not in data:
        raise HttpError(400, f'expected a JSON object {{"{name}": [[...], ...]}}; it has no {name!r}')
    value = data[name]
    if isinstance(value, list):
        check_rows(len(value), limits)
    try:
        with np.errstate(over="ignore"):  # beyond float32: inf, refused by the finiteness check
            return np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise HttpError(422, f"{name} must be a nested list of numbers of one rectangular shape") from None


def check_rows(rows: int, limits: ServeLimits) -> None:
    if rows > limits.max_rows:
        raise HttpError(413, f"{rows:,} rows in one request is over the limit of {limits.max_rows:,}; split it")


def parse_array(
    body: bytes,
    kind: str,
    name: str,
    row_shape: tuple,
    limits: ServeLimits,
    check: Callable[[np.ndarray], None],
) -> tuple[np.ndarray, bool]:
    """A request's latents or images as a C-contiguous float32 batch, and whether one unbatched row came.

    Shape, rows, finiteness and ``check`` (value range) are all checked here, so a bad request never
    reaches a model, nor a dynamic batch shared with other requests.
    """
    if not body:
        raise HttpError(400, f"the request has no body; send {name} as JSON or .npy")
    array = read_npy(body, name) if kind == "npy" else read_json_field(body, name, limits)
    try:
        batch, single = inputs.batch_of(array, name, row_shape)
        check_rows(len(batch), limits)
        check(batch)
    except UsageError as exc:
        raise HttpError(422, first_line(exc)) from None
    return batch, single


def parse_latents(body: bytes, kind: str, latent_shape: tuple, limits: ServeLimits) -> tuple[np.ndarray, bool]:
    """``z`` of a ``/decode`` request: [n, *latent_shape] (or one latent), finite, within the latent bound."""
    return parse_array(body, kind, LATENT, latent_shape, limits, inputs.check_latents)


def parse_images(
    body: bytes, kind: str, image_shape: tuple, value_range: tuple[float, float], limits: ServeLimits
) -> tuple[np.ndarray, bool]:
    """``x`` of an ``/encode`` request: [n, C, H, W] (or one image) with pixels in the value range."""
    return parse_array(body, kind, IMAGE, image_shape, limits, lambda x: inputs.check_images(x, value_range))


def check_answer_size(rows: int, row_shape: Sequence, limits: ServeLimits) -> None:
    """Refuse (413) an answer of ``rows`` float32 rows over ``max_answer_bytes`` (fixed row shapes only)."""
    if not all(isinstance(d, int) for d in row_shape):
        return
    size = 4 * rows * math.prod(row_shape)
    if size > limits.max_answer_bytes:
        raise HttpError(
            413,
            f"the answer would be {size:,} bytes ({rows:,} x {list(row_shape)} float32), over the limit of "
            f"{limits.max_answer_bytes:,}; ask for fewer",
        )


# --- answers ------------------------------------------------------------------------------------


def answer_kind(accept: str | None, kind: str) -> str:
    """The answer's format: what ``Accept`` asks for, else the request's own (406 if nothing fits)."""
    if not accept:
        return kind
    wanted = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    for media in wanted:
        if media in ("*/*", "application/*"):
            return kind
        if media in (JSON, "text/json"):
            return "json"
        if media in (NPY, NPZ, "application/octet-stream"):
            return "npy"
    raise HttpError(406, f"cannot answer with {accept[:80]!r}; accept {JSON}, {NPY} or {NPZ}")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(data: dict[str, Any]) -> bytes:
    """Compact JSON; float32 values print as the shortest float64 text, so they parse back exactly."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def images_answer(images: np.ndarray, kind: str) -> tuple[bytes, str]:
    """``/decode``'s answer: ``.npy`` of the images, or JSON ``{"images": [...], "shape": [...]}``."""
    if kind == "npy":
        return npy_bytes(images), NPY
    return json_bytes({"images": images.tolist(), "shape": list(images.shape)}), JSON


def latents_answer(mu: np.ndarray, logvar: np.ndarray | None, kind: str) -> tuple[bytes, str]:
    """``/encode``'s answer: ``.npz`` with ``mu`` (and ``logvar``), or JSON ``{"mu": ..., "logvar": ...}``."""
    if kind == "npy":
        buf = io.BytesIO()
        arrays = {MEAN: mu} if logvar is None else {MEAN: mu, LOGVAR: logvar}
        np.savez(buf, allow_pickle=False, **arrays)
        return buf.getvalue(), NPZ
    body = {MEAN: mu.tolist(), LOGVAR: None if logvar is None else logvar.tolist(), "shape": list(mu.shape)}
    return json_bytes(body), JSON


# --- /sample ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleQuery:
    """A checked ``GET /sample`` query: ``n`` images of ``VAERuntime.sample(n, seed, bernoulli=...)``."""

    n: int
    seed: int | None
    format: str = "npy"
    nrow: int | None = None
    bernoulli: bool = False


def _int_param(params: Mapping[str, str], name: str, low: int, high: int | None = None) -> int | None:
    text = params.get(name)
    if text is None:
        return None
    text = text.strip()
    if not text.isdigit() or len(text) > 40:
        raise HttpError(422, f"{name} must be an integer >= {low}, got {text[:40]!r}")
    value = int(text)
    if value < low or (high is not None and value > high):
        raise HttpError(422, f"{name} must be between {low} and {high}, got {value}")
    return value


def parse_sample_query(params: Mapping[str, str], image_shape: Sequence, limits: ServeLimits) -> SampleQuery:
    """Check ``n`` (default 1), ``seed`` (default: fresh, reported back), ``format`` (npy|png|json),
    ``nrow`` (PNG grid width) and ``bernoulli`` (0/1); unknown parameters are refused."""
    unknown = sorted(set(params) - set(SAMPLE_PARAMS))
    if unknown:
        raise HttpError(422, f"unknown query parameter {unknown[0]!r}; /sample takes {', '.join(SAMPLE_PARAMS)}")
    n = _int_param(params, "n", 1)
    n = 1 if n is None else n
    if n > limits.max_samples:
        raise HttpError(413, f"n={n:,} is over the limit of {limits.max_samples:,} samples per request")
    check_answer_size(n, image_shape, limits)
    fmt = params.get("format", "npy").strip().lower()
    if fmt not in SAMPLE_FORMATS:
        raise HttpError(422, f"format must be one of {', '.join(SAMPLE_FORMATS)}, got {fmt[:20]!r}")
    nrow = _int_param(params, "nrow", 1)
    if nrow is not None and fmt != "png":
        raise HttpError(422, "nrow applies to format=png only")
    flag = params.get("bernoulli", "0").strip().lower()
    if flag not in ("0", "1", "false", "true"):
        raise HttpError(422, f"bernoulli must be 0 or 1, got {flag[:20]!r}")
    seed = _int_param(params, "seed", 0, MAX_SEED)
    return SampleQuery(n, seed, fmt, nrow, flag in ("1", "true"))


def fresh_seed() -> int:
    """A new seed for a request that gave none (sent back in ``X-Seed`` so it can be repeated)."""
    return int(np.random.SeedSequence().entropy)


def sample_answer(images: np.ndarray, query: SampleQuery) -> tuple[bytes, str]:
    """``/sample``'s answer in the query's format (PNG: one grid, as ``vae-deploy sample`` writes)."""
    if query.format == "png":
        from vae_deploy.images import image_grid, png_bytes

        try:
            return png_bytes(image_grid(images, query.nrow)), PNG
        except UsageError as exc:
            raise HttpError(422, first_line(exc)) from None
    return images_answer(images, query.format)


# --- dynamic batching ---------------------------------------------------------------------------


def total_rows(batches: Sequence[np.ndarray]) -> int:
    """Rows in a list of request batches: what dynamic batching counts against its maximum."""
    return sum(len(b) for b in batches)


def run_batched(fn: Callable[[np.ndarray], Any], batches: Sequence[np.ndarray]) -> list[Any]:
    """Run ``fn`` once per group of requests whose rows have one shape, on their rows stacked; hand
    each request its own rows back. ``fn`` returns an array or a tuple of arrays (or None)."""
    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(batches):
        groups.setdefault(b.shape[1:], []).append(i)
    results: list[Any] = [None] * len(batches)
    for members in groups.values():
        stacked = batches[members[0]] if len(members) == 1 else np.concatenate([batches[i] for i in members])
        out = fn(stacked)
        start = 0
        for i in members:
            rows = slice(start, start + len(batches[i]))
            results[i] = tuple(None if o is None else o[rows] for o in out) if isinstance(out, tuple) else out[rows]
            start += len(batches[i])
    return results


# --- /metadata ----------------------------------------------------------------------------------


def metadata(runtime: Any, limits: ServeLimits, batching: Mapping[str, Any], has_encoder: bool) -> dict[str, Any]:
    """``GET /metadata``: the model's contract, what serves it, and the limits a client must respect."""
    model = runtime.model
    return {
        "latent_shape": list(runtime.latent_shape),
        "image_shape": list(runtime.image_shape),
        "value_range": list(runtime.value_range),
        "has_logvar": model.has_logvar,
        "scaling_factor": model.scaling_factor,
        "shift_factor": model.shift_factor,
        "encoder": has_encoder,
        "provider": runtime.provider,
        "fallback_reason": runtime.fallback_reason,
        "precision": runtime.precision,
        "batching": dict(batching),
        "limits": asdict(limits),
        "formats": {"request": [JSON, NPY], "answer": [JSON, NPY, NPZ, PNG]},
        "vae_deploy": __version__,
    }

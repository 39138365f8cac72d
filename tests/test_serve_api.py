"""The HTTP API's plain functions (vae_deploy/serve_api.py), without Ray: every body a client can
send is an array or a 4xx HttpError, limits hold, batching hands each request its own rows."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vae_deploy import serve_api
from vae_deploy.contract import ModelSpec
from vae_deploy.errors import IntegrityError, ResourceError, UsageError
from vae_deploy.serve_api import HttpError, ServeLimits

LIMITS = ServeLimits(max_body_bytes=1 << 20, max_rows=64, max_samples=100, max_answer_bytes=100 * 784 * 4)
LATENT = (8,)
IMAGE = (1, 28, 28)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def status(fn, *args) -> int:
    with pytest.raises(HttpError) as info:
        fn(*args)
    assert info.value.message and "\n" not in info.value.message
    return info.value.status


def test_latents_from_json_and_npy_are_the_same_float32_batch() -> None:
    z = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    from_json, single = serve_api.parse_latents(json.dumps({"z": z.tolist()}).encode(), "json", LATENT, LIMITS)
    assert not single and from_json.dtype == np.float32 and np.array_equal(from_json, z)
    for a in (z, z.astype(np.float64), z.astype(">f4"), np.asfortranarray(z)):
        got, _ = serve_api.parse_latents(npy(a), "npy", LATENT, LIMITS)
        assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, z)
    one, single = serve_api.parse_latents(json.dumps({"z": z[0].tolist()}).encode(), "json", LATENT, LIMITS)
    assert single and one.shape == (1, 8)


@pytest.mark.parametrize(
    "body, kind, expected",
    [
        (b"", "json", 400),
        (b"{", "json", 400),
        (b"\xff\xfe", "json", 400),
        (b"[]", "json", 400),
        (b'{"x": [[0]]}', "json", 400),
        (b"[" * 100_000, "json", 400),
        (b'{"z": "abc"}', "json", 422),
        (b'{"z": [[1, 2], [3]]}', "json", 422),
        (b'{"z": [[1, 2]]}', "json", 422),
        (b'{"z": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', "json", 422),
        (b'{"z": [[1e300, 0, 0, 0, 0, 0, 0, 0]]}', "json", 422),
        (b'{"z": [[1e7, 0, 0, 0, 0, 0, 0, 0]]}', "json", 422),
        (b'{"z": [[{"a": 1}, 0, 0, 0, 0, 0, 0, 0]]}', "json", 422),
        (b'{"z": []}', "json", 422),
        (json.dumps({"z": [[0.0] * 8] * 65}).encode(), "json", 413),
        (b"not npy", "npy", 400),
        (b"\x93NUMPY\x01\x00", "npy", 400),
        (npy(np.zeros((2, 8), np.float32))[:-4], "npy", 400),
        (npy(np.zeros((2, 8), np.float32)) + b"xx", "npy", 400),
        (npy(np.array([[object()] * 8], dtype=object)), "npy", 422),
        (npy(np.zeros((2, 8), "U3")), "npy", 422),
        (npy(np.zeros((2, 8), np.complex64)), "npy", 422),
        (npy(np.zeros((2, 7), np.float32)), "npy", 422),
        (npy(np.zeros((65, 8), np.float32)), "npy", 413),
        (npy(np.full((1, 8), np.inf, np.float32)), "npy", 422),
    ],
)
def test_bad_bodies_get_their_status(body: bytes, kind: str, expected: int) -> None:
    assert status(serve_api.parse_latents, body, kind, LATENT, LIMITS) == expected


def test_npy_header_promising_more_than_sent_is_refused_before_reading() -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 8)})
    assert status(serve_api.read_npy, buf.getvalue() + b"\0" * 64, "z") == 400


VALID = {"npy": npy(np.zeros((2, 8), np.float32)), "json": json.dumps({"z": [[0.5] * 8] * 2}).encode()}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["json", "npy"]), st.integers(0, 200), st.integers(0, 8), st.binary(max_size=40))
def test_any_corruption_of_a_valid_body_is_an_array_or_a_4xx(kind: str, at: int, cut: int, noise: bytes) -> None:
    valid = VALID[kind]
    body = valid[:at] + noise + valid[at + cut :]  # overwrite, insert or delete bytes anywhere
    try:
        z, _ = serve_api.parse_latents(body, kind, LATENT, LIMITS)
    except HttpError as exc:
        assert 400 <= exc.status < 500
    else:
        assert z.dtype == np.float32 and z.shape[1:] == LATENT and np.isfinite(z).all()


def test_images_are_checked_against_the_value_range() -> None:
    x = np.full((2, *IMAGE), 0.5, np.float32)
    got, _ = serve_api.parse_images(npy(x), "npy", IMAGE, (0.0, 1.0), LIMITS)
    assert np.array_equal(got, x)
    assert status(serve_api.parse_images, npy(x * 4), "npy", IMAGE, (0.0, 1.0), LIMITS) == 422
    got, _ = serve_api.parse_images(npy(x * -2), "npy", IMAGE, (-1.0, 1.0), LIMITS)
    assert got.min() == -1.0
    # symbolic sizes take any positive size
    got, _ = serve_api.parse_images(npy(np.zeros((1, 3, 5, 7), np.float32)), "npy", (3, "h", "w"), (0.0, 1.0), LIMITS)
    assert got.shape == (1, 3, 5, 7)


def test_body_limits_content_types_and_accept() -> None:
    serve_api.check_content_length(str(LIMITS.max_body_bytes), LIMITS)
    assert status(serve_api.check_content_length, str(LIMITS.max_body_bytes + 1), LIMITS) == 413
    assert status(serve_api.check_content_length, "12abc", LIMITS) == 400
    assert serve_api.body_kind(None) == "json"
    assert serve_api.body_kind("application/x-www-form-urlencoded", b"{}") == "json"  # curl -d, urllib
    assert serve_api.body_kind(None, serve_api.NPY_MAGIC + b"...") == "npy"
    assert serve_api.body_kind("application/json; charset=utf-8") == "json"
    assert serve_api.body_kind("application/x-npy") == "npy"
    assert status(serve_api.body_kind, "text/plain") == 415
    assert serve_api.answer_kind(None, "npy") == "npy"
    assert serve_api.answer_kind("*/*", "json") == "json"
    assert serve_api.answer_kind("application/x-npy, application/json", "json") == "npy"
    assert serve_api.answer_kind("text/html;q=0.9, application/json", "npy") == "json"
    assert status(serve_api.answer_kind, "image/gif", "json") == 406


def test_answers_round_trip_exactly() -> None:
    images = np.random.default_rng(1).random((3, *IMAGE), dtype=np.float32)
    body, media = serve_api.images_answer(images, "json")
    data = json.loads(body)
    assert media == serve_api.JSON and data["shape"] == [3, *IMAGE]
    assert np.array_equal(np.asarray(data["images"], np.float32), images)  # float32 -> text -> float32 is exact
    body, media = serve_api.images_answer(images, "npy")
    assert media == serve_api.NPY and np.array_equal(np.load(io.BytesIO(body)), images)
    mu, logvar = images[:, 0, 0], images[:, 0, 1]
    body, media = serve_api.latents_answer(mu, logvar, "npy")
    with np.load(io.BytesIO(body), allow_pickle=False) as z:
        assert media == serve_api.NPZ and np.array_equal(z["mu"], mu) and np.array_equal(z["logvar"], logvar)
    data = json.loads(serve_api.latents_answer(mu, None, "json")[0])
    assert data["logvar"] is None and np.array_equal(np.asarray(data["mu"], np.float32), mu)


def test_sample_query() -> None:
    q = serve_api.parse_sample_query({"n": "5", "seed": "7", "format": "png", "nrow": "2"}, IMAGE, LIMITS)
    assert (q.n, q.seed, q.format, q.nrow, q.bernoulli) == (5, 7, "png", 2, False)
    q = serve_api.parse_sample_query({}, IMAGE, LIMITS)
    assert (q.n, q.seed, q.format) == (1, None, "npy")
    big = str(serve_api.MAX_SEED)
    assert serve_api.parse_sample_query({"seed": big, "bernoulli": "1"}, IMAGE, LIMITS).bernoulli
    cases = [
        ({"n": "0"}, 422),
        ({"n": "-1"}, 422),
        ({"n": "1.5"}, 422),
        ({"n": "abc"}, 422),
        ({"n": "9" * 60}, 422),
        ({"n": "101"}, 413),
        ({"seed": "-1"}, 422),
        ({"seed": str(serve_api.MAX_SEED + 1)}, 422),
        ({"format": "gif"}, 422),
        ({"nrow": "3"}, 422),
        ({"bernoulli": "maybe"}, 422),
        ({"m": "1"}, 422),
    ]
    for params, expected in cases:
        assert status(serve_api.parse_sample_query, params, IMAGE, LIMITS) == expected, params
    # the answer bound: 100 images of 784 floats fit, bigger images do not
    assert status(serve_api.parse_sample_query, {"n": "100"}, (3, 28, 28), LIMITS) == 413


def test_run_batched_hands_each_request_its_own_rows() -> None:
    rng = np.random.default_rng(2)
    batches = [rng.random((k, *shape), dtype=np.float32) for k, shape in [(1, (2, 3)), (4, (2, 5)), (2, (2, 3))]]
    calls = []

    def double(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return x * 2

    out = serve_api.run_batched(double, batches)
    assert sorted(calls) == [(3, 2, 3), (4, 2, 5)]  # one run per row shape
    for b, o in zip(batches, out):
        assert np.array_equal(o, b * 2)
    pairs = serve_api.run_batched(lambda x: (x + 1, None), batches[:1] + batches[2:])
    assert np.array_equal(pairs[1][0], batches[2] + 1) and pairs[1][1] is None
    assert serve_api.total_rows(batches) == 7


def test_errors_map_to_statuses() -> None:
    assert serve_api.status_of(HttpError(413, "too big")) == (413, "too big")
    assert serve_api.status_of(ResourceError("needs 9 GiB"))[0] == 413
    assert serve_api.status_of(UsageError("bad z"))[0] == 422
    assert serve_api.status_of(IntegrityError("changed"))[0] == 500
    status_code, message = serve_api.status_of(KeyError("x"))
    assert status_code == 500 and message.startswith("internal error KeyError")
    code, body, media = serve_api.error_answer(422, "bad")
    assert code == 422 and json.loads(body) == {"error": "bad"} and media == serve_api.JSON


def test_limits_are_checked() -> None:
    with pytest.raises(UsageError, match="max_rows"):
        ServeLimits(max_rows=0)
    with pytest.raises(UsageError, match="max_body_bytes"):
        ServeLimits(max_body_bytes=True)


def test_metadata_says_what_a_client_needs(mlp_onnx_export) -> None:
    from vae_deploy.runtime import VAERuntime

    rt = VAERuntime(mlp_onnx_export, "cpu")
    meta = serve_api.metadata(rt, LIMITS, {"dynamic": True}, True)
    json.dumps(meta)  # JSON-able
    assert meta["latent_shape"] == [8] and meta["image_shape"] == list(IMAGE) and meta["value_range"] == [0.0, 1.0]
    assert meta["provider"] == "cpu" and meta["limits"]["max_rows"] == 64 and meta["encoder"]
    assert ModelSpec(tuple(meta["latent_shape"]), tuple(meta["image_shape"])) == ModelSpec((8,), IMAGE)

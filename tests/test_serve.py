"""`vae-deploy serve`: real Ray Serve on localhost (a free port per test process), real HTTP.

One Ray Serve instance for the module holds three apps of the small MLP export: ``/`` with dynamic
batching (1 replica, a 20 ms batch window so concurrent requests surely meet), ``/plain`` without
(2 replicas) and ``/noenc`` (an export without an encoder). Served results are compared with a
local VAERuntime on the same export.
"""

from __future__ import annotations

import http.client
import io
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason="needs the serve extra")

from vae_deploy.errors import ExportError, ServeError, UsageError  # noqa: E402
from vae_deploy.images import image_grid  # noqa: E402
from vae_deploy.runtime import VAERuntime  # noqa: E402
from vae_deploy.serve_api import ServeLimits  # noqa: E402

LIMITS = ServeLimits(max_body_bytes=1 << 20, max_rows=256, max_samples=512)


def _config(**changes):
    from vae_deploy.serve import ServeConfig

    base = ServeConfig(max_batch_size=64, batch_wait_ms=20, provider="cpu", threads=1, cpus_per_replica=0.1,
                       limits=LIMITS)  # fmt: skip
    return replace(base, **changes)


def _without_encoder(export: Path, dst: Path) -> Path:
    shutil.copytree(export, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["graphs"]["encoder"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def server(mlp_onnx_export: Path, tmp_path_factory: pytest.TempPathFactory):
    from vae_deploy.serve import start

    s = start(mlp_onnx_export, _config(), port=0, quiet=True)
    try:
        s.deploy(mlp_onnx_export, _config(max_batch_size=1, replicas=2), name="plain", route_prefix="/plain")
        noenc = _without_encoder(mlp_onnx_export, tmp_path_factory.mktemp("noenc") / "exported")
        s.deploy(noenc, _config(), name="noenc", route_prefix="/noenc")
        yield s
    finally:
        s.shutdown()


@pytest.fixture(scope="module")
def local(mlp_onnx_export: Path) -> VAERuntime:
    return VAERuntime(mlp_onnx_export, "cpu")


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None):
    """(status, headers, body) of one real HTTP request; 4xx/5xx are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def post_json(url: str, data: dict, **headers: str):
    return call(url, json.dumps(data).encode(), {"Content-Type": "application/json", **headers})


def post_json_like_curl(url: str, data: dict):
    """urllib's (and ``curl -d``'s) default Content-Type is the form type: read as JSON."""
    return call(url, json.dumps(data).encode())


def post_npy(url: str, a: np.ndarray, **headers: str):
    return call(url, npy(a), {"Content-Type": "application/x-npy", **headers})


def get_json(url: str) -> dict:
    code, _, body = call(url)
    assert code == 200, body
    return json.loads(body)


def test_health_and_metadata(server, local: VAERuntime) -> None:
    health = get_json(server.url + "/healthz")
    assert health["status"] == "ok" and health["replica"]
    meta = get_json(server.url + "/metadata")
    assert meta["latent_shape"] == list(local.latent_shape) and meta["image_shape"] == list(local.image_shape)
    assert meta["value_range"] == list(local.value_range) and meta["provider"] == "cpu" and meta["encoder"]
    assert meta["limits"]["max_rows"] == 256 and meta["batching"]["dynamic"] and meta["batching"]["batch_wait_ms"] == 20
    plain = get_json(server.url + "/plain/metadata")
    assert not plain["batching"]["dynamic"] and plain["batching"]["replicas"] == 2


@pytest.mark.parametrize("app", ["", "/plain"])
def test_decode_answers_what_the_runtime_computes(server, local: VAERuntime, app: str) -> None:
    z = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    code, headers, body = post_json(server.url + app + "/decode", {"z": z.tolist()})
    data = json.loads(body)
    assert code == 200 and headers["Content-Type"] == "application/json" and data["shape"] == [5, 1, 28, 28]
    # CPU results do not depend on the batch a row shares (runtime guarantee); JSON floats round-trip exactly
    np.testing.assert_array_equal(np.asarray(data["images"], np.float32), local.decode(z))
    code, headers, body = post_npy(server.url + app + "/decode", z.astype(np.float64))
    assert code == 200 and headers["Content-Type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), local.decode(z))
    code, _, body = post_npy(server.url + app + "/decode", z[0], Accept="application/json")  # one latent
    np.testing.assert_array_equal(np.asarray(json.loads(body)["images"], np.float32), local.decode(z[0]))


def test_encode_answers_what_the_runtime_computes(server, local: VAERuntime) -> None:
    x = local.sample(4, seed=3)
    mu, logvar = local.encode(x)
    code, _, body = post_json_like_curl(server.url + "/encode", {"x": x.tolist()})
    data = json.loads(body)
    assert code == 200 and data["shape"] == [4, 8]
    np.testing.assert_array_equal(np.asarray(data["mu"], np.float32), mu)
    np.testing.assert_array_equal(np.asarray(data["logvar"], np.float32), logvar)
    code, headers, body = post_npy(server.url + "/plain/encode", x)
    assert code == 200 and headers["Content-Type"] == "application/x-npz"
    with np.load(io.BytesIO(body), allow_pickle=False) as got:
        np.testing.assert_array_equal(got["mu"], mu)
        np.testing.assert_array_equal(got["logvar"], logvar)


def test_sample_is_the_runtimes_sample(server, local: VAERuntime) -> None:
    code, headers, body = call(server.url + "/sample?n=37&seed=11")
    assert code == 200 and headers["Content-Type"] == "application/x-npy" and headers["X-Seed"] == "11"
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), local.sample(37, seed=11))
    code, headers, body = call(server.url + "/plain/sample?n=9&seed=11&format=png&nrow=3")
    assert code == 200 and headers["Content-Type"] == "image/png"
    with Image.open(io.BytesIO(body)) as im:
        np.testing.assert_array_equal(np.asarray(im)[:, :, None], image_grid(local.sample(9, seed=11), nrow=3))
    code, _, body = call(server.url + "/sample?n=6&seed=2&bernoulli=1&format=json")
    np.testing.assert_array_equal(np.asarray(json.loads(body)["images"]), local.sample(6, seed=2, bernoulli=True))
    # no seed: a fresh one, reported, that repeats the draw
    code, headers, body = call(server.url + "/sample?n=3")
    seed = int(headers["X-Seed"])
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), local.sample(3, seed=seed))


def test_concurrent_requests_share_engine_runs_and_each_gets_its_own_rows(server, local: VAERuntime) -> None:
    rng = np.random.default_rng(5)
    requests = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(48)]
    before = get_json(server.url + "/stats")["decoder"]

    def one(args: tuple[str, np.ndarray]) -> bool:
        app, z = args
        code, _, body = post_npy(server.url + app + "/decode", z)
        return code == 200 and np.array_equal(np.load(io.BytesIO(body)), local.decode(z))

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, [("", z) for z in requests]))
        assert all(pool.map(one, [("/plain", z) for z in requests]))
    after = get_json(server.url + "/stats")["decoder"]
    requests_made = after["requests"] - before["requests"]
    runs = after["engine_runs"] - before["engine_runs"]
    assert requests_made == 48 and after["rows"] - before["rows"] == sum(len(z) for z in requests)
    # dynamic batching stacked waiting requests into shared engine runs (how many depends on the
    # machine's speed: the benchmark measures it; here at least some must have met)
    assert runs < requests_made, (runs, requests_made)


def test_replicas_run_and_answer_alike(server, local: VAERuntime) -> None:
    from ray import serve

    states = serve.status().applications["plain"].deployments["VAEService"].replica_states
    assert states.get("RUNNING") == 2, states
    z = np.random.default_rng(8).standard_normal((3, 8)).astype(np.float32)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post_npy(server.url + "/plain/decode", z), range(24)))
    for code, _, body in answers:
        assert code == 200 and np.array_equal(np.load(io.BytesIO(body)), local.decode(z))


BAD_REQUESTS = [
    # (method, path, body, headers, status, words in the message)
    ("POST", "/decode", b"{", {}, 400, "not valid JSON"),
    ("POST", "/decode", b'{"x": [[0]]}', {}, 400, "'z'"),
    ("POST", "/decode", b"", {}, 400, "no body"),
    ("POST", "/decode", b'{"z": [[1, 2, 3]]}', {}, 422, "shape [batch, 8]"),
    ("POST", "/decode", b'{"z": [["a", "b"]]}', {}, 422, "numbers"),
    ("POST", "/decode", b'{"z": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', {}, 422, "NaN"),
    ("POST", "/decode", json.dumps({"z": [[0.0] * 8] * 257}).encode(), {}, 413, "256"),
    (
        "POST",
        "/decode",
        npy(np.zeros((2, 8), np.float32))[:-3],
        {"Content-Type": "application/x-npy"},
        400,
        "truncated",
    ),
    ("POST", "/decode", b"\x93NUMPY\x01\x00\xff\xff{", {"Content-Type": "application/x-npy"}, 400, ".npy"),
    ("POST", "/decode", npy(np.zeros((2, 8), np.complex64)), {"Content-Type": "application/x-npy"}, 422, "dtype"),
    ("POST", "/decode", b"hello", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("POST", "/decode", b"hello", {}, 400, "not valid JSON"),
    ("POST", "/decode", b'{"z": [[0, 0, 0, 0, 0, 0, 0, 0]]}', {"Accept": "image/gif"}, 406, "image/gif"),
    ("POST", "/encode", b'{"x": [[[[2.0]]]]}', {}, 422, "shape"),
    ("POST", "/encode", json.dumps({"x": np.full((1, 1, 28, 28), 2.0).tolist()}).encode(), {}, 422, "[0, 1]"),
    ("GET", "/sample?n=0", None, {}, 422, "n must be"),
    ("GET", "/sample?n=513", None, {}, 413, "512"),
    ("GET", "/sample?n=2&seed=-4", None, {}, 422, "seed"),
    ("GET", "/sample?n=2&format=gif", None, {}, 422, "format"),
    ("GET", "/sample?n=2&nrow=1", None, {}, 422, "nrow"),
    ("GET", "/sample?count=2", None, {}, 422, "unknown query parameter"),
    ("GET", "/decode", None, {}, 405, "Method Not Allowed"),
    ("GET", "/nowhere", None, {}, 404, "Not Found"),
    ("POST", "/noenc/encode", b'{"x": [[[[0.5]]]]}', {}, 404, "no encoder"),
]


def test_bad_requests_get_a_4xx_with_a_message_and_the_replica_lives_on(server, local: VAERuntime) -> None:
    replica = get_json(server.url + "/healthz")["replica"]
    for method, path, body, headers, status, words in BAD_REQUESTS:
        code, answer_headers, answer = call(server.url + path, body, headers, method=method)
        assert code == status, (path, body[:60] if body else None, answer)
        message = json.loads(answer)["error"]
        assert words in message and "\n" not in message, (path, message)
    assert get_json(server.url + "/healthz")["replica"] == replica  # not restarted
    z = np.zeros((2, 8), np.float32)
    code, _, body = post_npy(server.url + "/decode", z)
    assert code == 200 and np.array_equal(np.load(io.BytesIO(body)), local.decode(z))


def test_body_limit_holds_with_and_without_a_declared_length(server) -> None:
    big = b'{"z": [' + b"0," * (LIMITS.max_body_bytes // 2) + b"0]}"
    code, _, body = call(server.url + "/decode", big, {"Content-Type": "application/json"})
    assert code == 413 and "over the limit" in json.loads(body)["error"]
    # chunked: no Content-Length, the limit is enforced while reading
    parsed = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    conn.request("POST", "/decode", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 413 and "over the limit" in json.loads(answer.read())["error"]
    conn.close()


def test_deploy_refuses_what_cannot_run(server, mlp_onnx_export: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ServeError, match="64 replica"):
        server.deploy(mlp_onnx_export, _config(replicas=64, cpus_per_replica=1), name="huge", route_prefix="/huge")
    with pytest.raises(ExportError, match="not found"):
        server.deploy(tmp_path / "missing", _config(), name="missing", route_prefix="/missing")
    assert time.monotonic() - start < 10  # refused up front: Serve never waits for resources
    assert get_json(server.url + "/healthz")["status"] == "ok"


def test_start_refuses_bad_settings_before_starting_ray(mlp_onnx_export: Path, tmp_path: Path) -> None:
    import socket

    from vae_deploy.serve import ServeConfig, start

    with pytest.raises(UsageError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(UsageError, match="provider"):
        ServeConfig(provider="tpu")
    with pytest.raises(UsageError, match="port"):
        start(mlp_onnx_export, port=70000)
    with pytest.raises(ExportError, match="not found"):
        start(tmp_path / "nothing", port=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServeError, match="in use"):
            start(mlp_onnx_export, port=taken.getsockname()[1])


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    code = "import sys; from vae_deploy.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], text=True, **kwargs)


@pytest.mark.parametrize(
    "args, exit_code, words",
    [
        (["serve", "{missing}"], 1, "export folder not found"),
        (["serve", "{export}", "--replicas", "0"], 2, "--replicas"),
        (["serve", "{export}", "--batch-wait-ms", "-1"], 2, "--batch-wait-ms"),
        (["serve", "{export}", "--precision", "fp64"], 2, "--precision"),
    ],
)
def test_cli_serve_errors_are_one_line(mlp_onnx_export: Path, tmp_path: Path, args, exit_code, words) -> None:
    args = [a.format(missing=tmp_path / "missing", export=mlp_onnx_export) for a in args]
    proc = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == exit_code, err
    assert err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_cli_serve_blocks_until_ctrl_c(mlp_onnx_export: Path, local: VAERuntime) -> None:
    proc = _cli("serve", str(mlp_onnx_export), "--port", "0", "--provider", "cpu", "--threads", "1",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        line = proc.stdout.readline()  # printed once the server answers
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        code, _, body = call(url + "/sample?n=4&seed=9")
        assert code == 200 and np.array_equal(np.load(io.BytesIO(body)), local.sample(4, seed=9))
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopping" in out, err
    finally:
        if proc.poll() is None:
            proc.kill()

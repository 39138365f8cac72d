"""CPU plans chosen by measurement: results never depend on the plan, the plan cache (keys, location,
atomic writes, bad files), how VAERuntime picks a plan, the tuner's choice rule and `vae-deploy tune`.

Real exports and sessions; no timing assertions (what was measured on which CPU is in
benchmarks/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vae_deploy import plans
from vae_deploy.cli import main
from vae_deploy.errors import ExportError, UsageError
from vae_deploy.runtime import CpuPlan, VAERuntime
from vae_deploy.tune import DEFAULT_SESSIONS, Sessions, choose_sessions, tune_export, tune_plan

PLANS = [
    CpuPlan(),
    CpuPlan(threads=1, max_rows=0),
    CpuPlan(threads=2, spinning=False, max_rows=7),
    CpuPlan(small_batch_max=8, threads=2, small_threads=1, max_rows=64),
    CpuPlan(small_batch_max=63, threads=1, small_threads=2, small_spinning=True, max_rows=65),
    CpuPlan(max_rows=1, sample_batch=3),
]
SIZES = (1, 2, 6, 7, 8, 9, 63, 64, 65, 66, 129, 300)  # around every chunk and small-session boundary above


@pytest.fixture(scope="module")
def export_dir(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small MLP (8 -> 64 -> 784 decoder) with the int8 decoder, not verified."""
    from vae_deploy.export import export

    out = tmp_path_factory.mktemp("tune") / "exported"
    return export(mlp_checkpoint, out, formats=("onnx",), int8=True, verify=False, log=lambda _: None).out_dir


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_results_are_bitwise_identical_across_plans(export_dir: Path, precision: str) -> None:
    """Threads, spinning, one or two sessions and row chunking change speed only: every batch size
    around the plans' boundaries gives the same bits, and so does each row decoded alone."""
    runtimes = [VAERuntime(export_dir, "cpu", precision=precision, cpu_plan=p) for p in PLANS]
    z = np.random.default_rng(0).standard_normal((max(SIZES), 8), dtype=np.float32)
    alone = np.concatenate([runtimes[0].decode(z[i : i + 1]) for i in range(len(z))])
    for n in SIZES:
        for rt in runtimes:
            assert np.array_equal(rt.decode(z[:n]), alone[:n]), (precision, n, rt.cpu_plan)
    x = np.random.default_rng(1).random((130, 1, 28, 28), dtype=np.float32)
    ref = runtimes[0].encode(x)
    samples = runtimes[0].sample(70, seed=5)
    for rt in runtimes[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(rt.encode(x), ref))
        assert np.array_equal(rt.sample(70, seed=5), samples)  # sample_batch differs between plans too


def test_cache_location_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(plans.CACHE_ENV, str(tmp_path / "mine"))
    assert plans.cache_dir() == tmp_path / "mine" / "plans"
    monkeypatch.delenv(plans.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plans.cache_dir() == tmp_path / "xdg" / "vae-deploy" / "plans"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/not/allowed")  # the XDG spec ignores relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert plans.cache_dir() == tmp_path / "home" / ".cache" / "vae-deploy" / "plans"


def test_plan_cache_round_trip_and_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(plans.CACHE_ENV, str(tmp_path))
    sha = "ab" * 32
    plan = CpuPlan(small_batch_max=16, threads=2, max_rows=512)
    saved = plans.save_plan(sha, plan, {"why": "test"})
    assert saved.path.parent == tmp_path / "plans" and saved.path.name.startswith(sha[:16])
    assert [p.name for p in saved.path.parent.iterdir()] == [saved.path.name]  # atomic: no temp file left
    data = json.loads(saved.path.read_text())
    key = data["key"]
    assert key["model_sha256"] == sha and key["onnxruntime"] and key["cpu"]["model"] and key["cpu"]["cpus"] >= 1
    assert {"vendor", "family", "model_id", "stepping", "flags"} <= set(key["cpu"])
    loaded = plans.load_plan(sha)
    assert loaded is not None and loaded.plan == plan and loaded.details == {"why": "test"}
    assert plans.load_plan("cd" * 32) is None  # another file
    other_cpu = {**plans.cpu_identity(), "model": "Some Other CPU"}
    monkeypatch.setattr(plans, "cpu_identity", lambda: other_cpu)
    assert plans.load_plan(sha) is None  # another machine: its own key, its own file


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"format": "vae-deploy-cpu-plan", "version": 1}',
        "FORGED_PLAN",
        "FORGED_VERSION",
        "[" * 100_000,  # json's RecursionError
        '{"pad": "' + "x" * (2 << 20) + '"}',  # larger than a plan file can be
    ],
)
def test_a_bad_cache_file_is_a_miss_not_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, export_dir: Path, content: str
) -> None:
    monkeypatch.setenv(plans.CACHE_ENV, str(tmp_path))
    sha = _decoder_sha(export_dir)
    path = plans.save_plan(sha, CpuPlan(threads=1)).path
    data = json.loads(path.read_text())
    if content == "FORGED_PLAN":
        data["plan"]["threads"] = -3
        content = json.dumps(data)
    elif content == "FORGED_VERSION":
        data["version"] = 99
        content = json.dumps(data)
    path.write_text(content)
    assert plans.load_plan(sha) is None
    rt = VAERuntime(export_dir, "cpu")
    assert rt.cpu_plan == CpuPlan() and rt.plan_source["decoder"].startswith("default")


def _decoder_sha(export_dir: Path, fmt: str = "onnx") -> str:
    from vae_deploy.manifest import read_manifest

    return read_manifest(export_dir).entry("decoder", fmt).sha256


def test_runtime_uses_a_cached_plan_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, export_dir: Path
) -> None:
    monkeypatch.setenv(plans.CACHE_ENV, str(tmp_path))
    assert VAERuntime(export_dir, "cpu").plan_source == {"decoder": "default (none cached)"}
    cached = CpuPlan(small_batch_max=4, threads=2, max_rows=256)
    plans.save_plan(_decoder_sha(export_dir), cached)
    rt = VAERuntime(export_dir, "cpu")  # cpu_plan="auto"
    assert rt.cpu_plan == cached and rt.plan_source["decoder"].startswith("cached (")
    assert rt.engine("decoder").settings_for(4)["ort_intra_op"] == 1  # the cached plan is what runs
    fixed = CpuPlan(threads=1)
    assert VAERuntime(export_dir, "cpu", cpu_plan=fixed).cpu_plan == fixed  # explicit overrides the cache
    assert VAERuntime(export_dir, "cpu", cpu_plan="default").cpu_plan == CpuPlan()
    assert VAERuntime(export_dir, "cpu", intra_op_threads=1).cpu_plan.threads == 1
    # the int8 decoder is another file: it has no cached plan yet, and the encoder neither
    rt8 = VAERuntime(export_dir, "cpu", precision="int8")
    assert rt8.cpu_plan == CpuPlan() and rt8.plan_source["decoder"].startswith("default")
    rt8.engine("encoder")
    assert rt8.plan_source["encoder"].startswith("default")


def test_tuned_on_first_use_then_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, export_dir: Path) -> None:
    """cpu_plan="tuned" measures once (a short budget here), caches, and later runtimes reuse it."""
    import vae_deploy.tune as tune

    monkeypatch.setenv(plans.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tune, "DEFAULT_SECONDS", 0.3)
    calls = []
    real = tune.tune_plan
    monkeypatch.setattr(tune, "tune_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = VAERuntime(export_dir, "cpu", cpu_plan="tuned")
    assert calls == [1] and first.plan_source["decoder"].startswith("cached (")
    second = VAERuntime(export_dir, "cpu", cpu_plan="tuned")
    assert calls == [1] and second.cpu_plan == first.cpu_plan
    assert VAERuntime(export_dir, "cpu").cpu_plan == first.cpu_plan


def test_tune_export_measures_every_candidate_and_caches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, export_dir: Path
) -> None:
    monkeypatch.setenv(plans.CACHE_ENV, str(tmp_path))
    lines: list[str] = []
    result, cached = tune_export(export_dir, precision="int8", seconds=0.6, log=lines.append)
    assert cached is not None and plans.load_plan(_decoder_sha(export_dir, "onnx-int8")).plan == result.plan
    labels = {s.label() for s in (DEFAULT_SESSIONS, Sessions(0, False), Sessions(1, False))}
    first = min(result.sessions)
    assert first == 1 and labels <= set(result.sessions[first])
    assert all(us > 0 for row in result.sessions.values() for us in row.values())
    assert result.speedup[first][DEFAULT_SESSIONS.label()] == pytest.approx(1.0)
    assert lines and "batch 1:" in lines[0]
    text = result.table()
    assert "plan: CpuPlan(" in text and "median µs per call" in text
    assert json.loads(json.dumps(result.to_dict()))["plan"] == result.plan.to_dict()


def test_tune_plan_measures_row_chunking_at_large_batches(export_dir: Path) -> None:
    from vae_deploy.manifest import read_manifest

    entry = read_manifest(export_dir).entry("decoder", "onnx")
    model = (export_dir / entry.file).read_bytes()
    result = tune_plan(model, entry.spec, seconds=1.0, batch_sizes=(1, 2048), candidates=[DEFAULT_SESSIONS])
    assert set(result.chunking["us"]) == {"0", "256", "512", "1024"} and result.chunking["batch"] == 2048
    assert result.plan.max_rows == result.chunking["chosen"]


@pytest.mark.parametrize(
    ("speedups", "expected"),
    [
        # one candidate wins everywhere: one session of it
        ({1: (1.0, 1.3, 0.9), 64: (1.0, 1.2, 0.8), 4096: (1.0, 1.1, 0.7)}, CpuPlan(threads=0, spinning=False)),
        # nothing beats the default by more than the margin: the default plan
        ({1: (1.0, 1.02, 0.99), 4096: (1.0, 1.01, 0.98)}, CpuPlan()),
        # one thread wins small batches up to 8, the default from 64: boundary halfway (sqrt(8 * 64))
        (
            {1: (1.0, 0.9, 1.4), 8: (1.0, 0.9, 1.1), 64: (1.0, 0.9, 0.8), 4096: (1.0, 0.9, 0.5)},
            CpuPlan(small_batch_max=22, small_threads=1, small_spinning=False),
        ),
        # one disturbed probe (1 thread "wins" at 4096 only) does not decide the large-batch session
        (
            {1: (1, 0.67, 0.88), 8: (1, 0.78, 0.82), 64: (1, 0.96, 0.63), 512: (1, 0.97, 0.54), 4096: (1, 0.91, 1.26)},
            CpuPlan(),
        ),
    ],
)
def test_choose_sessions(speedups: dict, expected: CpuPlan) -> None:
    cands = (DEFAULT_SESSIONS, Sessions(0, False), Sessions(1, False))
    plan = choose_sessions({b: dict(zip(cands, v)) for b, v in speedups.items()})
    assert plan == expected


def test_cpu_plan_values_are_checked(export_dir: Path) -> None:
    with pytest.raises(UsageError, match="cpu_plan must be one of"):
        VAERuntime(export_dir, "cpu", cpu_plan="fastest")
    with pytest.raises(UsageError, match="CpuPlan"):
        CpuPlan(small_threads=-1)
    with pytest.raises(UsageError, match="CpuPlan"):
        CpuPlan.from_dict({"threads": 1, "turbo": True})
    assert CpuPlan.from_dict(CpuPlan(threads=3).to_dict()) == CpuPlan(threads=3)
    assert not CpuPlan(small_batch_max=8, threads=1, small_threads=1).two_sessions()
    assert CpuPlan(small_batch_max=8, threads=2, small_threads=1).two_sessions()


def test_cli_tune(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tune.json"
    rc = main(["tune", str(export_dir), "--seconds", "0.3", "--json", str(out), "--no-save"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "plan: CpuPlan(" in text and "not cached (--no-save)" in text
    assert plans.load_plan(_decoder_sha(export_dir)) is None
    assert json.loads(out.read_text())["graph"] == "decoder"


@pytest.mark.parametrize(
    ("args", "expected", "code"),
    [
        (["--seconds", "0"], "seconds must be between", 2),
        (["--precision", "fp16"], "lists no decoder 'onnx-fp16' file", 1),
        (["--graph", "vae"], "Invalid value for '--graph'", 2),
    ],
)
def test_cli_tune_errors_are_one_line(
    export_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str, code: int
) -> None:
    assert main(["tune", str(export_dir), *args]) == code
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tune_refuses_a_folder_without_an_export(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a vae-deploy export folder"):
        tune_export(tmp_path)

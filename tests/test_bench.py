"""`vae-deploy bench`: the JSON schema on real backends, FLOP counting, skips with reasons, the CLI.

Real export folders, real sessions, tiny batch sizes and a tiny time budget; no timing assertions
(speed targets live in benchmarks/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vae_deploy.bench import (
    BACKENDS,
    Budget,
    flops_per_sample,
    format_table,
    machine_slug,
    plot_throughput,
    run_bench,
    write_json,
)
from vae_deploy.bench.timing import Point
from vae_deploy.config import ModelConfig
from vae_deploy.errors import IntegrityError, MissingExtraError, UsageError

# max_s well above one call even on a loaded machine: a point ends after its time budget even
# with one round, and the tests check that every point ran at least min_rounds calls.
TINY = Budget(
    warmup_s=0.005, round_s=0.005, min_rounds=2, max_s=0.5, matmul_n=256, matmul_repeats=1, ceiling_n=128, copy_mib=4
)
ROW_KEYS = {"backend", "graph", "batch_size", "latency_ms", "samples_per_s", "fraction_of_peak"}


@pytest.fixture(scope="module")
def export_dir(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's small MLP exported (onnx + torchscript, no pt2), without the parity check."""
    from vae_deploy.export import export

    out = tmp_path_factory.mktemp("bench") / "exported"
    export(mlp_checkpoint, out, formats=("onnx", "torchscript"), verify=False, log=lambda _: None)
    return out


# --- FLOPs --------------------------------------------------------------------------------------


def test_flops_mlp_by_hand() -> None:
    cfg = ModelConfig(arch="mlp", latent_dim=2, hidden=(3,), image_shape=(1, 2, 2))
    assert flops_per_sample(cfg, "decoder") == 2 * (2 * 3 + 3 * 4)  # Linear(2,3), Linear(3,4)
    assert flops_per_sample(cfg, "encoder") == 2 * (4 * 3 + 3 * 4)  # Linear(4,3), head Linear(3,2*2)
    ref = ModelConfig(arch="mlp", latent_dim=20, hidden=(400,))
    assert flops_per_sample(ref, "decoder") == 643_200


def test_flops_conv_by_hand() -> None:
    cfg = ModelConfig(arch="conv", latent_dim=3, conv_channels=(2,), image_shape=(1, 4, 4))
    # encoder: Conv2d(1->2, 3x3, stride 2) gives 2x2x2 outputs of 1*9 MACs; head Linear(8, 6)
    assert flops_per_sample(cfg, "encoder") == 2 * (8 * 9) + 2 * (8 * 6)
    # decoder: Linear(3, 8); ConvTranspose2d(2->1, 3x3): each of 8 inputs scatters 1*9 MACs
    assert flops_per_sample(cfg, "decoder") == 2 * (3 * 8) + 2 * (8 * 9)


def test_flops_rejects_unknown_graph() -> None:
    with pytest.raises(UsageError, match="graph"):
        flops_per_sample(ModelConfig(), "middle")


# --- the harness --------------------------------------------------------------------------------


def test_point_settles_only_when_the_median_stops_moving() -> None:
    budget = Budget(min_rounds=3, settle=0.02, max_s=100.0)
    p = Point()
    for _ in range(3):
        p.add_round([1.0, 1.0, 1.0])
    assert p.settled(budget) and p.done(budget)
    q = Point()
    for t in (1.0, 1.0, 2.0):
        q.add_round([t] * 5)  # the median jumps in the last round
    q.add_round([3.0] * 20)
    assert not q.settled(budget) and not q.done(budget)
    q.add_round([3.0] * 200)
    assert q.settled(budget)
    r = Point()
    r.add_round([60.0, 50.0])  # over the per-point time budget: done although not settled
    assert not r.settled(budget) and r.done(budget)


def test_schema_and_values(export_dir: Path, mlp_checkpoint: Path, tmp_path: Path) -> None:
    backends = ["eager", "torchscript", "onnx-cpu", "onnx-cpu-bare", "onnx-cpu-default", "onnx-cpu-int8"]
    report = run_bench(export_dir, backends=backends, batch_sizes=(1, 3), budget=TINY, log=lambda _: None)
    data = json.loads(write_json(report, tmp_path / "out.json").read_text())
    assert set(data) >= {"machine", "limits", "results"}
    assert data["limits"]["cpu_fp32_matmul_gflops"] > 0
    samples = data["limits"]["cpu_fp32_matmul_gflops_samples"]  # at the start and at the end only
    assert len(samples) == 2 and data["limits"]["cpu_fp32_matmul_gflops"] == pytest.approx(max(samples), abs=0.05)
    assert data["machine"]["cpus"] >= 1 and data["machine"]["onnxruntime"]
    assert {(r["backend"], r["batch_size"]) for r in data["results"]} == {(b, n) for b in backends for n in (1, 3)}
    flops = data["settings"]["flops_per_sample"]
    assert flops == flops_per_sample(ModelConfig(**data["settings"]["model_config"]), "decoder")
    limits = data["limits"]
    assert limits["cpu_int8_matmul_gops"] > 0 and limits["cpu_ceiling_n"] == TINY.ceiling_n
    assert "cpu_bf16_matmul_gflops" in limits or "no bf16 hardware" in limits["cpu_bf16_matmul_note"]
    best = max(limits.get(k) or 0 for k in ("cpu_fp32_matmul_gflops", "cpu_int8_matmul_gops", "cpu_bf16_matmul_gflops"))
    for r in data["results"]:
        assert set(r) >= ROW_KEYS and r["graph"] == "decoder"
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["samples_per_s"] == pytest.approx(r["batch_size"] / lat["p50"] * 1e3)
        peak = limits["cpu_int8_matmul_gops" if r["backend"] == "onnx-cpu-int8" else "cpu_fp32_matmul_gflops"]
        assert r["peak"] == ("cpu_int8" if r["backend"] == "onnx-cpu-int8" else "cpu_fp32")
        assert r["fraction_of_peak"] == pytest.approx(flops * r["samples_per_s"] / (peak * 1e9))
        assert r["fraction_of_best"] == pytest.approx(flops * r["samples_per_s"] / (best * 1e9))
        assert r["runs"] >= 2 and r["threads"]
        if r["backend"] != "eager":
            assert r["ratios"]["vs_eager"] > 0
    onnx1 = next(r for r in data["results"] if r["backend"] == "onnx-cpu" and r["batch_size"] == 1)
    assert onnx1["threads"]["ort_intra_op"] is not None and "spinning" in onnx1["threads"]
    err = data["errors"]["onnx-cpu-int8"]
    assert 0 < err["mean_abs"] <= err["max_abs"] < 0.5  # int8 differs from fp32, but not wildly
    assert err["mean_abs_255"] == pytest.approx(255 * err["mean_abs"])
    assert all(r["error_vs_fp32"] == err for r in data["results"] if r["backend"] == "onnx-cpu-int8")
    # CUDA rows and pt2 were not asked for: nothing skipped
    assert data["skipped"] == []
    notes = data["settings"]["notes"]  # what exactly ran: the int8 file's origin, each runtime's CPU plan
    assert "quantized for this run" in notes["onnx-cpu-int8"] and "CPU plan default" in notes["onnx-cpu"]
    text = format_table(report)
    assert "onnx-cpu-int8" in text and "samples/s" in text and "mean |error|" in text and "int8 matmul" in text


def test_encoder_graph(export_dir: Path) -> None:
    report = run_bench(
        export_dir,
        backends="eager,onnx-cpu,onnx-cpu-int8",
        batch_sizes=[2],
        graph="encoder",
        budget=TINY,
        log=lambda _: None,
    )
    assert [r.backend for r in report.results] == ["eager", "onnx-cpu", "onnx-cpu-int8"]
    assert all(r.graph == "encoder" for r in report.results)
    assert report.settings["flops_per_sample"] == flops_per_sample(ModelConfig(latent_dim=8, hidden=(64,)), "encoder")
    assert "mean_abs" in report.errors["onnx-cpu-int8"]


def test_unavailable_backends_are_skipped_with_a_reason(export_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "exp"
    shutil.copytree(export_dir, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["path"] = manifest["source"]["abs_path"] = str(tmp_path / "gone" / "checkpoint.pt")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    report = run_bench(moved, backends=list(BACKENDS), batch_sizes=[1], budget=TINY, log=lambda _: None)
    reasons = {s["backend"]: s["reason"] for s in report.skipped}
    assert "is not there; pass --checkpoint" in reasons["eager"]
    assert "no decoder pt2 file" in reasons["pt2"]
    import torch

    assert "no decoder onnx-fp16 file" in reasons["onnx-cuda-fp16"]  # exported without --fp16
    if not torch.cuda.is_available():
        for name in ("eager-cuda", "onnx-cuda", "onnx-cuda-graph"):
            assert "CUDA" in reasons[name]
    measured = {r.backend for r in report.results}
    assert {"torchscript", "onnx-cpu", "onnx-cpu-int8"} <= measured
    assert not measured & set(reasons)


def test_bad_inputs_are_clear_errors(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown backend"):
        run_bench(export_dir, backends="onnx-gpu", budget=TINY)
    with pytest.raises(UsageError, match="positive integers"):
        run_bench(export_dir, batch_sizes=[0], budget=TINY)
    with pytest.raises(UsageError, match="graph"):
        run_bench(export_dir, graph="both", budget=TINY)
    bad = tmp_path / "tampered"
    shutil.copytree(export_dir, bad)
    raw = bytearray((bad / "decoder.onnx").read_bytes())
    raw[-1] ^= 1
    (bad / "decoder.onnx").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="decoder.onnx"):
        run_bench(bad, backends="onnx-cpu", budget=TINY)


def test_plot_and_missing_matplotlib(export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = run_bench(export_dir, backends="onnx-cpu", batch_sizes=(1, 2), budget=TINY, log=lambda _: None)
    path = plot_throughput(report, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # usual permissions, not 0600
    assert b"<svg" in plot_throughput(report, tmp_path / "plot.svg").read_bytes()[:1000]
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match="matplotlib"):
        plot_throughput(report, tmp_path / "again.png")
    assert not (tmp_path / "again.png").exists()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_machine_slug() -> None:
    assert machine_slug({"cpu": "AMD EPYC 9R14 96-Core Processor", "cpus": 2}) == "amd-epyc-9r14-96-core-2c"
    assert machine_slug({"gpu": "NVIDIA H200", "cpu": "x", "cpus": 16}) == "h200"
    # a KVM guest may name a Zen 3 and a Zen 4 both "AMD EPYC": their best vector extension tells them apart
    zen3 = {"cpu": "AMD EPYC", "cpus": 2, "cpu_flags": ["avx2", "fma"]}
    zen4 = {"cpu": "AMD EPYC", "cpus": 2, "cpu_flags": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]}
    spr = {"cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpus": 2, "cpu_flags": ["avx512f", "amx_int8"]}
    assert [machine_slug(m) for m in (zen3, zen4, spr)] == [
        "amd-epyc-avx2-2c",
        "amd-epyc-avx512-vnni-2c",
        "intel-xeon-platinum-8481c-2-70ghz-amx-2c",
    ]


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_bench_quick_json(export_dir: Path, mlp_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from vae_deploy.cli import main

    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            str(export_dir),
            "--quick",
            "--json",
            str(out),
            "--checkpoint",
            str(mlp_checkpoint),
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    assert {r["batch_size"] for r in data["results"]} == {1, 64}
    got = {r["backend"] for r in data["results"]}
    assert {"eager", "torchscript", "onnx-cpu", "onnx-cpu-int8"} <= got
    assert all(np.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0 for r in data["results"])
    assert "onnx-cpu" in text and "x eager" in text


def test_cli_bench_errors(export_dir: Path, tmp_path: Path, capsys) -> None:
    from vae_deploy.cli import main

    assert main(["bench", str(tmp_path / "nowhere"), "--quick"]) == 1
    assert main(["bench", str(export_dir), "--batch-sizes", "0,4"]) == 2
    assert main(["bench", str(export_dir), "--backends", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "positive integers" in err and "unknown backend" in err
    assert "Traceback" not in err


def test_tuned_cpu_plan_gives_the_same_numbers(export_dir: Path) -> None:
    """The plan bench tuned (one spinning pool, large batches run in max_rows chunks) changes speed only."""
    from vae_deploy.runtime import CpuPlan, VAERuntime

    tuned = VAERuntime(export_dir, "cpu", cpu_plan=CpuPlan(max_rows=64))
    plain = VAERuntime(export_dir, "cpu", cpu_plan=CpuPlan(max_rows=0, small_batch_max=16, spinning=False))
    z = np.random.default_rng(0).standard_normal((150, 8), dtype=np.float32)  # 64 + 64 + 22 rows
    assert np.array_equal(tuned.decode(z), plain.decode(z))
    x = np.random.default_rng(1).random((130, 1, 28, 28), dtype=np.float32)
    for a, b in zip(tuned.encode(x), plain.encode(x)):
        assert a.shape == (130, 8) and np.array_equal(a, b)
    assert np.array_equal(tuned.sample(200, seed=3, batch_size=200), plain.sample(200, seed=3, batch_size=7))


def test_int8_keeps_short_reductions_fp32(export_dir: Path, tmp_path: Path) -> None:
    """The small model's decoder is 8 -> 64 -> 784: the K=8 layer stays fp32, the K=64 one is int8
    (dynamically for bench's encoder path, statically for the shipped decoder)."""
    import onnx

    from vae_deploy.manifest import read_manifest
    from vae_deploy.quantize import quantize_decoder, quantize_dynamic_int8

    src = export_dir / "decoder.onnx"
    first = next(n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Gemm")
    assert quantize_dynamic_int8(src, tmp_path / "d8.onnx") == [first]
    assert [n.op_type for n in onnx.load(str(tmp_path / "d8.onnx")).graph.node].count("MatMulInteger") == 1
    every = quantize_dynamic_int8(src, tmp_path / "all.onnx", min_k=1)
    assert (
        every == []
        and [n.op_type for n in onnx.load(str(tmp_path / "all.onnx")).graph.node].count("MatMulInteger") == 2
    )
    assert quantize_decoder(src, tmp_path / "s8.onnx", read_manifest(export_dir).model.decoder("int8")) == [first]
    static = onnx.load(str(tmp_path / "s8.onnx")).graph
    quantized = {n.output[0] for n in static.node if n.op_type == "DequantizeLinear"}
    gemms = [n for n in static.node if n.op_type == "Gemm"]
    assert [any(i in quantized for i in g.input) for g in gemms] == [False, True]  # only the K=64 layer


def test_import_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, vae_deploy.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _context(export_dir: Path, graph: str, tmp: Path):
    from vae_deploy.bench.context import Checkpoint, Context
    from vae_deploy.manifest import check_manifest

    return Context(export_dir, check_manifest(export_dir), graph, Checkpoint(None, problem="none here"), tmp)


@pytest.mark.parametrize("graph", ["decoder", "encoder"])
def test_int8_runs_from_a_temp_file_without_a_manifest(export_dir: Path, tmp_path: Path, graph: str) -> None:
    """int8 is quantized into one temp file and run via VAERuntime.from_files: no forged export folder."""
    from vae_deploy.bench.backends import make_backend

    ctx = _context(export_dir, graph, tmp_path)
    int8, fp32 = make_backend("onnx-cpu-int8", ctx), make_backend("onnx-cpu", ctx)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{graph}.int8.onnx"]  # no manifest.json
    x = ctx.inputs(256)
    a, b = int8.prepare(x)(), fp32.prepare(x)()
    a, b = (a, b) if graph == "decoder" else (a[0], b[0])  # encoder: mu
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert np.abs(a - b).mean() < 0.1 * np.abs(b).mean()  # close to fp32 (mu of random pixels ~5)


def test_bare_backend_runs_the_runtime_session(export_dir: Path, tmp_path: Path) -> None:
    """onnx-cpu-bare calls the session VAERuntime serves that batch size with, and reports its settings."""
    from vae_deploy.bench.backends import make_backend

    ctx = _context(export_dir, "decoder", tmp_path)
    bare, wrapped = make_backend("onnx-cpu-bare", ctx), make_backend("onnx-cpu", ctx)
    for batch in (1, 2000):
        x = ctx.inputs(batch)
        assert np.array_equal(bare.prepare(x)()[0], wrapped.prepare(x)())
        settings = ctx.runtime().engine("decoder").settings_for(batch)
        assert wrapped.threads(batch) == settings
        assert bare.threads(batch) == {k: v for k, v in settings.items() if k != "rows_per_run"}
    assert "rows_per_run" in wrapped.threads(2000)  # the runtime runs large batches in chunks


def test_wait_quiet_waits_for_the_measure_to_fall_and_gives_up_after_its_time() -> None:
    """The one quiet-machine wait the benchmark scripts share: it measures until others use fewer
    than max_other cores (logging each busy reading), stops at its time limit, and with no time
    measures nothing."""
    from vae_deploy.bench import others_cores, wait_quiet

    readings, said = iter([1.5, 0.9, 0.1, 0.0]), []
    busy, waited = wait_quiet(0.3, 60, log=said.append, measure=lambda: next(readings))
    assert busy == 0.1 and len(said) == 2 and "1.50 cores" in said[0] and waited < 60
    busy, waited = wait_quiet(0.3, 0.05, log=said.append, measure=lambda: 2.0)
    assert busy == 2.0 and waited >= 0.05
    assert wait_quiet(0.3, 0, measure=lambda: pytest.fail("measured with no time to wait")) == (None, 0.0)
    assert others_cores(0.05) >= 0.0


def test_write_results_writes_both_files_into_a_new_folder_and_no_temp_files(tmp_path: Path) -> None:
    """The one results writer the benchmark scripts share: STEM.json and STEM.md, folder created,
    nothing else left in it (each file is a temp file renamed into place)."""
    from vae_deploy.bench import write_results

    stem = tmp_path / "new" / "shards-some.cpu-2c"
    path = write_results(stem, {"n": 3}, "# table\n", indent=1)
    assert path == tmp_path / "new" / "shards-some.cpu-2c.json"
    assert json.loads(path.read_text()) == {"n": 3}
    assert (tmp_path / "new" / "shards-some.cpu-2c.md").read_text() == "# table\n"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [path.name, "shards-some.cpu-2c.md"]

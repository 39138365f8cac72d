"""The standard benchmark suite: writes benchmarks/results/<machine>.json, .md and .png.

    python benchmarks/run_suite.py [--data-root ../shared/data] [--wait-quiet 600] [--quick]

1. Trains the reference MLP VAE (latent 20, hidden 400; one epoch of MNIST, or synthetic data
   without it) and exports it (ONNX + fp16 and int8 decoders, TorchScript, torch.export), verified;
   or uses ``--export-dir``.
2. ``vae-deploy tune`` on this machine for the decoder (fp32 and int8) and the encoder, cached in
   the run's own plan cache (never the user's), so the ``onnx-cpu`` rows are the tuned runtime.
3. ``vae-deploy bench`` on the decoder, every backend, batch sizes 1..4096 (plus large batches on
   the CUDA backends when there is a GPU), then the encoder on the main backends.
4. ``bench_reparam.py`` (fused vs unfused reparameterize + KL) and ``bench_train.py`` (our training
   loop vs a plain reference loop).
5. Checks the targets of issues 5 and 17 and says, for each, met or missed and by how much.

Figures measured while other processes load the machine are noisy. Each benchmark records the CPU
other processes used while it ran (from /proc/stat, in cores); ``--wait-quiet S`` waits up to S
seconds for others to use less than ``--max-other`` cores before a benchmark, and a benchmark they
disturbed anyway is run again (``--retries``), keeping the quietest attempt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_train lives beside this script

from vae_deploy import bench  # noqa: E402

CPU_SIZES = (1, 8, 64, 512, 4096)
GPU_SIZES = (1, 64, 4096, 65536, 262144, 1048576)
ENCODER_SIZES = (1, 64, 4096)
ENCODER_BACKENDS = ("eager", "torchscript", "pt2", "onnx-cpu", "onnx-cpu-int8")


def load1() -> float:
    return os.getloadavg()[0]


def quiet_run(run, args, what: str, log=print):
    """Run a benchmark; while other processes took more than --max-other cores during it, wait for a
    quiet machine and run it again (up to --retries times); return the quietest attempt."""
    best, best_other = None, float("inf")
    for attempt in range(args.retries + 1):
        bench.wait_quiet(args.max_other, args.wait_quiet, log)
        report = run()
        other = (report.machine.get("other_load") or {}).get("other_cores", 0.0)
        if other < best_other:
            best, best_other = report, other
        if other <= args.max_other:
            break
        if attempt < args.retries:
            log(f"{what}: other processes used {other:.2f} cores during the run; running it again")
    return best


def make_export(work: Path, data_root: str | None, log=print) -> Path:
    """Train the reference MLP for one epoch and export it with every format (verified)."""
    from vae_deploy.config import make_configs, to_dict
    from vae_deploy.data import resolve_data_root
    from vae_deploy.demo import REFERENCE_MODEL, REFERENCE_TRAIN
    from vae_deploy.export import export
    from vae_deploy.training import train

    root = resolve_data_root(data_root)
    dataset = "mnist" if root is not None and (root / "MNIST" / "raw").is_dir() else "synthetic"
    model_cfg, train_cfg = make_configs(
        to_dict(REFERENCE_MODEL),
        {
            **REFERENCE_TRAIN,
            "dataset": dataset,
            "data_root": str(root) if root else None,
            "epochs": 1,
            "out": str(work / "run"),
        },
    )
    result = train(model_cfg, train_cfg, progress=False, log=log)
    out = work / "exported"
    export(
        result.checkpoint,
        out,
        formats=("onnx", "torchscript", "pt2"),
        fp16=True,
        int8=True,
        verify=True,
        data_root=root,
        log=log,
    )
    return out


def run_tuning(export_dir: Path, args: argparse.Namespace, log=print) -> dict[str, Any]:
    """`vae-deploy tune` for the decoder (fp32, and int8 when the export has it) and the encoder,
    each on a quiet machine where possible; plans go to the run's own cache (see main)."""
    from vae_deploy.contract import PRECISION_FORMAT
    from vae_deploy.manifest import read_manifest
    from vae_deploy.tune import tune_export

    manifest = read_manifest(export_dir)
    out: dict[str, Any] = {}
    for graph, precision in (("decoder", "fp32"), ("decoder", "int8"), ("encoder", "fp32")):
        fmt = PRECISION_FORMAT[precision] if graph == "decoder" else "onnx"
        if manifest.entry(graph, fmt) is None:
            continue
        bench.wait_quiet(args.max_other, args.wait_quiet, log)
        counters = bench.cpu_counters()
        result, _ = tune_export(export_dir, graph=graph, precision=precision, seconds=1.0 if args.quick else 5.0)
        log(result.table())
        out[f"{graph} {precision}"] = {**result.to_dict(), "other_load": bench.other_load(counters)}
    return out


# --- targets ------------------------------------------------------------------------------------


def _target(name: str, measured: float | None, required: float, higher: bool, unit: str = "x") -> dict:
    if measured is None:
        return {"target": name, "required": required, "measured": None, "met": None, "margin": "not measured"}
    met = measured >= required if higher else measured <= required
    if higher:  # e.g. a speed-up: how far above (met) or below (missed) the bar, relative to it
        rel = measured / required - 1
        margin = f"met, {100 * rel:.0f}% above" if met else f"missed by {-100 * rel:.0f}% (reached {1 + rel:.0%})"
    else:  # a ceiling (latency, error): headroom under it, or how far over
        rel = 1 - measured / required
        margin = f"met, {100 * rel:.0f}% under" if met else f"missed, {-100 * rel:.0f}% over"
    return {
        "target": name,
        "required": required,
        "measured": measured,
        "unit": unit,
        "met": met,
        "margin_pct": 100 * rel,
        "margin": margin,
    }


def check_targets(dec: dict[str, Any], gpu: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, from the side-by-side decoder rows of one run."""
    rows = {(r["backend"], r["batch_size"]): r for r in dec["results"]}

    def ratio(a: str, b: str, n: int) -> float | None:
        """Throughput of a over b at batch n: the bench's round-by-round paired ratio."""
        row = rows.get((a, n))
        return row["ratios"].get(f"vs_{b.replace('-', '_')}") if row else None

    out = [  # issue 17's targets (issue 5's, with the wrapper and int8 bars raised)
        _target("onnx-cpu vs eager throughput, batch 1", ratio("onnx-cpu", "eager", 1), 2.5, True),
        _target("onnx-cpu vs eager throughput, batch 64", ratio("onnx-cpu", "eager", 64), 1.2, True),
        _target("onnx-cpu vs eager throughput, batch 4096", ratio("onnx-cpu", "eager", 4096), 1.0, True),
    ]
    big = rows.get(("onnx-cpu", 4096))
    out.append(
        _target(
            "onnx-cpu fraction of fp32 matmul peak, batch 4096",
            big["fraction_of_peak"] if big else None,
            0.70,
            True,
            "fraction",
        )
    )
    for n in sorted({b for (_, b) in rows if b >= 64}):
        out.append(
            _target(
                f"onnx-cpu-int8 vs onnx-cpu throughput, batch {n}",
                ratio("onnx-cpu-int8", "onnx-cpu", n),
                2.5,
                True,
            )
        )
    err = dec.get("errors", {}).get("onnx-cpu-int8")
    out.append(
        _target(
            "onnx-cpu-int8 mean abs pixel error vs fp32 (in 1/255)",
            err["mean_abs_255"] if err else None,
            0.5,
            False,
            "/255",
        )
    )
    speed = ratio("onnx-cpu", "onnx-cpu-bare", 1)
    lat = 1 / speed if speed else None  # decode latency / bare session.run latency
    out.append(_target("VAERuntime.decode latency / bare InferenceSession.run, batch 1", lat, 1.1, False))
    for t in out:
        if t["met"] is False:
            t["why"] = _why_missed(t["target"], rows, dec)
    if gpu is not None:
        grows = [r for r in gpu["results"] if r["backend"] == "onnx-cuda-fp16"]
        best = max((r["fraction_of_peak"] or 0 for r in grows), default=None)
        out.append(_target("onnx-cuda-fp16 fraction of fp16 matmul peak, large batch", best, 0.30, True, "fraction"))
        g1 = next((r for r in gpu["results"] if r["backend"] == "onnx-cuda-graph" and r["batch_size"] == 1), None)
        out.append(
            _target(
                "onnx-cuda-graph batch-1 p50 latency (us)",
                g1["latency_ms"]["p50"] * 1e3 if g1 else None,
                20,
                False,
                "us",
            )
        )
    return out


def _why_missed(target: str, rows: dict[tuple[str, int], dict[str, Any]], dec: dict[str, Any]) -> str:
    """What this run's own measurements say about a missed target (empty when they say nothing)."""
    limits, flops = dec.get("limits", {}), dec.get("settings", {}).get("flops_per_sample")
    if target.startswith("onnx-cpu-int8 vs onnx-cpu"):
        int8, fp32 = limits.get("cpu_int8_matmul_gops"), limits.get("cpu_fp32_matmul_gflops")
        row = rows.get(("onnx-cpu", int(target.rsplit(" ", 1)[1])))
        if int8 and fp32 and flops and row:
            best = int8 * 1e9 / flops / row["samples_per_s"]
            return (
                f"this CPU's int8 matmul ceiling is {int8 / fp32:.2f}x its fp32 peak ({int8:.0f} vs {fp32:.0f} G/s, "
                f"this run): an int8 decoder running at that ceiling would be {best:.2f}x onnx-cpu here"
            )
    if target.startswith("onnx-cpu vs eager"):
        n = int(target.rsplit(" ", 1)[1])
        a, b = rows.get(("onnx-cpu", n)), rows.get(("eager", n))
        if a and b and a.get("fraction_of_peak") and b.get("fraction_of_peak"):
            return (
                f"onnx-cpu at {a['fraction_of_peak']:.0%} and eager at {b['fraction_of_peak']:.0%} of the fp32 matmul "
                f"peak; fastest calls {a['latency_ms']['min']:.3g} vs {b['latency_ms']['min']:.3g} ms"
            )
    if target.startswith("VAERuntime.decode latency"):
        a, b = rows.get(("onnx-cpu", 1)), rows.get(("onnx-cpu-bare", 1))
        if a and b:
            extra = (a["latency_ms"]["p50"] - b["latency_ms"]["p50"]) * 1e3
            return f"{extra:.1f} µs of checks and call on a {b['latency_ms']['p50'] * 1e3:.1f} µs session run"
    return ""


# --- markdown -----------------------------------------------------------------------------------


def _pivot(report: dict[str, Any], title: str) -> list[str]:
    sizes = sorted({r["batch_size"] for r in report["results"]})
    names = list(dict.fromkeys(r["backend"] for r in report["results"]))
    rows = {(r["backend"], r["batch_size"]): r for r in report["results"]}
    lines = [f"**{title}**: samples/s (x eager, % of the peak of the row's precision)", ""]
    lines.append("| backend | " + " | ".join(f"batch {n}" for n in sizes) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in sizes) + " |")
    for name in names:
        cells = []
        for n in sizes:
            r = rows.get((name, n))
            if r is None:
                cells.append("-")
                continue
            vs = r.get("ratios", {}).get("vs_eager")
            frac = r.get("fraction_of_peak")
            extra = ", ".join(
                x for x in (f"x{vs:.2f}" if vs else "", f"{100 * frac:.0f}%" if frac is not None else "") if x
            )
            cells.append(f"{r['samples_per_s']:,.0f}" + (f" ({extra})" if extra else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lat = [r for r in report["results"] if r["batch_size"] == sizes[0]]
    lines.append(
        f"Latency at batch {sizes[0]} (ms): "
        + "; ".join(
            f"{r['backend']} " + " / ".join(f"{q} {r['latency_ms'][q]:.4f}" for q in ("p50", "p90", "p99")) for r in lat
        )
    )
    lines.append("")
    return lines


def _ceilings(lim: dict[str, Any]) -> str:
    """The best-precision ceilings beside the fp32 peak (or why one was not measured)."""
    parts = []
    for key, label, unit in (("cpu_int8_matmul_gops", "int8", "OP"), ("cpu_bf16_matmul_gflops", "bf16", "FLOP")):
        if lim.get(key):
            parts.append(f"{label} matmul ({lim['cpu_ceiling_n']}^3) **{lim[key]:.1f} G{unit}/s**")
        else:
            note = lim.get(key.rsplit("_", 1)[0] + "_note", "not measured")
            parts.append(f"{label} matmul {note}")
    return "; ".join(parts) + "; " if parts else ""


def _batch1(report: dict[str, Any]) -> list[str]:
    """Batch-1 p50 latency in µs of the runtime, the bare session and eager, same run."""
    rows = {r["backend"]: r for r in report["results"] if r["batch_size"] == 1}
    got = [(n, rows[n]["latency_ms"]["p50"] * 1e3) for n in ("onnx-cpu", "onnx-cpu-bare", "eager") if n in rows]
    if not got:
        return []
    text = ", ".join(f"`{n}` {us:.1f} µs" for n, us in got)
    return [f"Batch-1 p50 latency, same run: {text} (`onnx-cpu` is `VAERuntime.decode`).", ""]


def _tuning(tuning: dict[str, Any]) -> list[str]:
    """What `vae-deploy tune` measured on this machine (median µs per call) and chose."""
    if not tuning:
        return []
    lines = ["## CPU plans tuned on this machine (`vae-deploy tune`)", ""]
    for name, t in tuning.items():
        sizes = list(t["sessions_us"])
        labels = list(dict.fromkeys(k for row in t["sessions_us"].values() for k in row))
        other = (t.get("other_load") or {}).get("other_cores", "?")
        head = f"**{name}** ({t['seconds']} s; other processes {other} cores)"
        lines += [f"{head}: median µs per call (x the default)", ""]
        lines.append("| session setting | " + " | ".join(f"batch {b}" for b in sizes) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in sizes) + " |")
        for label in labels:
            cells = [
                f"{t['sessions_us'][b][label]:,.1f} (x{t['speedup_vs_default'][b][label]:.2f})"
                if label in t["sessions_us"][b]
                else "-"
                for b in sizes
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        busy = t.get("other_cores_per_batch") or {}
        if busy:
            lines.append("| (other processes, cores) | " + " | ".join(f"{busy.get(b, '-')}" for b in sizes) + " |")
        ch = t.get("chunking")
        if ch:
            runs = ", ".join(f"{'one run' if r == '0' else r + ' rows'} {v / 1e3:.2f} ms" for r, v in ch["us"].items())
            lines.append("")
            lines.append(f"Rows per run at batch {ch['batch']}: {runs}.")
        from vae_deploy.engines import CpuPlan

        chosen = f"Chosen: `{CpuPlan(**t['plan'])}`"
        lines += ["", chosen + "".join(f"; {n}" for n in t.get("notes", [])) + ".", ""]
    return lines


def _threads(report: dict[str, Any]) -> list[str]:
    lines = ["Thread settings:", ""]
    lines += [f"- `{name}`: {text}" for name, text in bench.threads_summary(report["results"]).items()]
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    m, lim, dec = result["machine"], result["decoder"]["limits"], result["decoder"]
    mc = dec["settings"]["model_config"]
    lines = [
        f"# Benchmark results: {m['cpu']} ({m['cpus']} cpus)" + (f", {m['gpu']}" if m.get("gpu") else ""),
        "",
        f"{result['finished']}; vae-deploy {m['vae_deploy']}, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}; cpu flags: {', '.join(m['cpu_flags'])}.",
        f"Command: `{result['command']}`. 1-min load average after each section (this run's own "
        "threads included): "
        + ", ".join(f"{k} {v}" for k, v in result["load"].items())
        + "; CPU used by other processes during the benchmarks (cores, 0 = quiet): "
        + ", ".join(
            f"{k} {result[k]['machine']['other_load']['other_cores']}"
            for k in ("decoder", "gpu", "encoder")
            if result.get(k) and result[k]["machine"].get("other_load")
        )
        + ".",
        "",
        f"Machine limits measured in the same run: fp32 matmul ({lim['cpu_matmul_n']}^3, best of torch/MKL "
        f"and numpy/OpenBLAS on {lim['torch_threads']} threads, sampled through the run) "
        f"**{lim['cpu_fp32_matmul_gflops']:.1f} GFLOP/s**; " + _ceilings(lim) + f"memory copy "
        f"{lim['cpu_copy_gbps']:.1f} GB/s. Model: MLP decoder {mc['latent_dim']}-"
        f"{'-'.join(map(str, mc['hidden']))}-784, "
        f"{dec['settings']['flops_per_sample']:,} FLOP/sample.",
        "",
        "## Targets",
        "",
        "| target | required | measured | result | why, from this run's measurements |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for t in result["targets"]:
        req = ("<= " if "latency" in t["target"] or "error" in t["target"] else ">= ") + f"{t['required']:g}"
        meas = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        lines.append(f"| {t['target']} | {req} | {meas} | {t['margin']} | {t.get('why', '')} |")
    lines += [
        "",
        "Ratios are paired round by round (see the README's Benchmarks section); "
        "samples/s are batch / p50 latency. % of peak is against the peak of the row's precision "
        "(int8 rows: the int8 matmul ceiling).",
        "",
        "## Decoder",
        "",
    ]
    lines += _batch1(dec)
    lines += _pivot(dec, "Decoder (CPU)")
    err = dec["errors"].get("onnx-cpu-int8")
    if err:
        lines += [
            f"int8 decoder vs fp32 over {err['rows']} samples z ~ N(0, I): mean |error| "
            f"{err['mean_abs_255']:.3f}/255, max {err['max_abs_255']:.2f}/255.",
            "",
        ]
    lines += _threads(dec)
    notes = dec["settings"].get("notes", {})
    lines += ["What ran:", ""] + [f"- `{k}`: {v}" for k, v in notes.items()] + [""] if notes else []
    lines += _tuning(result.get("tuning") or {})
    if result.get("gpu"):
        lines += _pivot(result["gpu"], "Decoder (CUDA, device-resident I/O)")
    if result.get("encoder"):
        lines += ["## Encoder", ""] + _pivot(result["encoder"], "Encoder (CPU)")
    skipped = {s["backend"]: s["reason"] for s in dec["skipped"]}
    if skipped:
        lines += ["Skipped: " + "; ".join(f"`{k}`: {v}" for k, v in skipped.items()), ""]
    rp = result.get("reparam")
    if rp:
        f, u = rp["results"]["fused"], rp["results"]["unfused"]
        lines += [
            "## Fused reparameterize + KL (training step piece)",
            "",
            f"batch {rp['batch']} x latent {rp['latent']} on {rp['machine']['device']}: fused "
            f"{f['median_ms']:.2f} ms vs unfused {u['median_ms']:.2f} ms fwd+bwd (x{rp['speedup']:.2f}); "
            f"autograd keeps {f['saved_bytes'] / 2**20:.1f} MiB vs {u['saved_bytes'] / 2**20:.1f} MiB "
            f"(x{rp['saved_memory_ratio']:.2f} less).",
            "",
        ]
    tr = result.get("train")
    if tr:
        med = tr["median_images_per_s"]
        lines += [
            "## Training loop throughput",
            "",
            f"{tr['data']}; batch {tr['batch_size']}, {tr['torch_threads']} torch threads, median of "
            f"{len(tr['runs_images_per_s']['ours'])} interleaved runs: `vae_deploy.training.train` "
            f"**{med['ours']:,.0f} img/s**, plain reference loop {med['reference']:,.0f} img/s "
            f"(ratio x{tr['ratio_ours_vs_reference']:.3f}).",
            "",
        ]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", help="MNIST root (default $VAE_DEPLOY_DATA; synthetic data without one)")
    ap.add_argument("--export-dir", help="Benchmark this export folder instead of training/exporting one")
    ap.add_argument("--checkpoint", help="Eager model for --export-dir (default: the manifest's)")
    ap.add_argument("--out", default=str(HERE / "results"), help="Results folder")
    ap.add_argument("--name", help="Results file stem (default: the machine's slug)")
    ap.add_argument("--quick", action="store_true", help="Smoke run: tiny budgets, few batch sizes")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="Seconds to wait for a quiet machine")
    ap.add_argument("--max-other", type=float, default=0.15, help="Cores others may use during a run")
    ap.add_argument("--retries", type=int, default=2, help="Re-runs of a benchmark that others disturbed")
    ap.add_argument("--skip-train", action="store_true", help="Skip the training-loop benchmark")
    ap.add_argument("--render", metavar="JSON", help="Only rewrite the .md and .png of an existing results JSON")
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        result["targets"] = check_targets(result["decoder"], result.get("gpu"))
        write_results(result, path.parent, path.stem)
        return
    import torch

    started = time.time()
    load: dict[str, float] = {"start": round(load1(), 2)}
    with tempfile.TemporaryDirectory(prefix="vae-deploy-suite-") as tmp:
        work = Path(tmp)
        export_dir = Path(args.export_dir) if args.export_dir else make_export(work, args.data_root)
        from vae_deploy.plans import CACHE_ENV

        os.environ[CACHE_ENV] = str(work / "plan-cache")  # the run's plans, not the user's
        tuning = run_tuning(export_dir, args)
        load["tune"] = round(load1(), 2)
        common = {"checkpoint": args.checkpoint, "quick": args.quick, "progress": sys.stderr.isatty()}
        dec = quiet_run(
            lambda: bench.run_bench(
                export_dir,
                backends=bench.CPU_BACKENDS,
                batch_sizes=None if args.quick else CPU_SIZES,
                **common,
            ),
            args,
            "decoder",
        )
        print(bench.format_table(dec))
        load["decoder"] = round(load1(), 2)
        gpu = None
        if torch.cuda.is_available():
            gpu = bench.run_bench(
                export_dir,
                backends=bench.CUDA_BACKENDS,
                batch_sizes=(1, 4096) if args.quick else GPU_SIZES,
                **common,
            )
            print(bench.format_table(gpu))
            load["gpu"] = round(load1(), 2)
        enc = quiet_run(
            lambda: bench.run_bench(
                export_dir,
                backends=ENCODER_BACKENDS,
                batch_sizes=None if args.quick else ENCODER_SIZES,
                graph="encoder",
                **common,
            ),
            args,
            "encoder",
        )
        print(bench.format_table(enc))
        load["encoder"] = round(load1(), 2)
        reparam_json = work / "reparam.json"
        reparam_args = ["--batch", "8192", "--repeats", "6"] if args.quick else []
        subprocess.run(
            [sys.executable, str(HERE / "bench_reparam.py"), "--json", str(reparam_json), *reparam_args],
            check=True,
        )
        reparam = json.loads(reparam_json.read_text())
        load["reparam"] = round(load1(), 2)
        train = None
        if not args.skip_train:
            import bench_train

            train = bench_train.run(args.data_root, epochs=1, repeats=2 if args.quick else 5)
            load["train"] = round(load1(), 2)
    dec_d, gpu_d, enc_d = dec.to_dict(), gpu.to_dict() if gpu else None, enc.to_dict()
    result = {
        "machine": dec_d["machine"],
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.time() - started),
        "command": "python benchmarks/run_suite.py " + " ".join(sys.argv[1:]),
        "load": load,
        "targets": check_targets(dec_d, gpu_d),
        "tuning": tuning,
        "decoder": dec_d,
        "gpu": gpu_d,
        "encoder": enc_d,
        "reparam": reparam,
        "train": train,
    }
    write_results(result, Path(args.out), args.name)


def write_results(result: dict[str, Any], out: Path, name: str | None = None) -> None:
    """results/<machine>.json, .png (decoder throughput, CPU and GPU rows) and .md; each atomically."""
    stem = name or bench.machine_slug(result["machine"])
    dec, gpu = result["decoder"], result.get("gpu")
    plot_data = dict(dec)
    if gpu:
        plot_data["results"] = dec["results"] + gpu["results"]
        plot_data["limits"] = {**dec["limits"], **gpu["limits"]}
    bench.plot_throughput(plot_data, out / f"{stem}.png")
    bench.write_results(out / stem, result, markdown(result) + f"\n![throughput vs batch size]({stem}.png)\n")
    print()
    for t in result["targets"]:
        print(f"{t['target']}: {t['margin']} (measured {t['measured']}, required {t['required']})")
    print(f"wrote {out / stem}.json, .md, .png ({result['seconds']} s of benchmarking)")


if __name__ == "__main__":
    main()

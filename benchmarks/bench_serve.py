"""`vae-deploy serve` under load: requests/s and p50/p99 latency, dynamic batching on vs off.

    python benchmarks/bench_serve.py [--export-dir DIR] [--seconds 5] [--rounds 2] [--concurrency 1,16,64]

One Ray Serve instance on localhost serves the same export twice, side by side: ``/batched``
(dynamic batching up to ``--max-batch-size`` rows, ``--batch-wait-ms``) and ``/plain`` (each request
its own engine run), one replica each with the same onnxruntime threads. Clients are threads of
this process, each with one keep-alive ``http.client`` connection, posting ``.npy`` latents of
``--rows`` rows to ``/decode`` back to back for ``--seconds`` (after a short warm-up). Modes take
turns at each concurrency, ``--rounds`` times, so drift and other processes hit both alike; the
figures pool the rounds. Every answer is checked (status 200, the right size).

Also measured, because on a small machine they decide the result: the CPU the clients use (cores
and ms per request: what the server did not get), the CPU of the Ray processes (proxy, replicas),
everything else on the machine, and the mean rows per engine run from the replicas' ``/stats``.
Without ``--export-dir`` the reference MLP VAE (20-400-784) is built with random weights (a few
optimiser steps on synthetic data) and exported; weights do not change the timings.

Writes ``benchmarks/results/serve-<cpu>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy.bench.machine import cpu_model, load_avg, machine_slug, wait_quiet
from vae_deploy.bench.report import write_results
from vae_deploy.engines import cpu_count
from vae_deploy.runtime import VAERuntime
from vae_deploy.serve import ServeConfig, start

RESULTS = Path(__file__).resolve().parent / "results"
TICK = os.sysconf("SC_CLK_TCK")


# --- CPU accounting ------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by the live descendants of ``root`` (Ray's processes: GCS, raylet,
    proxy, controller, replicas), not ``root`` itself."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _proc_stat(int(entry))
            if found:
                stats[int(entry)] = found
    total = 0.0
    for pid, (_, cpu) in stats.items():
        parent = pid
        while parent in stats and parent != root:
            parent = stats[parent][0]
        if parent == root and pid != root:
            total += cpu
    return total


def machine_busy() -> float:
    """CPU-busy seconds of the whole machine (all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICK


# --- clients -------------------------------------------------------------------------------------


def client(host: str, port: int, path: str, body: bytes, answer_bytes: int, until: float, warm_until: float,
           out: list[float], errors: list[str]) -> None:  # fmt: skip
    """Post ``body`` back to back on one keep-alive connection; record latencies after the warm-up."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Content-Type": "application/x-npy"}
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= until:
                return
            conn.request("POST", path, body, headers)
            answer = conn.getresponse()
            data = answer.read()
            t1 = time.perf_counter()
            if answer.status != 200 or len(data) != answer_bytes:
                errors.append(f"{answer.status}: {data[:100]!r}")
            elif t0 >= warm_until:
                out.append(t1 - t0)
    except OSError as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def get_json(host: str, port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def load(host: str, port: int, app: str, body: bytes, answer_bytes: int, concurrency: int, seconds: float,
         warmup: float) -> dict[str, Any]:  # fmt: skip
    """One load run: ``concurrency`` clients for ``warmup + seconds``; what they and the machine saw."""
    stats0 = get_json(host, port, app + "/stats")["decoder"]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    start = time.perf_counter()
    warm_until, until = start + warmup, start + warmup + seconds
    threads = [
        threading.Thread(
            target=client,
            args=(host, port, app + "/decode", body, answer_bytes, until, warm_until, latencies[i], errors),
        )  # fmt: skip
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    time.sleep(max(0.0, warm_until - time.perf_counter()))
    cpu0, ray0, busy0, wall0 = time.process_time(), tree_cpu(os.getpid()), machine_busy(), time.perf_counter()
    for t in threads:
        t.join()
    cpu1, ray1, busy1, wall1 = time.process_time(), tree_cpu(os.getpid()), machine_busy(), time.perf_counter()
    stats1 = get_json(host, port, app + "/stats")["decoder"]
    done = [x for lat in latencies for x in lat]
    wall = wall1 - wall0
    client_cpu, server_cpu = cpu1 - cpu0, ray1 - ray0
    runs = stats1["engine_runs"] - stats0["engine_runs"]
    return {
        "latencies": done,
        "seconds": wall,
        "errors": errors,
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
        "other_cpu_s": max(0.0, (busy1 - busy0) - client_cpu - server_cpu),
        "engine_runs": runs,
        "rows": stats1["rows"] - stats0["rows"],
    }


def summarize(runs: list[dict[str, Any]], rows_per_request: int) -> dict[str, Any]:
    lat = sorted(x for r in runs for x in r["latencies"])
    seconds = sum(r["seconds"] for r in runs)
    n = len(lat)
    engine_runs = sum(r["engine_runs"] for r in runs)

    def pct(q: float) -> float:
        return round(1000 * lat[min(n - 1, int(q * n))], 3) if n else float("nan")

    return {
        "requests": n,
        "requests_per_s": round(n / seconds, 1),
        "rows_per_s": round(n * rows_per_request / seconds, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": round(1000 * statistics.fmean(lat), 3) if n else float("nan"),
        "rows_per_engine_run": round(sum(r["rows"] for r in runs) / engine_runs, 2) if engine_runs else None,
        "client_cores": round(sum(r["client_cpu_s"] for r in runs) / seconds, 2),
        "client_cpu_ms_per_request": round(1000 * sum(r["client_cpu_s"] for r in runs) / max(n, 1), 3),
        "server_cores": round(sum(r["server_cpu_s"] for r in runs) / seconds, 2),
        "server_cpu_ms_per_request": round(1000 * sum(r["server_cpu_s"] for r in runs) / max(n, 1), 3),
        "other_cores": round(sum(r["other_cpu_s"] for r in runs) / seconds, 2),
        "errors": sum(len(r["errors"]) for r in runs),
        "first_errors": [e for r in runs for e in r["errors"]][:3],
    }


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def others_busy(seconds: float = 2.0) -> float:
    """Cores used by processes that are neither this one nor its Ray processes, over ``seconds``."""
    busy0, mine0 = machine_busy(), time.process_time() + tree_cpu(os.getpid())
    time.sleep(seconds)
    busy1, mine1 = machine_busy(), time.process_time() + tree_cpu(os.getpid())
    return max(0.0, (busy1 - busy0) - (mine1 - mine0)) / seconds


def quiet_note(max_other: float, budget_s: float) -> str:
    """Wait (up to ``budget_s``) until other processes use fewer than ``max_other`` cores; what happened."""
    busy, waited = wait_quiet(max_other, budget_s, log=lambda _: None, measure=others_busy)
    if busy is None:
        return ""
    if busy >= max_other:
        return f" (others still busy after {budget_s:g} s)"
    return f" (quiet after {waited:.0f} s)" if waited > 3 else ""


# --- the run -------------------------------------------------------------------------------------


# name -> MLP hidden sizes. "reference": the MNIST MLP (0.6 MFLOP/row, 1.3 MB of weights: a decode
# costs microseconds). "wide": 20-4096-4096-784, 80 MB of weights: at batch 1 each decode streams all
# of them from memory (milliseconds), while a batch of rows shares one pass: where batching pays.
MODELS = {"reference": [400], "wide": [4096, 4096]}


def build_export(folder: Path, hidden: list[int]) -> Path:
    """An MLP VAE 784-hidden-20 with random weights (a few steps on synthetic data), exported to ONNX."""
    from vae_deploy.config import make_configs
    from vae_deploy.export import export
    from vae_deploy.training import train

    model_cfg, train_cfg = make_configs(
        {"arch": "mlp", "latent_dim": 20, "hidden": hidden},
        {"dataset": "synthetic", "epochs": 1, "batch_size": 64, "max_steps": 3, "out": str(folder / "run")},
    )
    result = train(model_cfg, train_cfg, progress=False, log=lambda _: None)
    return export(result.checkpoint, folder / "exported", formats=("onnx",), verify=False, log=lambda _: None).out_dir


def in_process_decode_us(export_dir: Path, rows: int, batch: int) -> dict[str, float]:
    """The engine alone, no HTTP: microseconds per call for ``rows`` rows and per row at ``batch``."""
    rt = VAERuntime(export_dir, "cpu", intra_op_threads=cpu_count())
    z1 = np.zeros((rows, *rt.latent_shape), np.float32)
    zb = np.zeros((batch, *rt.latent_shape), np.float32)

    def best(z: np.ndarray, calls: int) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                rt.decode(z)
            times.append((time.perf_counter() - t0) / calls)
        return min(times)

    one = best(z1, 20)
    calls = max(3, min(200, int(0.05 / one)))
    return {f"{rows}_row_us": round(1e6 * best(z1, calls), 1),
            f"{batch}_rows_us_per_row": round(1e6 * best(zb, max(2, calls // batch)) / batch, 2)}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# `vae-deploy serve` under load: {m['cpu']}, {m['cpus']} cores",
        "",
        f"`python benchmarks/bench_serve.py {' '.join(report['argv'])}`, {report['started']}. One replica per mode "
        f"({s['threads'] or 'all'} onnxruntime threads), {s['rows']} latent row(s) per request as `.npy`, "
        f"{s['seconds']} s x {s['rounds']} rounds per cell, modes taking turns. Dynamic batching: up to "
        f"{s['max_batch_size']} rows, {s['batch_wait_ms']} ms wait. In-process decode with onnxruntime alone "
        "(no HTTP), microseconds: "
        + "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for m, d in report["in_process"].items())
        + ".",
        "",
        "| model | clients | batching | req/s | p50 ms | p99 ms | rows/engine run | server cores "
        "| server ms CPU/req | client cores | client ms CPU/req | other cores | errors |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['model']} | {row['concurrency']} | {row['mode']} | {row['requests_per_s']:,.0f} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['rows_per_engine_run']} | {row['server_cores']} | "
            f"{row['server_cpu_ms_per_request']} | {row['client_cores']} | {row['client_cpu_ms_per_request']} | "
            f"{row['other_cores']} | {row['errors']} |"
        )
    lines += ["", "Dynamic batching vs none (req/s ratio, p50 and p99 ratios; below 1 is better for latency):", ""]
    by = {(r["model"], r["concurrency"], r["mode"]): r for r in report["results"]}
    for model in report["models"]:
        for c in s["concurrency"]:
            on, off = by.get((model, c, "dynamic")), by.get((model, c, "off"))
            if on and off and off["requests_per_s"] and off["p99_ms"]:
                lines.append(
                    f"- {model}, {c} client(s): {on['requests_per_s'] / off['requests_per_s']:.2f}x req/s, "
                    f"p50 {on['p50_ms'] / off['p50_ms']:.2f}x, p99 {on['p99_ms'] / off['p99_ms']:.2f}x"
                )
    lines += [
        "",
        "Server cores: CPU of all Ray processes (HTTP proxy, router, replicas) per second of wall time. "
        "Client cores: CPU of the load generator's threads. Other cores: everything else on the machine "
        f"(other users). Load average at start/end: {m['load_avg_start']} / {m['load_avg_end']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", type=Path, help="serve this export instead of the built-in models")
    parser.add_argument("--models", default="reference,wide", help=f"built-in models: {', '.join(MODELS)}")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rows", type=int, default=1, help="latent rows per request")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per replica (0: all cores)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S seconds for a quiet machine")
    parser.add_argument("--max-other", type=float, default=0.3, help="cores other processes may use when quiet")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = {"cpu": cpu_model(), "cpus": cpu_count(), "load_avg_start": load_avg()}

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.export_dir:
            exports = {args.export_dir.name: args.export_dir}
        else:
            names = [m.strip() for m in args.models.split(",") if m.strip()]
            print(f"building {', '.join(names)} (random weights) ...", flush=True)
            exports = {m: build_export(Path(tmp) / m, MODELS[m]) for m in names}
        in_process = {m: in_process_decode_us(d, args.rows, args.max_batch_size) for m, d in exports.items()}
        common = dict(provider="cpu", threads=args.threads, cpus_per_replica=cpu_count() / (2 * len(exports)),
                      max_ongoing_requests=max(128, 2 * args.max_batch_size))  # fmt: skip
        modes = {
            "dynamic": ServeConfig(max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, **common),
            "off": ServeConfig(max_batch_size=1, **common),
        }
        print(f"starting Ray Serve ({machine['cpu']}, {machine['cpus']} cores) ...", flush=True)
        apps = [(model, mode) for model in exports for mode in modes]
        raw: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        model0, mode0 = apps[0]
        with start(exports[model0], modes[mode0], port=0, name=f"{model0}-{mode0}", route_prefix=f"/{model0}/{mode0}",
                   quiet=True) as srv:  # fmt: skip
            for model, mode in apps[1:]:
                srv.deploy(exports[model], modes[mode], name=f"{model}-{mode}", route_prefix=f"/{model}/{mode}")
            payloads = {}
            for model, export_dir in exports.items():
                rt = VAERuntime(export_dir, "cpu")
                z = np.random.default_rng(0).standard_normal((args.rows, *rt.latent_shape)).astype(np.float32)
                payloads[model] = (npy_bytes(z), len(npy_bytes(rt.decode(z))))
            for model in exports:
                body, answer_bytes = payloads[model]
                for c in concurrency:
                    for r in range(args.rounds):
                        for mode in list(modes) if r % 2 == 0 else list(reversed(modes)):
                            waited = quiet_note(args.max_other, args.wait_quiet)
                            app = f"/{model}/{mode}"
                            run = load("127.0.0.1", srv.port, app, body, answer_bytes, c, args.seconds, args.warmup)
                            raw.setdefault((model, c, mode), []).append(run)
                            print(
                                f"  {model:>9} {c:>3} clients, batching {mode:<7} round {r + 1}: "
                                f"{len(run['latencies']) / run['seconds']:8.1f} req/s, errors {len(run['errors'])}, "
                                f"others {run['other_cpu_s'] / run['seconds']:.2f} cores" + waited,
                                flush=True,
                            )
    machine["load_avg_end"] = load_avg()
    results = [
        {"model": model, "concurrency": c, "mode": mode, **summarize(runs, args.rows)}
        for (model, c, mode), runs in raw.items()
    ]
    report = {
        "benchmark": "serve",
        "argv": sys.argv[1:] if argv is None else argv,
        "started": started,
        "machine": machine,
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "concurrency": concurrency,
            "rows": args.rows,
            "max_batch_size": args.max_batch_size,
            "batch_wait_ms": args.batch_wait_ms,
            "threads": args.threads,
        },  # fmt: skip
        "models": list(exports),
        "in_process": in_process,
        "results": results,
    }
    slug = machine_slug({"cpu": machine["cpu"], "cpus": machine["cpus"]})
    write_results(args.out / f"serve-{slug}", report, markdown(report), indent=1)
    print(markdown(report))
    print(f"wrote {args.out / f'serve-{slug}.json'} and .md")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

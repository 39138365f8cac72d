"""Training on 1 vs 2 processes (torchrun + DDP, gloo on CPU): time per epoch and final -ELBO.

    python benchmarks/bench_ddp.py [--data-root ../shared/data] [--epochs 5] [--repeats 1] [--wait-quiet 300]

Every variant is the real command, ``vae-deploy train`` in a fresh process, with the same model
(the reference MLP 784-400-20), data, global batch (128), epochs, seed and learning rate:

- ``1 process x 1 thread``   (OMP_NUM_THREADS=1)
- ``1 process x N threads``  (torch's default: one thread per core)
- ``N processes x 1 thread`` (``--nproc N``: each rank takes 128/N images per step)

Time per epoch is what the run records itself (``seconds`` of each metrics row: the batch loop,
without validation and checkpoint writes); the wall time of the whole command (process start,
data loading, rendezvous, validation, checkpoints) is reported beside it. Final -ELBO is the last
epoch's validation ``val_nelbo`` (nats per image). Variants alternate over repeats so machine
noise hits each; the cores other processes used during each run are recorded (``other_cores``),
since on a shared 2-core machine they matter more than anything measured here.
Writes ``OUT/ddp-<machine>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vae_deploy.bench.machine import cpu_counters, machine_info, machine_slug, wait_quiet
from vae_deploy.bench.report import write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_variant(name: str, nproc: int, threads: int | None, args: list[str], log=print) -> dict[str, Any]:
    """One training run as a fresh ``vae-deploy train`` process; its rows, wall time and the load."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "vae_deploy.cli", "train", *args, "--out", str(out), "--no-progress"]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        start, cpu0 = cpu_counters(), _children_cpu()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        end, cpu1 = cpu_counters(), _children_cpu()
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    other = None
    if start is not None and end is not None:  # machine busy time minus what this run used
        other = round(max(0.0, (end[1] - start[1]) - (cpu1 - cpu0)) / (end[0] - start[0]), 2)
    seconds = [r["seconds"] for r in rows]
    result = {
        "variant": name,
        "processes": nproc,
        "threads_per_process": threads,
        "epoch_seconds": seconds,
        "median_epoch_seconds": statistics.median(seconds),
        "images_per_s": [r["images_per_s"] for r in rows],
        "val_nelbo": [r["val_nelbo"] for r in rows],
        "final_val_nelbo": rows[-1]["val_nelbo"],
        "wall_seconds": wall,
        "other_cores": other,
    }
    log(
        f"{name}: {result['median_epoch_seconds']:.2f} s/epoch (median), wall {wall:.1f} s, "
        f"final -ELBO {result['final_val_nelbo']:.2f}, other processes used {other} cores"
    )
    return result


def run(
    data_root: str | None,
    epochs: int,
    repeats: int,
    batch_size: int,
    nproc: int,
    quiet: tuple[float, float] = (0.5, 0.0),
    log=print,
) -> dict[str, Any]:
    """Each variant ``repeats`` times, alternating; ``quiet = (max other cores, seconds)`` waits for
    a quiet machine before each run."""
    machine = machine_info()
    cores = machine["cpus"]
    args = ["--dataset", "mnist", "--epochs", str(epochs), "--batch-size", str(batch_size), "--seed", "0"]
    args += ["--latent-dim", "20", "--hidden", "400", "--lr", "1e-3", "--device", "cpu"]
    if data_root:
        args += ["--data-root", data_root]
    variants = [
        ("1 process x 1 thread", 1, 1),
        (f"1 process x {cores} threads", 1, None),
        (f"{nproc} processes x 1 thread", nproc, 1),
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    for i in range(repeats):
        for name, n, threads in variants:
            wait_quiet(*quiet, log=log)
            log(f"repeat {i + 1}/{repeats}: {name} ...")
            runs[name].append(run_variant(name, n, threads, args, log))
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "median_epoch_seconds": statistics.median(r["median_epoch_seconds"] for r in results),
            "median_wall_seconds": statistics.median(r["wall_seconds"] for r in results),
            "final_val_nelbo": [r["final_val_nelbo"] for r in results],
            "other_cores": [r["other_cores"] for r in results],
        }
    one = summary["1 process x 1 thread"]["final_val_nelbo"][0]
    many = summary[f"{nproc} processes x 1 thread"]["final_val_nelbo"][0]
    machine["load_avg_end"] = os.getloadavg()
    return {
        "what": "time per epoch and final validation -ELBO: 1 process vs several (torchrun + DDP, gloo)",
        "machine": machine,
        "config": {"model": "mlp 784-400-20", "data": "mnist", "epochs": epochs, "batch_size": batch_size},
        "runs": runs,
        "summary": summary,
        "nelbo_relative_difference": abs(many - one) / one,
    }


def render(report: dict[str, Any]) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        f"# Training on 1 vs several processes: {m['cpu']} ({m['cpus']} cpus)",
        "",
        f"`benchmarks/bench_ddp.py`, {m['started']}: {cfg['model']} on {cfg['data']}, global batch "
        f"{cfg['batch_size']}, {cfg['epochs']} epochs, seed 0, torch {m['torch']}, gloo on CPU. Load average "
        f"{m['load_avg_start']} at the start, {[round(v, 2) for v in m['load_avg_end']]} at the end.",
        "",
        "| variant | run | s/epoch (median of epochs) | wall s (whole command) | final val -ELBO (nats) "
        "| other processes (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, results in report["runs"].items():
        for i, r in enumerate(results, 1):
            lines.append(
                f"| {name} | {i} | {r['median_epoch_seconds']:.2f} | {r['wall_seconds']:.1f} | "
                f"{r['final_val_nelbo']:.2f} | {r['other_cores']} |"
            )
    lines += [
        "",
        f"Final -ELBO, several processes vs one: {100 * report['nelbo_relative_difference']:.2f}% apart "
        "(same global batch and epochs; the ranks draw other reparameterization noise).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", help="MNIST root (default $VAE_DEPLOY_DATA)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="Wait up to S seconds for a quiet machine")
    ap.add_argument("--max-other", type=float, default=0.5, help="Quiet: other processes use fewer cores")
    ap.add_argument("--out", default=str(HERE / "results"), help="Results folder")
    ap.add_argument("--render", metavar="JSON", help="Only rewrite the .md of an earlier run's .json")
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    quiet = (args.max_other, args.wait_quiet)
    report = run(args.data_root, args.epochs, args.repeats, args.batch_size, args.nproc, quiet)
    stem = Path(args.out) / f"ddp-{machine_slug(report['machine'])}"
    write_results(stem, report, render(report))
    print(render(report))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()

"""Shard writing on Ray Data vs on one process, same cores, same shards: steady-state samples/s.

    python benchmarks/bench_shards.py                       # n = 1,000,000, 2 rounds, ~4 min on 2 cores
    python benchmarks/bench_shards.py --n 200000 --rounds 1 # smoke run
    python benchmarks/bench_shards.py --export-dir exported # an existing export instead of a fresh one

Writes ``benchmarks/results/shards-<machine>.json`` and ``.md``.

What runs: the reference MLP decoder (20-400-784; random-ish weights from a few training steps on
synthetic data unless ``--export-dir``: throughput does not depend on the weights) writes n samples
(seed 0, provider cpu, default shard size) three ways per round, taking turns so machine noise hits
them alike: ``local`` (``write_shards`` with its defaults, what ``vae-deploy sample --out-dir``
does), ``local-b4096`` (the same with batch 4096) and ``ray`` (``write_shards_ray`` with its
defaults on a local Ray over all this machine's CPUs: one single-thread actor per CPU, batch
4096). Every run's shard hashes must equal the first run's. The Ray cluster is started once,
before the rounds, and its start is reported apart (``cluster_start_s``); each Ray run still starts
its actors, which the end-to-end figure includes.

Figures per run: ``steady`` = samples/s between the moment 10% of the rows were written and the
end (actor start and warm-up excluded), ``end_to_end`` = n / the whole write, and the peak memory
of this process and all its descendants (the Ray processes: raylet, GCS, workers), as the sum of
their proportional set sizes (PSS, so shared memory is counted once), sampled every 0.2 s.
``cpu_other_cores``: cores that processes outside this tree used meanwhile (a quiet run is ~0).
The target (issue 13): Ray's steady throughput at least 80% of the better local one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vae_deploy import bench
from vae_deploy.ray_sampling import RayOptions, import_ray, write_shards_ray
from vae_deploy.shards import read_index, write_shards

HERE = Path(__file__).resolve().parent
TARGET = 0.8
TICK = 0.2


# --- process-tree memory and CPU ---------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _pss_and_ticks(pid: int) -> tuple[int, int] | None:
    try:
        pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return pss, int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None  # gone meanwhile


class TreeMonitor:
    """Samples the PSS (peak) and CPU ticks of this process (``tree``: and its descendants), and
    the machine's busy time, so the CPU others took meanwhile can be told apart."""

    def __init__(self, tree: bool) -> None:
        import os

        self.root, self.tree, self.peak, self.first, self.last = os.getpid(), tree, 0, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.tick_s = 1 / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        total = 0
        for pid in _tree(self.root) if self.tree else [self.root]:
            got = _pss_and_ticks(pid)
            if got is None:
                continue
            pss, ticks = got
            total += pss
            self.first.setdefault(pid, ticks)
            self.last[pid] = ticks
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(TICK)

    def __enter__(self) -> TreeMonitor:
        self.machine_start = bench.cpu_counters()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        end = bench.cpu_counters()
        ours = sum(self.last[p] - self.first[p] for p in self.last) * self.tick_s
        wall = end[0] - self.machine_start[0]
        self.other_cores = round(max(0.0, (end[1] - self.machine_start[1]) - ours) / wall, 3) if wall > 0 else None
        self.our_cores = round(ours / wall, 3) if wall > 0 else None


def wait_quiet(max_other: float, seconds: float) -> float:
    """Wait (up to ``seconds``) until other processes use less than ``max_other`` cores; their use."""
    end = time.time() + seconds
    while True:
        start = bench.cpu_counters()
        time.sleep(3)
        busy = (bench.other_load(start) or {}).get("other_cores", 0.0)
        if busy < max_other or time.time() >= end:
            return busy
        print(f"other processes use {busy:.2f} cores: waiting for a quiet machine ...", flush=True)


# --- runs -------------------------------------------------------------------------------------------


def _timed(fn, n: int, tree: bool) -> tuple[Any, dict[str, Any]]:
    marks: list[tuple[float, int]] = []
    done = 0

    def progress(k: int) -> None:
        nonlocal done
        done += k
        marks.append((time.perf_counter(), done))

    with TreeMonitor(tree) as mon:
        began = time.perf_counter()
        result = fn(progress)
        ended = time.perf_counter()
    t10, rows10 = next((t, r) for t, r in marks if r >= 0.1 * n)
    steady = (n - rows10) / (ended - t10) if ended > t10 else None
    figures = {
        "steady_samples_per_s": round(steady) if steady else None,
        "end_to_end_samples_per_s": round(n / (ended - began)),
        "seconds": round(ended - began, 2),
        "first_rows_after_s": round(marks[0][0] - began, 2) if marks else None,
        "peak_memory_mib": round(mon.peak / 2**20, 1),
        "cpu_our_cores": mon.our_cores,
        "cpu_other_cores": mon.other_cores,
    }
    return result, figures


def make_export(work: Path) -> Path:
    from vae_deploy.config import make_configs
    from vae_deploy.export import export
    from vae_deploy.training import train

    model_cfg, train_cfg = make_configs(
        {"arch": "mlp", "latent_dim": 20, "hidden": [400]},
        {"dataset": "synthetic", "epochs": 1, "batch_size": 64, "max_steps": 20, "out": str(work / "run")},
    )
    result = train(model_cfg, train_cfg, progress=False, log=lambda _: None)
    return export(result.checkpoint, work / "exported", formats=("onnx",), verify=False, log=lambda _: None).out_dir


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["summary"]
    lines = [
        f"# Shards: Ray Data vs one process ({m['cpu']}, {m['cpus']} CPUs)",
        "",
        f"n = {report['n']:,} samples of [1, 28, 28] float32 (MLP 20-400-784 decoder, provider cpu), "
        f"{report['shards']} shards of {report['shard_rows']:,} rows, every run's shards identical "
        f"({'yes' if report['identical'] else 'NO'}). `python benchmarks/bench_shards.py"
        f"{' --n ' + str(report['n']) if report['n'] != 1_000_000 else ''}`, {m['started']}.",
        "",
        f"Ray local cluster start (excluded below): {report['cluster_start_s']:.1f} s; Ray plan: {report['ray_plan']}.",
        "",
        "| round | run | steady samples/s | end-to-end samples/s | s | first rows after s | peak memory MiB "
        "| our cores | other cores |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['round']} | {r['run']} | {r['steady_samples_per_s']:,} | {r['end_to_end_samples_per_s']:,} "
            f"| {r['seconds']} | {r['first_rows_after_s']} | {r['peak_memory_mib']} | {r['cpu_our_cores']} "
            f"| {r['cpu_other_cores']} |"
        )
    lines += [
        "",
        f"Median steady samples/s: local {s['local']:,}, local-b4096 {s['local-b4096']:,}, ray {s['ray']:,}.",
        f"**Ray / best local = {s['ratio']:.2f}** (target >= {TARGET:.2f}: {'met' if s['met'] else 'MISSED'}). "
        f"Ray end-to-end including actor start: {s['ray_end_to_end']:,} samples/s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--export-dir")
    parser.add_argument("--work", help="folder for the shards (default: a temp folder; ~2 x n x 3 KB)")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--wait-quiet", type=float, default=120, help="wait up to S s for a quiet machine per run")
    parser.add_argument("--max-other", type=float, default=0.3, help="cores others may use for 'quiet'")
    args = parser.parse_args(argv)

    machine = bench.machine_info()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-shards-"))
    export = Path(args.export_dir) if args.export_dir else make_export(work)
    ray = import_ray()
    began = time.perf_counter()
    ray.init(address="local", num_cpus=machine["cpus"], include_dashboard=False, log_to_driver=False)
    cluster_start = time.perf_counter() - began
    runs, hashes, identical, plan = [], None, True, None
    try:
        for round_ in range(1, args.rounds + 1):
            for name in ("local", "ray", "local-b4096"):
                out = work / f"shards-{name}"
                shutil.rmtree(out, ignore_errors=True)
                if name == "ray":

                    def fn(progress, out=out):
                        return write_shards_ray(
                            export, args.n, out, seed=0, provider="cpu", options=RayOptions(), progress=progress
                        )
                else:
                    batch = 4096 if name == "local-b4096" else None

                    def fn(progress, out=out, batch=batch):
                        return write_shards(
                            export, args.n, out, seed=0, provider="cpu", batch_size=batch, progress=progress
                        )

                wait_quiet(args.max_other, args.wait_quiet)
                result, figures = _timed(fn, args.n, tree=name == "ray")
                if name == "ray":
                    keys = ("workers", "actor_num_cpus", "threads_per_worker", "batch_size")
                    plan = {k: result.details[k] for k in keys}
                index = read_index(out)
                got = [e.sha256 for e in index.shards]
                hashes = hashes or got
                identical &= got == hashes
                runs.append({"round": round_, "run": name, **figures})
                print(json.dumps(runs[-1]), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    def median(name: str, key: str = "steady_samples_per_s") -> int:
        return round(statistics.median(r[key] for r in runs if r["run"] == name))

    summary = {name: median(name) for name in ("local", "local-b4096", "ray")}
    summary["ratio"] = summary["ray"] / max(summary["local"], summary["local-b4096"])
    summary["met"] = summary["ratio"] >= TARGET
    summary["ray_end_to_end"] = median("ray", "end_to_end_samples_per_s")
    report = {
        "benchmark": "shards",
        "n": args.n,
        "shard_rows": index.spec.shard_rows,
        "shards": len(index.shards),
        "identical": identical,
        "cluster_start_s": round(cluster_start, 2),
        "ray_plan": plan,
        "machine": machine,
        "runs": runs,
        "summary": summary,
        "target": TARGET,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"shards-{bench.machine_slug(machine)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

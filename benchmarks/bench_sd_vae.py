"""The full-size Stable Diffusion 1.x VAE through vae-deploy: export it, then decode 512x512.

    python benchmarks/bench_sd_vae.py [--rounds 3] [--out benchmarks/results]

The SD 1.x ``AutoencoderKL`` architecture is built from its published config (written out below;
random weights, seeded: no download) and saved as a diffusers folder, which is exported as a user
would (``export_diffusers``: encoder and decoder ONNX, dynamic batch/height/width, verified against
diffusers at two sizes, batch 1 and 3, and just beyond the batch torch.export proved). Export runs
in a child process, so its peak RSS is its own. Then, in another child process, one 64x64 latent
is decoded to a 512x512 image by ``VAERuntime`` (onnxruntime CPU) and by eager diffusers
``vae.decode``, interleaved (one discarded warm-up each, then ``--rounds`` alternating runs, median),
with their largest difference. Writes ``<out>/sd-vae-<machine>.json`` and ``.md``. Takes minutes
on 2 cores; not part of the tests.
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

# The published SD 1.x VAE config (runwayml/stable-diffusion-v1-5, vae/config.json), written out.
SD1_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
LATENT = (1, 4, 64, 64)  # one SD latent: a 512x512 image


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step_build(folder: Path) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD1_VAE_CONFIG)
    vae.save_pretrained(str(folder))
    count = {n: sum(p.numel() for p in getattr(vae, n).parameters()) for n in ("encoder", "decoder")}
    return {"parameters": count, "parameters_total": sum(p.numel() for p in vae.parameters())}


def step_export(folder: Path, out: Path) -> dict[str, Any]:
    from vae_deploy.export_modules import export_diffusers

    lines: list[str] = []
    t0 = time.perf_counter()
    result = export_diffusers(folder, out, log=lines.append)
    seconds = time.perf_counter() - t0
    table = next((line for line in lines if line.startswith("graph ")), None)
    table = "\n".join(lines[lines.index(table) :]) if table else ""
    return {
        "seconds_total": round(seconds, 1),
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        "files_mb": {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(out.glob("*.onnx"))},
        "verify_table": table,
        "verification": result.manifest["verification"],
        "tolerances": {g: {f: e["tolerance"] for f, e in fs.items()} for g, fs in result.manifest["graphs"].items()},
        "tolerance_basis": result.manifest["export"]["tolerance_basis"],
        "proved_ranges": result.manifest["export"].get("proved_ranges", {}),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def step_decode(folder: Path, out: Path, rounds: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from vae_deploy.runtime import VAERuntime

    z = np.random.default_rng(0).standard_normal(LATENT, dtype=np.float32)
    rt = VAERuntime(out, "cpu")
    vae = AutoencoderKL.from_pretrained(str(folder)).eval()
    zt = torch.from_numpy(z)

    def ort_run() -> np.ndarray:
        return rt.decode(z)

    def eager_run() -> np.ndarray:
        with torch.inference_mode():
            return vae.decode(zt).sample.numpy()

    times: dict[str, list[float]] = {"onnxruntime": [], "eager": []}
    outputs = {}
    for i in range(rounds + 1):  # round 0 is the warm-up, discarded
        for name, fn in (("onnxruntime", ort_run), ("eager", eager_run)):
            t0 = time.perf_counter()
            outputs[name] = fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "latent": list(LATENT),
        "image": list(outputs["onnxruntime"].shape),
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "eager_over_onnxruntime": round(med["eager"] / med["onnxruntime"], 2),
        "max_abs_difference": float(np.abs(outputs["onnxruntime"] - outputs["eager"]).max()),
        "torch_threads": torch.get_num_threads(),
        "ort_settings": rt.engine("decoder").settings_for(1),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def child(step: str, *args: str) -> dict[str, Any]:
    """Run one step in a fresh process (its own peak RSS); its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--step", step, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(data: dict[str, Any]) -> str:
    m, e, d = data["machine"], data["export"], data["decode"]
    files = ", ".join(f"{k} {v} MB" for k, v in e["files_mb"].items())
    med = d["median_s"]
    return "\n".join(
        [
            f"# Full-size SD 1.x VAE on {m['cpu']} x{m['cpus']}",
            "",
            f"`python benchmarks/bench_sd_vae.py` ({data['date']}; torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
            f"diffusers {m['diffusers']}). Random weights from the published SD 1.x config: "
            f"{data['build']['parameters_total'] / 1e6:.1f} M parameters (decoder "
            f"{data['build']['parameters']['decoder'] / 1e6:.1f} M).",
            "",
            "| | |",
            "| --- | --- |",
            f"| export (encoder + decoder ONNX, verified) | {e['seconds_total']} s: "
            + ", ".join(f"{k} {v} s" for k, v in e["seconds"].items())
            + " |",
            f"| files | {files} |",
            f"| export peak RSS | {e['peak_rss_mb']} MB |",
            f"| decode 1x4x64x64 -> 512x512, onnxruntime (VAERuntime, CPU) | {med['onnxruntime']} s (median of "
            f"{len(d['seconds']['onnxruntime'])}: {d['seconds']['onnxruntime']}) |",
            f"| decode, eager diffusers `vae.decode` | {med['eager']} s ({d['seconds']['eager']}) |",
            f"| eager / onnxruntime | **{d['eager_over_onnxruntime']}x** |",
            f"| max abs difference at 512x512 | {d['max_abs_difference']:.2e} |",
            f"| decode process peak RSS (both engines) | {d['peak_rss_mb']} MB |",
            f"| load average start / end | {m['load_avg_start']} / {data['load_avg_end']} |",
            "",
            "Verification at export (parity per size; tolerances calibrated from fp32-vs-fp64 eager noise: "
            f"{e['tolerance_basis'].get('fp64_error')}):",
            "",
            "```",
            e["verify_table"],
            "```",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=("build", "export", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="timed decodes per engine (after one warm-up)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    args = parser.parse_args(argv)
    if args.step:  # a child process: one step, its result as the last line of stdout
        folder, out = Path(args.folder), Path(args.export_dir)
        steps = {
            "build": lambda: step_build(folder),
            "export": lambda: step_export(folder, out),
            "decode": lambda: step_decode(folder, out, args.rounds),
        }
        result = steps[args.step]()
        print(json.dumps(result))
        return
    from vae_deploy.bench import machine_info, machine_slug, write_results
    from vae_deploy.bench.machine import load_avg

    machine = machine_info()
    import diffusers

    machine["diffusers"] = diffusers.__version__
    with tempfile.TemporaryDirectory(prefix="sd-vae-") as tmp:
        folder, out = Path(tmp) / "sd-vae", Path(tmp) / "exported"
        paths = ["--folder", str(folder), "--export-dir", str(out), "--rounds", str(args.rounds)]
        print("building the SD 1.x VAE (random weights) ...", flush=True)
        build = child("build", *paths)
        print("exporting (encoder + decoder, verified) ...", flush=True)
        exported = child("export", *paths)
        took = f"{exported['seconds_total']} s, peak RSS {exported['peak_rss_mb']} MB"
        print(f"  {took}; decoding 512x512 ...", flush=True)
        decode = child("decode", *paths)
    data = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "config": SD1_VAE_CONFIG,
        "build": build,
        "export": exported,
        "decode": decode,
        "load_avg_end": load_avg(),
        "command": "python benchmarks/bench_sd_vae.py " + " ".join(argv or sys.argv[1:]),
    }
    stem = Path(args.out) / f"sd-vae-{machine_slug(machine)}"
    write_results(stem, data, render(data))
    print(render(data))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

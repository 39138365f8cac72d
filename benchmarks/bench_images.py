"""Two measured comparisons on MNIST for the image-folder and resconv work (issue 11).

    python benchmarks/bench_images.py --data-root ../shared/data [--epochs 5] [--out benchmarks/results/images_mnist]

1. Architecture: the residual conv VAE (``resconv``, channels 16,48,96, one residual block per
   level, SiLU, latent 20: 619,737 parameters) against the 784-400-20 MLP (652,824 parameters,
   the ``mlp400_beta`` recipe), same data, seed, optimiser (Adam lr 1e-3), batch 128 and epochs:
   validation -ELBO (Bernoulli, nats per image) after every epoch.
2. Data path: the same MNIST images written as PNG files and trained through ``--dataset folder``
   against the built-in ``mnist`` dataset, the MLP on both. ``flat`` names the files in their IDX
   order (00000.png ...), so the folder's split rule (one fixed permutation, first 90% train)
   picks the same 9,000 / 1,000 images as the built-in t10k fallback; ``by-label`` puts them in
   digit subfolders (torchvision's ImageFolder layout), which reorders the files and so gives an
   equally random but different split.

All runs happen in one process, one after the other, on the same machine state; the JSON and the
Markdown table go to ``--out``.json/.md with the CPU model, torch version and load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vae_deploy.bench.report import write_results
from vae_deploy.config import make_configs
from vae_deploy.data import read_idx, resolve_data_root
from vae_deploy.model import VAE
from vae_deploy.training import train

MLP = {"arch": "mlp", "hidden": [400], "latent_dim": 20, "activation": "relu"}
CONV = {"arch": "resconv", "conv_channels": [16, 48, 96], "res_blocks": 1, "latent_dim": 20, "activation": "silu"}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = fields.get("Model name", "").strip()
        return f"{name} (family {fields.get('CPU family', '?').strip()}, model {fields.get('Model', '?').strip()})"
    except (OSError, subprocess.CalledProcessError, ValueError):
        return platform.processor() or platform.machine()


def write_pngs(images: Any, labels: Any, folder: Path, by_label: bool) -> Path:
    """MNIST's images as 8-bit gray PNG files: flat (names in IDX order) or in digit subfolders."""
    if folder.is_dir() and len(list(folder.rglob("*.png"))) == len(images):
        return folder
    for i, (image, label) in enumerate(zip(images, labels)):
        target = folder / str(int(label)) if by_label else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:05d}.png")
    return folder


def run(name: str, model: dict, data: dict, epochs: int, work: Path) -> dict[str, Any]:
    train_raw = {"loss": "bce", "lr": 1e-3, "batch_size": 128, "epochs": epochs, "seed": 0, "device": "cpu", **data}
    model_cfg, cfg = make_configs({**model, "image_shape": [1, 28, 28]}, {**train_raw, "out": str(work / name)})
    t0 = time.perf_counter()
    result = train(
        model_cfg, cfg, overwrite=True, progress=False, log=lambda line: print(f"[{name}] {line}", flush=True)
    )
    return {
        "name": name,
        "model": model,
        "dataset": data["dataset"],
        "parameters": sum(p.numel() for p in VAE(model_cfg).parameters()),
        "data_note": result.data_note,
        "val_nelbo": [row["val_nelbo"] for row in result.history],
        "train_loss": [row["train_loss"] for row in result.history],
        "seconds": time.perf_counter() - t0,
    }


def render(report: dict[str, Any]) -> str:
    runs = {r["name"]: r for r in report["runs"]}
    e = report["epochs"]
    lines = [
        "# MNIST: resconv vs MLP, and a PNG folder vs the built-in dataset",
        "",
        f"`{report['command']}`  ",
        f"CPU: {report['cpu']}, {report['threads']} torch threads, torch {report['torch']}; "
        f"load average {report['load_before']} before, {report['load_after']} after (a shared machine: "
        "the -ELBO figures do not depend on it, the seconds do).  ",
        f"Data: {runs['mlp-mnist']['data_note']}. Same seed (0), Adam lr 1e-3, batch 128, {e} epochs, BCE + KL.",
        "",
        "Validation -ELBO (nats per image, lower is better) after each epoch:",
        "",
        "| run | data | parameters | " + " | ".join(f"epoch {i + 1}" for i in range(e)) + " | seconds |",
        "| --- | --- | --- | " + " | ".join("---" for _ in range(e)) + " | --- |",
    ]
    for r in report["runs"]:
        cells = " | ".join(f"{v:.2f}" for v in r["val_nelbo"])
        lines.append(f"| {r['name']} | {r['dataset']} | {r['parameters']:,} | {cells} | {r['seconds']:.0f} |")
    c = report["comparisons"]
    lines += [
        "",
        f"- resconv vs MLP after {e} epochs: {c['conv_nelbo']:.2f} vs {c['mlp_nelbo']:.2f} nats "
        f"({c['conv_vs_mlp_pct']:+.2f}%); resconv lower: {c['conv_lower']}.",
        f"- PNG folder (flat names) vs built-in mnist: {c['folder_flat_nelbo']:.2f} vs {c['mlp_nelbo']:.2f} "
        f"({c['folder_flat_vs_builtin_pct']:+.3f}%; within 1%: {c['folder_within_1pct']}). Same pixels, same split, "
        "same batches: the runs are the same computation.",
        f"- PNG folder in digit subfolders vs built-in: {c['folder_by_label_nelbo']:.2f} "
        f"({c['folder_by_label_vs_builtin_pct']:+.2f}%): a different (equally random) 9,000 / 1,000 split.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="MNIST root (default: $VAE_DEPLOY_DATA)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/images_mnist", help="writes OUT.json and OUT.md")
    parser.add_argument("--work", help="folder for the PNGs, runs and cache (default: a temporary one)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two threads wait on each other; "
        "the -ELBO figures do not depend on it)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = resolve_data_root(args.data_root)
    if root is None:
        raise SystemExit("pass --data-root (a torchvision-style MNIST root) or set VAE_DEPLOY_DATA")
    raw = root / "MNIST" / "raw"
    images, labels = read_idx(raw / "t10k-images-idx3-ubyte.gz"), read_idx(raw / "t10k-labels-idx1-ubyte.gz")
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        work = Path(args.work or tmp)
        os.environ["VAE_DEPLOY_CACHE"] = str(work / "cache")
        flat = write_pngs(images, labels, work / "png-flat", by_label=False)
        by_label = write_pngs(images, labels, work / "png-by-label", by_label=True)
        load_before = os.getloadavg()
        runs = [
            run("mlp-mnist", MLP, {"dataset": "mnist", "data_root": str(root)}, args.epochs, work),
            run("resconv-mnist", CONV, {"dataset": "mnist", "data_root": str(root)}, args.epochs, work),
            run("mlp-folder-flat", MLP, {"dataset": "folder", "data_root": str(flat)}, args.epochs, work),
            run("mlp-folder-by-label", MLP, {"dataset": "folder", "data_root": str(by_label)}, args.epochs, work),
        ]
    by = {r["name"]: r["val_nelbo"][-1] for r in runs}

    def pct(a: float, b: float) -> float:
        return 100.0 * (a - b) / b

    report = {
        "command": f"python benchmarks/bench_images.py --data-root {args.data_root or root} --epochs {args.epochs} "
        f"--threads {args.threads}",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_before": [round(v, 1) for v in load_before],
        "load_after": [round(v, 1) for v in os.getloadavg()],
        "epochs": args.epochs,
        "runs": runs,
        "comparisons": {
            "mlp_nelbo": by["mlp-mnist"],
            "conv_nelbo": by["resconv-mnist"],
            "conv_vs_mlp_pct": pct(by["resconv-mnist"], by["mlp-mnist"]),
            "conv_lower": by["resconv-mnist"] < by["mlp-mnist"],
            "folder_flat_nelbo": by["mlp-folder-flat"],
            "folder_flat_vs_builtin_pct": pct(by["mlp-folder-flat"], by["mlp-mnist"]),
            "folder_within_1pct": abs(pct(by["mlp-folder-flat"], by["mlp-mnist"])) <= 1.0,
            "folder_by_label_nelbo": by["mlp-folder-by-label"],
            "folder_by_label_vs_builtin_pct": pct(by["mlp-folder-by-label"], by["mlp-mnist"]),
        },
    }
    write_results(Path(args.out).with_suffix(""), report, render(report))
    print(render(report))


if __name__ == "__main__":
    main()

"""Training throughput (images/s) of ``vae_deploy.training.train`` against a plain reference loop.

    python benchmarks/bench_train.py [--data-root ../shared/data] [--epochs 1] [--repeats 5] [--json FILE]

Same model config and initial weights (seeded), same data tensors, same batch size and optimiser
(Adam), same device. Ours is the real ``train()`` call (fused reparameterize + KL, deferred Ctrl-C,
NaN check, progress bookkeeping, checkpoint and validation between epochs); its images/s is the one
it reports itself: images seen / seconds of the batch loop, so checkpoint writes and validation
between epochs are excluded. The reference is the textbook loop with the unfused formula, timed
the same way. Runs alternate (ours, reference, ours, ...) after one discarded warm-up run each, so
machine noise hits both; the figure is the median over repeats. A ratio below 1 means our loop
costs something per step that the plain loop does not, and this benchmark is where it shows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from vae_deploy.config import ModelConfig, TrainConfig
from vae_deploy.data import Splits, load_splits, resolve_data_root
from vae_deploy.files import atomic_write_text
from vae_deploy.model import VAE
from vae_deploy.training import build_optimizer, train


def ours(model_cfg: ModelConfig, cfg: TrainConfig, splits: Splits) -> float:
    """images/s of the library's training loop, as it reports it (batch loop only)."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        cfg = TrainConfig(**{**cfg.__dict__, "out": out})
        result = train(model_cfg, cfg, progress=False, log=lambda _: None, splits=splits)
    seen = sum(r["images_per_s"] * r["seconds"] for r in result.history)
    return seen / sum(r["seconds"] for r in result.history)


def reference(model_cfg: ModelConfig, cfg: TrainConfig, splits: Splits) -> float:
    """images/s of a minimal loop: encode, z = mu + std * eps, decode, BCE + KL, Adam step."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = VAE(model_cfg)
    model.train()
    opt = build_optimizer(model, cfg)
    x = splits.train_x
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    seen, seconds = 0, 0.0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).split(cfg.batch_size)
        t0 = time.perf_counter()
        for idx in order:
            xb = x[idx]
            mu, logvar = model.encoder(xb)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
            logits = model.decoder.logits(z)
            kl = 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar)
            loss = (F.binary_cross_entropy_with_logits(logits, xb, reduction="sum") + kl) / len(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(xb)
        seconds += time.perf_counter() - t0
    return seen / seconds


def run(
    data_root: str | None = None,
    epochs: int = 1,
    repeats: int = 5,
    batch_size: int = 128,
    model_cfg: ModelConfig | None = None,
    log=print,
) -> dict[str, Any]:
    """Interleaved runs of both loops; returns medians, all runs and the ratio ours / reference."""
    model_cfg = model_cfg or ModelConfig(arch="mlp", latent_dim=20, hidden=(400,))
    root = resolve_data_root(data_root)
    dataset = "mnist" if root is not None and (root / "MNIST" / "raw").is_dir() else "synthetic"
    splits = load_splits(dataset, root)
    cfg = TrainConfig(dataset=dataset, epochs=epochs, batch_size=batch_size, lr=1e-3, device="cpu")
    runs: dict[str, list[float]] = {"ours": [], "reference": []}
    loops = {"ours": ours, "reference": reference}
    for fn in loops.values():  # warm-up: allocator, kernels, page faults
        fn(model_cfg, cfg, splits)
    for i in range(repeats):
        for name, fn in loops.items():
            runs[name].append(fn(model_cfg, cfg, splits))
        last = {k: f"{v[-1]:,.0f}" for k, v in runs.items()}
        log(f"repeat {i + 1}/{repeats}: ours {last['ours']} img/s, reference {last['reference']} img/s")
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "what": "training images/s: vae_deploy.training.train vs a plain reference loop (batch loop only)",
        "model_config": {
            "arch": model_cfg.arch,
            "latent_dim": model_cfg.latent_dim,
            "hidden": list(model_cfg.hidden),
        },
        "data": splits.note,
        "train_images": len(splits.train_x),
        "epochs": epochs,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "runs_images_per_s": runs,
        "median_images_per_s": med,
        "ratio_ours_vs_reference": med["ours"] / med["reference"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", help="MNIST root (default $VAE_DEPLOY_DATA; synthetic data without one)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    report = run(args.data_root, args.epochs, args.repeats, args.batch_size)
    m = report["median_images_per_s"]
    print(f"{report['data']}; batch {args.batch_size}, {report['torch_threads']} torch threads")
    print(
        f"ours {m['ours']:,.0f} img/s, reference {m['reference']:,.0f} img/s: "
        f"ratio x{report['ratio_ours_vs_reference']:.3f}"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

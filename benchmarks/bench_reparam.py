"""Fused vs unfused reparameterize + KL: forward+backward time and autograd memory at a large batch.

    python benchmarks/bench_reparam.py [--batch 65536] [--latent 64] [--device cpu|cuda] [--json FILE]

Memory is the bytes autograd keeps alive between forward and backward (counted exactly with
saved-tensor hooks), plus the CUDA allocator's peak when run on a GPU. Time is the median of
repeated forward+backward passes (CUDA synchronised).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from vae_deploy.model import reparameterize_kl, reparameterize_kl_reference

IMPLS = {"fused": reparameterize_kl, "unfused": reparameterize_kl_reference}


def saved_bytes(fn, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> int:
    """Bytes of tensors autograd saves for backward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, kl = fn(mu, logvar, eps)
    del z, kl
    return sum(seen.values())


def time_fwd_bwd(fn, mu, logvar, eps, repeats: int) -> list[float]:
    gz, gk = torch.ones_like(mu), torch.ones(mu.shape[0], device=mu.device)
    times = []
    for i in range(repeats + 3):
        if mu.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        z, kl = fn(mu, logvar, eps)
        torch.autograd.backward((z, kl), (gz, gk))
        if mu.is_cuda:
            torch.cuda.synchronize()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
        mu.grad = logvar.grad = None
    return times


def cuda_peak(fn, mu, logvar, eps) -> int | None:
    if not mu.is_cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    z, kl = fn(mu, logvar, eps)
    torch.autograd.backward((z, kl), (torch.ones_like(z), torch.ones_like(kl)))
    torch.cuda.synchronize()
    mu.grad = logvar.grad = None
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.batch, args.latent)
    mu = torch.randn(shape, generator=g, device=dev).requires_grad_()
    logvar = (0.1 * torch.randn(shape, generator=g, device=dev)).requires_grad_()
    eps = torch.randn(shape, generator=g, device=dev)
    results = {}
    # interleave the two implementations so machine noise hits both alike
    times: dict[str, list[float]] = {k: [] for k in IMPLS}
    for _ in range(3):
        for name, fn in IMPLS.items():
            times[name] += time_fwd_bwd(fn, mu, logvar, eps, args.repeats // 3)
    for name, fn in IMPLS.items():
        results[name] = {
            "median_ms": statistics.median(times[name]) * 1e3,
            "saved_bytes": saved_bytes(fn, mu, logvar, eps),
            "cuda_peak_bytes": cuda_peak(fn, mu, logvar, eps),
        }
    f, u = results["fused"], results["unfused"]
    report = {
        "machine": {
            "platform": platform.platform(),
            "device": str(dev),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "batch": args.batch,
        "latent": args.latent,
        "results": results,
        "speedup": u["median_ms"] / f["median_ms"],
        "saved_memory_ratio": u["saved_bytes"] / f["saved_bytes"],
    }
    print(f"reparameterize+KL fwd+bwd, batch {args.batch} x latent {args.latent} on {dev}")
    print(f"{'impl':8s} {'median ms':>10s} {'saved MiB':>10s} {'cuda peak MiB':>14s}")
    for name, r in results.items():
        peak = "-" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / 2**20:.1f}"
        print(f"{name:8s} {r['median_ms']:10.2f} {r['saved_bytes'] / 2**20:10.1f} {peak:>14s}")
    print(f"fused speedup x{report['speedup']:.2f}; autograd memory x{report['saved_memory_ratio']:.2f} less")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()

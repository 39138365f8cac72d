"""The training loop: seeded, resumable, atomic checkpoints, one metrics line per epoch.

Determinism: the model init, each epoch's shuffle and the reparameterization noise all come from
generators derived from ``seed``; the noise generator's state and the position inside the epoch are
saved in the checkpoint, so a resumed run (even one killed mid-epoch) ends with the same weights,
bit for bit on CPU, as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vae_deploy.checkpoint import read_checkpoint, save_checkpoint, save_safetensors
from vae_deploy.config import ModelConfig, TrainConfig, model_config_from_dict, to_dict
from vae_deploy.data import Splits, load_splits
from vae_deploy.errors import (
    CheckpointError,
    ConfigError,
    TrainingDiverged,
    UsageError,
    VaeDeployError,
)
from vae_deploy.files import atomic_write
from vae_deploy.losses import elbo_loss
from vae_deploy.model import VAE

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SAFETENSORS = "model.safetensors"  # the same weights, shareable without pickle


class _DeferredInterrupt:
    """Turn Ctrl-C (SIGINT) into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainingInterrupted(VaeDeployError):
    """Ctrl-C during training; the checkpoint at ``path`` holds the state after the last step."""

    exit_code = 130

    def __init__(self, path: Path) -> None:
        super().__init__(f"training interrupted; state saved to {path} (continue with --resume)")
        self.path = path


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    history: list[dict[str, Any]]
    data_note: str
    model: VAE


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU; use cpu or auto")
    return torch.device(device)


def build_optimizer(model: VAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam; L2 (``weight_decay``) on the encoder and ``decoder_weight_decay`` on the decoder."""
    groups = [
        {"params": list(model.encoder.parameters()), "weight_decay": cfg.weight_decay},
        {"params": list(model.decoder.parameters()), "weight_decay": cfg.decoder_weight_decay},
    ]
    return torch.optim.Adam(groups, lr=cfg.lr)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def evaluate_split(
    model: VAE,
    x: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    batch_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean loss terms over ``x`` with one posterior sample per image (fixed seed): nats/image."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "nelbo": 0.0}
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        out = model(xb, sample=True, generator=gen)
        terms = elbo_loss(out.logits, xb, out.kl, cfg.loss, cfg.beta, cfg.alpha)
        for k in sums:
            sums[k] += float(getattr(terms, k)) * len(xb)
    model.train(was_training)
    return {k: v / len(x) for k, v in sums.items()}


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(h) + "\n" for h in history).encode())


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    splits: Splits | None = None,
) -> TrainResult:
    """Train a VAE as configured; writes OUT/checkpoint.pt, OUT/metrics.jsonl and OUT/config.json."""
    out = Path(cfg.out)
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    device = resolve_device(cfg.device)
    if splits is None:
        splits = load_splits(
            cfg.dataset,
            cfg.data_root,
            binarize=cfg.binarize,
            download=cfg.download,
            train_limit=cfg.train_limit,
            val_limit=cfg.val_limit,
        )
    log(f"data: {splits.note}")
    if tuple(splits.train_x.shape[1:]) != model_cfg.image_shape:
        raise ConfigError(
            f"model image_shape {model_cfg.image_shape} does not match the data {tuple(splits.train_x.shape[1:])}"
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = VAE(model_cfg)
    model.to(device).train()
    opt = build_optimizer(model, cfg)
    eps_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    history: list[dict[str, Any]] = []
    start_epoch, start_batch, step = 0, 0, 0
    run_sum, run_n = 0.0, 0
    run_terms = [0.0, 0.0]  # running sums of the recon and KL terms in this epoch

    if resume:
        if not ckpt_path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {ckpt_path} to continue from")
        state = read_checkpoint(ckpt_path)
        if model_config_from_dict(state["model_config"]) != model_cfg:
            raise ConfigError(f"--resume: {ckpt_path} was trained with a different model config")
        model.load_state_dict(state["state_dict"])
        if state.get("optimizer"):
            opt.load_state_dict(state["optimizer"])
            for group, wd in zip(opt.param_groups, (cfg.weight_decay, cfg.decoder_weight_decay)):
                group.update(lr=cfg.lr, weight_decay=wd)  # the resumed run's settings win
        extra = state.get("extra", {})
        start_epoch, step = int(state["epoch"]), int(state["step"])
        start_batch = int(extra.get("batch_in_epoch", 0))
        run_sum, run_n = float(extra.get("run_sum", 0.0)), int(extra.get("run_n", 0))
        run_terms = [float(v) for v in extra.get("run_terms", [0.0, 0.0])]
        history = list(extra.get("history", []))
        if "eps_gen_state" in extra:
            eps_gen.set_state(extra["eps_gen_state"].to(eps_gen.get_state().device))
        _write_metrics(metrics_path, history)  # drop lines newer than the checkpoint
        log(f"resuming from {ckpt_path}: epoch {start_epoch + 1}, batch {start_batch}, step {step}")
    elif ckpt_path.exists():
        raise UsageError(f"{ckpt_path} already exists: pass --resume to continue it or choose --out")

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "config.json",
        json.dumps({"model": to_dict(model_cfg), "train": to_dict(cfg), "data": splits.note}, indent=2).encode(),
    )

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        save_checkpoint(
            ckpt_path,
            model,
            cfg,
            optimizer=opt,
            epoch=epoch,
            step=step,
            extra={
                "batch_in_epoch": batch_in_epoch,
                "eps_gen_state": eps_gen.get_state(),
                "run_sum": run_sum,
                "run_n": run_n,
                "run_terms": run_terms,
                "history": history,
                "data_note": splits.note,
            },
        )
        save_safetensors(out / SAFETENSORS, model, cfg)

    train_x = splits.train_x.to(device)
    n = len(train_x)
    with _DeferredInterrupt() as interrupt:
        for epoch in range(start_epoch, cfg.epochs):
            order = torch.randperm(n, generator=_epoch_generator(cfg.seed, epoch))
            order = order.split(cfg.batch_size)
            t0 = time.perf_counter()
            seen, next_batch = 0, start_batch
            bar = tqdm(
                total=len(order),
                initial=start_batch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )
            for b in range(start_batch, len(order)):
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
                if interrupt.requested:
                    bar.close()
                    checkpoint(epoch, next_batch)
                    raise TrainingInterrupted(ckpt_path)
                xb = train_x[order[b].to(device)]
                out_ = model(xb, generator=eps_gen)
                terms = elbo_loss(out_.logits, xb, out_.kl, cfg.loss, cfg.beta, cfg.alpha)
                loss_value = float(terms.loss.detach())
                if not math.isfinite(loss_value):
                    bar.close()
                    raise TrainingDiverged(
                        f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; stopped "
                        f"(last good checkpoint kept at {ckpt_path}): try a lower --lr"
                    )
                opt.zero_grad(set_to_none=True)
                terms.loss.backward()
                opt.step()
                step += 1
                next_batch = b + 1
                seen += len(xb)
                run_sum += loss_value * len(xb)
                run_terms[0] += float(terms.recon.detach()) * len(xb)
                run_terms[1] += float(terms.kl.detach()) * len(xb)
                run_n += len(xb)
                bar.update(1)
                bar.set_postfix(loss=f"{run_sum / run_n:.2f}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint(epoch, next_batch)
            bar.close()
            dt = time.perf_counter() - t0
            val = evaluate_split(model, splits.val_x, cfg, device, seed=cfg.seed)
            model.train()
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": run_sum / max(run_n, 1),
                "train_recon": run_terms[0] / max(run_n, 1),
                "train_kl": run_terms[1] / max(run_n, 1),
                "val_loss": val["loss"],
                "val_recon": val["recon"],
                "val_kl": val["kl"],
                "val_nelbo": val["nelbo"],
                "images_per_s": seen / dt if dt > 0 else None,
                "seconds": dt,
            }
            history.append(row)
            run_sum, run_n, start_batch, run_terms = 0.0, 0, 0, [0.0, 0.0]
            stopped_early = cfg.max_steps is not None and step >= cfg.max_steps
            finished = next_batch >= len(order)
            checkpoint(epoch + 1 if finished else epoch, 0 if finished else next_batch)
            _write_metrics(metrics_path, history)
            log(
                f"epoch {epoch + 1}/{cfg.epochs}  train {row['train_loss']:.2f}  val {row['val_loss']:.2f}"
                f"  (recon {row['val_recon']:.2f}, kl {row['val_kl']:.2f}, -elbo {row['val_nelbo']:.2f}"
                f" nats/img)  {seen / max(dt, 1e-9):,.0f} img/s"
            )
            if stopped_early:
                log(f"stopped after --max-steps {cfg.max_steps}")
                break
    return TrainResult(out, ckpt_path, history, splits.note, model.cpu().eval())

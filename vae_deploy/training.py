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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vae_deploy.checkpoint import (
    CHECKPOINT_NAME,
    SAFETENSORS_NAME,
    checkpoint_configs,
    model_from_state,
    new_save_id,
    read_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from vae_deploy.config import ModelConfig, TrainConfig, to_dict
from vae_deploy.data import Splits, load_splits, to_unit_float
from vae_deploy.errors import (
    CheckpointError,
    ConfigError,
    TrainingDiverged,
    UsageError,
    VaeDeployError,
)
from vae_deploy.files import atomic_write, sweep_temp_files
from vae_deploy.losses import elbo_loss
from vae_deploy.model import VAE
from vae_deploy.outdir import check_output_dir, claim_output_dir

CHECKPOINT = CHECKPOINT_NAME
METRICS = "metrics.jsonl"
SAFETENSORS = SAFETENSORS_NAME  # the same weights, shareable without pickle
SAME_ON_RESUME = ("dataset", "binarize", "train_limit", "batch_size", "seed")  # they fix the data order


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
        xb = to_unit_float(x[i : i + batch_size].to(device))
        out = model(xb, sample=True, generator=gen)
        terms = elbo_loss(out.logits, xb, out.kl, cfg.loss, cfg.beta, cfg.alpha)
        for k in sums:
            sums[k] += float(getattr(terms, k)) * len(xb)
    model.train(was_training)
    return {k: v / len(x) for k, v in sums.items()}


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(h) + "\n" for h in rows).encode())


@dataclass
class _Progress:
    """Where a run stands: the epoch and batch to continue from, and the running sums of the epoch
    in progress (over every batch of it so far, across resumes), so its row covers all of it."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    recon_sum: float = 0.0
    kl_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        n = max(self.images, 1)
        return {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": self.loss_sum / n,
            "train_recon": self.recon_sum / n,
            "train_kl": self.kl_sum / n,
        }

    def extra(self) -> dict[str, Any]:
        return {
            "batch_in_epoch": self.batch,
            "run_sum": self.loss_sum,
            "run_terms": [self.recon_sum, self.kl_sum],
            "run_n": self.images,
            "run_seconds": self.seconds,
            "history": self.history,
        }


def _check_same_run(state: dict[str, Any], path: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Resume continues the same run: same model, and the same data order (dataset, batch size, seed)."""
    saved_model, saved = checkpoint_configs(state)
    if saved_model != model_cfg:
        raise ConfigError(f"--resume: {path} was trained with a different model config")
    if saved is None:
        raise CheckpointError(f"--resume: {path} records no train config, so it cannot be continued")
    for name in SAME_ON_RESUME:
        old, new = getattr(saved, name), getattr(cfg, name)
        if old != new:
            raise ConfigError(
                f"--resume: {path} was trained with {name}={old!r}, this run asks for {name}={new!r}; "
                f"resume with the same {name} or start a new --out"
            )


def _resume(
    state: dict[str, Any],
    path: Path,
    model: VAE,
    opt: torch.optim.Optimizer,
    eps_gen: torch.Generator,
    n_batches: int,
    data_note: str,
) -> _Progress:
    """Load a checkpoint's weights, optimizer and progress, checking each value first: a forged or
    foreign file is a ``CheckpointError``, never a crash later in training."""
    model.load_state_dict(model_from_state(state, str(path)).state_dict())
    extra = state.get("extra")
    if not isinstance(extra, dict):
        raise CheckpointError(f"--resume: {path} has no progress record (extra is not a dict)")
    note = extra.get("data_note")
    if isinstance(note, str) and note != data_note:
        raise ConfigError(f"--resume: {path} was trained on other data ({note!r}; now {data_note!r})")
    num = _Checked(path)
    p = _Progress(
        epoch=num.int(state.get("epoch"), "epoch"),
        step=num.int(state.get("step"), "step"),
        batch=num.int(extra.get("batch_in_epoch", 0), "batch_in_epoch", n_batches - 1),
        loss_sum=num.float(extra.get("run_sum", 0.0), "run_sum"),
        images=num.int(extra.get("run_n", 0), "run_n"),
        seconds=num.float(extra.get("run_seconds", 0.0), "run_seconds"),
    )
    terms = extra.get("run_terms", [0.0, 0.0])
    if not isinstance(terms, list) or len(terms) != 2:
        raise CheckpointError(f"--resume: {path} has a malformed run_terms (expected two numbers)")
    p.recon_sum, p.kl_sum = (num.float(t, "run_terms") for t in terms)
    p.history = _epoch_rows(extra.get("history", []), p.epoch, path)
    if state.get("optimizer") is not None:
        _load_optimizer(opt, state["optimizer"], path)
    gen_state = extra.get("eps_gen_state")
    if gen_state is not None:
        now = eps_gen.get_state()
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != now.dtype or gen_state.shape != now.shape:
            raise CheckpointError(f"--resume: {path} has a malformed eps_gen_state")
        eps_gen.set_state(gen_state.to(now.device))
    return p


class _Checked:
    """Numbers from a checkpoint's progress record, type- and range-checked."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def int(self, value: Any, name: str, high: int = 2**62) -> int:
        if type(value) is not int or not 0 <= value <= high:
            raise CheckpointError(f"--resume: {self.path} has {name}={value!r:.40}, expected an integer in 0..{high}")
        return value

    def float(self, value: Any, name: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise CheckpointError(f"--resume: {self.path} has {name}={value!r:.40}, expected a finite number")
        return float(value)


def _epoch_rows(history: Any, done: int, path: Path) -> list[dict[str, Any]]:
    """One row per finished epoch 1..done. Older checkpoints could hold a row for a partial epoch
    (and then a second row for it): keep the last row of each finished epoch, drop the rest."""
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"--resume: {path} has a malformed history (expected a list of rows)")
    rows = {r["epoch"]: r for r in history if type(r.get("epoch")) is int and 1 <= r["epoch"] <= done}
    return [rows[e] for e in sorted(rows)]


def _load_optimizer(opt: torch.optim.Optimizer, saved: Any, path: Path) -> None:
    """Adam's state from a checkpoint, each moment checked against its parameter's shape; the
    hyperparameters (lr, weight decay, betas) are this run's."""
    fresh = opt.state_dict()
    params = [p for group in opt.param_groups for p in group["params"]]
    bad = CheckpointError(f"--resume: {path} has an optimizer state that does not fit the model")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise bad
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or [g.get("params") if isinstance(g, dict) else None for g in groups] != [
        g["params"] for g in fresh["param_groups"]
    ]:
        raise bad
    for key, entry in saved["state"].items():
        if type(key) is not int or not 0 <= key < len(params) or not isinstance(entry, dict):
            raise bad
        for value in entry.values():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise bad
            if value.dim() and value.shape != params[key].shape or not bool(torch.isfinite(value).all()):
                raise bad
    try:
        opt.load_state_dict(saved)
    except (KeyError, ValueError, TypeError, RuntimeError):
        raise bad from None
    for group, want in zip(opt.param_groups, fresh["param_groups"]):
        group.update({k: v for k, v in want.items() if k != "params"})


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    splits: Splits | None = None,
) -> TrainResult:
    """Train a VAE as configured; writes OUT/checkpoint.pt, model.safetensors, metrics.jsonl, config.json.

    OUT must be a run folder of ours, absent, or empty (see :mod:`vae_deploy.outdir`); everything is
    validated before the first write. ``resume`` continues the run in OUT (same model, dataset, batch
    size and seed); ``overwrite`` starts afresh in a run folder of ours, replacing only our files.

    metrics.jsonl has one row per epoch. A run stopped inside an epoch (``max_steps``) ends with a
    row marked ``"partial": true``; resuming replaces it by the epoch's full row, whose train terms
    average over every batch of the epoch (the checkpoint carries the partial sums).
    """
    out = Path(cfg.out)
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    device = resolve_device(cfg.device)
    if resume and not ckpt_path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {ckpt_path} to continue from")
    check_output_dir(out, "run", resume=resume)
    if not resume and not overwrite and ckpt_path.exists():
        raise UsageError(f"{ckpt_path} already exists: pass --resume to continue it or choose --out")
    state = read_checkpoint(ckpt_path) if resume else None
    if state is not None:
        _check_same_run(state, ckpt_path, model_cfg, cfg)
    if splits is None:
        splits = load_splits(
            cfg.dataset,
            cfg.data_root,
            binarize=cfg.binarize,
            download=cfg.download,
            train_limit=cfg.train_limit,
            val_limit=cfg.val_limit,
            image_shape=model_cfg.image_shape,
            as_float=False,  # uint8 stays uint8 (a quarter of the memory); each batch is converted
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
    n = len(splits.train_x)
    n_batches = math.ceil(n / cfg.batch_size)
    p = _Progress()
    save_id: str | None = None
    if state is not None:
        p = _resume(state, ckpt_path, model, opt, eps_gen, n_batches, splits.note)
        save_id = state.get("save_id") if isinstance(state.get("save_id"), str) else None
        if p.epoch >= cfg.epochs or (cfg.max_steps is not None and p.step >= cfg.max_steps):
            log(f"nothing to train: {ckpt_path} is at epoch {p.epoch}, step {p.step}")
            return TrainResult(out, ckpt_path, p.history, splits.note, model.cpu().eval())
        log(f"resuming from {ckpt_path}: epoch {p.epoch + 1}, batch {p.batch}, step {p.step}")

    # Everything is validated: the first write.
    claim_output_dir(out, "run", resume=resume)
    sweep_temp_files(out)
    if overwrite and not resume:
        for name in (CHECKPOINT, SAFETENSORS, METRICS):  # only our files of the previous run
            (out / name).unlink(missing_ok=True)
    if resume:
        _write_metrics(metrics_path, p.history)  # drop rows newer than the checkpoint
        save_safetensors(out / SAFETENSORS, model, cfg, save_id=save_id, step=p.step)  # mend a torn pair
    atomic_write(
        out / "config.json",
        json.dumps({"model": to_dict(model_cfg), "train": to_dict(cfg), "data": splits.note}, indent=2).encode(),
    )

    def checkpoint() -> None:
        sid = new_save_id()
        save_checkpoint(
            ckpt_path,
            model,
            cfg,
            optimizer=opt,
            epoch=p.epoch,
            step=p.step,
            extra={**p.extra(), "eps_gen_state": eps_gen.get_state(), "data_note": splits.note},
            save_id=sid,
        )
        save_safetensors(out / SAFETENSORS, model, cfg, save_id=sid, step=p.step)

    train_x = splits.train_x.to(device)
    rows = list(p.history)
    with _DeferredInterrupt() as interrupt:
        while p.epoch < cfg.epochs:
            epoch = p.epoch
            order = torch.randperm(n, generator=_epoch_generator(cfg.seed, epoch)).split(cfg.batch_size)
            t0, seconds_before = time.perf_counter(), p.seconds
            bar = tqdm(
                total=len(order),
                initial=p.batch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )
            for b in range(p.batch, len(order)):
                if cfg.max_steps is not None and p.step >= cfg.max_steps:
                    break
                if interrupt.requested:
                    bar.close()
                    p.seconds = seconds_before + time.perf_counter() - t0
                    checkpoint()
                    raise TrainingInterrupted(ckpt_path)
                xb = to_unit_float(train_x[order[b].to(device)])
                out_ = model(xb, generator=eps_gen)
                terms = elbo_loss(out_.logits, xb, out_.kl, cfg.loss, cfg.beta, cfg.alpha)
                loss_value = float(terms.loss.detach())
                if not math.isfinite(loss_value):
                    bar.close()
                    raise TrainingDiverged(
                        f"loss became {loss_value} at epoch {epoch + 1}, step {p.step + 1}; stopped "
                        f"(last good checkpoint kept at {ckpt_path}): try a lower --lr"
                    )
                opt.zero_grad(set_to_none=True)
                terms.loss.backward()
                opt.step()
                p.step += 1
                p.batch = b + 1
                p.loss_sum += loss_value * len(xb)
                p.recon_sum += float(terms.recon.detach()) * len(xb)
                p.kl_sum += float(terms.kl.detach()) * len(xb)
                p.images += len(xb)
                bar.update(1)
                bar.set_postfix(loss=f"{p.loss_sum / p.images:.2f}")
                if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
                    p.seconds = seconds_before + time.perf_counter() - t0
                    checkpoint()
            bar.close()
            p.seconds = seconds_before + time.perf_counter() - t0
            finished = p.batch >= len(order)
            if p.images == 0:  # no batch of this epoch ran (cannot happen after the checks above)
                break
            val = evaluate_split(model, splits.val_x, cfg, device, seed=cfg.seed)
            model.train()
            row = {
                **p.row(),
                "val_loss": val["loss"],
                "val_recon": val["recon"],
                "val_kl": val["kl"],
                "val_nelbo": val["nelbo"],
                "images_per_s": p.images / p.seconds if p.seconds > 0 else None,
                "seconds": p.seconds,
            }
            if finished:
                p.history.append(row)
                p = _Progress(epoch=epoch + 1, step=p.step, history=p.history)
                rows = list(p.history)
            else:  # stopped by max_steps: the checkpoint keeps the sums; the row is provisional
                row.update(partial=True, batches=p.batch, of_batches=len(order))
                rows = [*p.history, row]
            checkpoint()
            _write_metrics(metrics_path, rows)
            part = "" if finished else f" (partial: {row['batches']}/{len(order)} batches)"
            log(
                f"epoch {epoch + 1}/{cfg.epochs}{part}  train {row['train_loss']:.2f}  "
                f"val {row['val_loss']:.2f}  (recon {row['val_recon']:.2f}, kl {row['val_kl']:.2f}, "
                f"-elbo {row['val_nelbo']:.2f} nats/img)  {row['images_per_s'] or 0:,.0f} img/s"
            )
            if cfg.max_steps is not None and p.step >= cfg.max_steps:
                log(f"stopped after --max-steps {cfg.max_steps}")
                break
    return TrainResult(out, ckpt_path, rows, splits.note, model.cpu().eval())

"""The training loop: seeded, resumable, atomic checkpoints, one metrics line per epoch.

Determinism: the model init, each epoch's shuffle and the reparameterization noise all come from
generators derived from ``seed``; the noise generator's state and the position inside the epoch are
saved in the checkpoint, so a resumed run (even one killed mid-epoch) ends with the same weights,
bit for bit on CPU, as an uninterrupted one.

Under torchrun every rank runs the same loop; :class:`~vae_deploy.distributed.Group` supplies the
few places where that differs (DDP, the data split, per-step sums, the stop agreement, rank 0
writing), and is trivial for one process. See :mod:`vae_deploy.distributed`.
"""

from __future__ import annotations

import hashlib
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

from vae_deploy.checkpoint import (
    CHECKPOINT_NAME,
    SAFETENSORS_NAME,
    new_save_id,
    read_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from vae_deploy.config import ModelConfig, TrainConfig, to_dict
from vae_deploy.data import Splits, load_splits, to_unit_float
from vae_deploy.distributed import (
    Group,
    batches_per_epoch,
    check_batch_split,
    check_gpus,
    process_group,
    rank_batches,
    rank_device,
    rank_seed,
    ranks_from_env,
    shared,
)
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
from vae_deploy.run_state import Progress, check_same_run, restore

CHECKPOINT = CHECKPOINT_NAME
METRICS = "metrics.jsonl"
SAFETENSORS = SAFETENSORS_NAME  # the same weights, shareable without pickle
VAL_BATCH = 500  # validation batch: the unit split over ranks (noise is drawn per batch)


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


def _derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def evaluate_split(
    model: VAE,
    x: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    batch_size: int = VAL_BATCH,
    seed: int = 0,
) -> dict[str, float]:
    """Mean loss terms over ``x`` with one posterior sample per image (fixed seed): nats/image."""
    sums = evaluate_sums(model, x, cfg, device, batch_size, seed)
    return {k: v / len(x) for k, v in sums.items()}


@torch.no_grad()
def evaluate_sums(
    model: VAE,
    x: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    batch_size: int = VAL_BATCH,
    seed: int = 0,
    part: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Loss terms summed over the images of ``x`` in part ``part = (i, k)``: every k-th batch from
    the i-th. Batch j draws its noise from its own generator (seeded from ``seed`` and j), so the k
    parts add up to the one-process sums whatever k is."""
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "nelbo": 0.0}
    for j, i in enumerate(range(0, len(x), batch_size)):
        if j % part[1] != part[0]:
            continue
        xb = to_unit_float(x[i : i + batch_size].to(device))
        gen = torch.Generator(device=device).manual_seed(_derived_seed("eval", seed, j))
        out = model(xb, sample=True, generator=gen)
        terms = elbo_loss(out.logits, xb, out.kl, cfg.loss, cfg.beta, cfg.alpha)
        for k in sums:
            sums[k] += float(getattr(terms, k)) * len(xb)
    model.train(was_training)
    return sums


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(h) + "\n" for h in rows).encode())


def check_run(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    world_size: int = 1,
) -> dict[str, Any] | None:
    """What can be checked before loading data, writing nothing: the batch split over
    ``world_size`` processes, the output folder, and the checkpoint to resume (same model, data
    order and number of processes). Returns that checkpoint (None when not resuming)."""
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    check_batch_split(cfg.batch_size, world_size)
    if resume and not ckpt_path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {ckpt_path} to continue from")
    check_output_dir(out, "run", resume=resume)
    if not resume and not overwrite and ckpt_path.exists():
        raise UsageError(f"{ckpt_path} already exists: pass --resume to continue it or choose --out")
    state = read_checkpoint(ckpt_path) if resume else None
    if state is not None:
        check_same_run(state, ckpt_path, model_cfg, cfg, world_size)
    return state


def check_launch(model_cfg: ModelConfig, cfg: TrainConfig, nproc: int, *, resume: bool = False) -> None:
    """Before ``--nproc`` starts any process: the checks of :func:`check_run`, and one GPU per
    process when training on CUDA (each failure one line, in the launching process)."""
    if resolve_device(cfg.device).type == "cuda":
        check_gpus(nproc)
    check_run(model_cfg, cfg, resume=resume, world_size=nproc)


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
    size, seed and number of processes); ``overwrite`` starts afresh in a run folder of ours,
    replacing only our files.

    metrics.jsonl has one row per epoch. A run stopped inside an epoch (``max_steps``) ends with a
    row marked ``"partial": true``; resuming replaces it by the epoch's full row, whose train terms
    average over every batch of the epoch (the checkpoint carries the partial sums).

    Under torchrun (WORLD_SIZE > 1) every rank calls this: DDP, as :mod:`vae_deploy.distributed`
    describes; rank 0 logs and writes the files, the other ranks return the same trained model.
    """
    ranks = ranks_from_env()
    if not ranks.is_main:
        log = _silent
    device = rank_device(resolve_device(cfg.device), ranks)
    with process_group(ranks, device) as group:
        with group.agree():  # every rank checks the same things; one failure stops them all
            state = check_run(model_cfg, cfg, resume=resume, overwrite=overwrite, world_size=ranks.world_size)
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
                    f"model image_shape {model_cfg.image_shape} does not match the data "
                    f"{tuple(splits.train_x.shape[1:])}"
                )
        return _fit(model_cfg, cfg, group, state, splits, resume, overwrite, progress and ranks.is_main, log)


def _silent(_: str) -> None:
    pass


def _fit(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    group: Group,
    state: dict[str, Any] | None,
    splits: Splits,
    resume: bool,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
) -> TrainResult:
    """The training loop of :func:`train`, once everything is checked (on every rank of ``group``)."""
    out = Path(cfg.out)
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    device, writer, world = group.device, group.is_main, group.world_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = VAE(model_cfg)
    model.to(device).train()
    opt = build_optimizer(model, cfg)
    eps_gen = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed + 1, group.rank))
    n = len(splits.train_x)
    n_batches = batches_per_epoch(n, cfg.batch_size, world)
    p = Progress()
    save_id: str | None = None
    if state is not None:
        with group.agree():
            p = restore(state, ckpt_path, model, opt, eps_gen, n_batches, splits.note, group.ranks)
        save_id = state.get("save_id") if isinstance(state.get("save_id"), str) else None
        if p.epoch >= cfg.epochs or (cfg.max_steps is not None and p.step >= cfg.max_steps):
            log(f"nothing to train: {ckpt_path} is at epoch {p.epoch}, step {p.step}")
            return TrainResult(out, ckpt_path, p.history, splits.note, model.cpu().eval())
        log(f"resuming from {ckpt_path}: epoch {p.epoch + 1}, batch {p.batch}, step {p.step}")
    net = group.wrap(model)  # DDP on several processes (its parameters: model's)
    if world > 1:
        log(f"training on {world} processes ({group.backend}), {cfg.batch_size // world} images each per step")

    # Everything is validated: the first write (rank 0 writes every file).
    if writer:
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
            json.dumps(
                {"model": to_dict(model_cfg), "train": to_dict(cfg), "data": splits.note, "processes": world}, indent=2
            ).encode(),
        )

    def checkpoint() -> None:
        states = group.gather(eps_gen.get_state())  # every rank's noise stream
        if writer:
            sid = new_save_id()
            extra = {**p.extra(), "eps_gen_state": states[0], "data_note": splits.note, "world_size": world}
            if world > 1:
                extra["eps_gen_states"] = states
            save_checkpoint(ckpt_path, model, cfg, optimizer=opt, epoch=p.epoch, step=p.step, extra=extra, save_id=sid)
            save_safetensors(out / SAFETENSORS, model, cfg, save_id=sid, step=p.step)
        group.barrier()  # no rank goes on (or exits, which makes torchrun stop the rest) before it is saved

    def batches(epoch: int) -> list[torch.Tensor]:
        if world == 1:
            return list(torch.randperm(n, generator=_epoch_generator(cfg.seed, epoch)).split(cfg.batch_size))
        return rank_batches(n, cfg.batch_size, seed=cfg.seed, epoch=epoch, ranks=group.ranks)

    train_x = splits.train_x.to(device)
    rows = list(p.history)
    with _DeferredInterrupt() as interrupt, group.guard(ckpt_path):
        while p.epoch < cfg.epochs:
            epoch = p.epoch
            order = batches(epoch)
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
                if group.should_stop(interrupt.requested):
                    bar.close()
                    p.seconds = seconds_before + time.perf_counter() - t0
                    checkpoint()
                    raise shared(TrainingInterrupted(ckpt_path))
                xb = to_unit_float(group.batch(train_x[order[b].to(device)]))
                out_ = net(xb, generator=eps_gen)
                terms = elbo_loss(out_.logits, xb, out_.kl, cfg.loss, cfg.beta, cfg.alpha)
                (loss_sum, recon_sum, kl_sum), seen = group.step_sums(
                    [terms.loss, terms.recon, terms.kl], len(xb), interrupt.requested
                )
                if not math.isfinite(loss_sum):
                    bar.close()
                    raise shared(
                        TrainingDiverged(
                            f"loss became {loss_sum / seen} at epoch {epoch + 1}, step {p.step + 1}; stopped "
                            f"(last good checkpoint kept at {ckpt_path}): try a lower --lr"
                        )
                    )
                opt.zero_grad(set_to_none=True)
                terms.loss.backward()
                opt.step()
                p.step += 1
                p.batch = b + 1
                p.loss_sum += loss_sum
                p.recon_sum += recon_sum
                p.kl_sum += kl_sum
                p.images += seen
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
            val = _validate(model, splits.val_x, cfg, group)
            model.train()
            row = {
                **p.row(),
                "val_loss": val["loss"],
                "val_recon": val["recon"],
                "val_kl": val["kl"],
                "val_nelbo": val["nelbo"],
                "images_per_s": p.images / p.seconds if p.seconds > 0 else None,
                "seconds": p.seconds,
                "processes": world,
            }
            if finished:
                p.history.append(row)
                p = Progress(epoch=epoch + 1, step=p.step, history=p.history)
                rows = list(p.history)
            else:  # stopped by max_steps: the checkpoint keeps the sums; the row is provisional
                row.update(partial=True, batches=p.batch, of_batches=len(order))
                rows = [*p.history, row]
            checkpoint()
            if writer:
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


def _validate(model: VAE, x: torch.Tensor, cfg: TrainConfig, group: Group) -> dict[str, float]:
    """Validation means over ``x``, its batches split over the ranks and the sums all-reduced."""
    part = (group.rank, group.world_size)
    sums = evaluate_sums(model, x, cfg, group.device, batch_size=VAL_BATCH, seed=cfg.seed, part=part)
    totals = group.sum(list(sums.values()))
    return {k: v / len(x) for k, v in zip(sums, totals)}

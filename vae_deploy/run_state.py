"""The resumable state of a training run: the progress record a checkpoint carries, and the checks
that a checkpoint continues the run asked for.

Everything read from a checkpoint is checked before use (type, range, shape): a forged or foreign
file is a ``CheckpointError`` or ``ConfigError`` in one line, never a crash later in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vae_deploy.checkpoint import checkpoint_configs, model_from_state
from vae_deploy.config import ModelConfig, TrainConfig
from vae_deploy.distributed import Ranks
from vae_deploy.errors import CheckpointError, ConfigError
from vae_deploy.model import VAE

SAME_ON_RESUME = ("dataset", "binarize", "train_limit", "batch_size", "seed")  # they fix the data order


@dataclass
class Progress:
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


def check_same_run(
    state: dict[str, Any], path: Path, model_cfg: ModelConfig, cfg: TrainConfig, world_size: int
) -> None:
    """Resume continues the same run: same model, and the same data order and noise streams
    (dataset, batch size, seed, number of processes)."""
    extra = state.get("extra")
    saved_world = extra.get("world_size", 1) if isinstance(extra, dict) else 1
    if type(saved_world) is not int or saved_world < 1:
        raise CheckpointError(f"--resume: {path} has world_size={saved_world!r:.40}, expected a positive integer")
    if saved_world != world_size:
        raise ConfigError(
            f"--resume: {path} was trained on {saved_world} process(es), this run has {world_size}; resume with "
            f"--nproc {saved_world} (the data order and noise streams depend on it) or start a new --out"
        )
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


def restore(
    state: dict[str, Any],
    path: Path,
    model: VAE,
    opt: torch.optim.Optimizer,
    eps_gen: torch.Generator,
    n_batches: int,
    data_note: str,
    ranks: Ranks,
) -> Progress:
    """Load a checkpoint's weights, optimizer and progress, checking each value first: a forged or
    foreign file is a ``CheckpointError``, never a crash later in training."""
    model.load_state_dict(model_from_state(state, str(path)).state_dict())
    extra = state.get("extra")
    if not isinstance(extra, dict):
        raise CheckpointError(f"--resume: {path} has no progress record (extra is not a dict)")
    note = extra.get("data_note")
    if isinstance(note, str) and note != data_note:
        raise ConfigError(f"--resume: {path} was trained on other data ({note!r}; now {data_note!r})")
    num = Checked(path)
    p = Progress(
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
    p.history = epoch_rows(extra.get("history", []), p.epoch, path)
    if state.get("optimizer") is not None:
        load_optimizer(opt, state["optimizer"], path)
    gen_state = extra.get("eps_gen_state")
    if ranks.world_size > 1:  # one state per rank
        states = extra.get("eps_gen_states")
        if not isinstance(states, list) or len(states) != ranks.world_size:
            raise CheckpointError(
                f"--resume: {path} has no noise generator state for each of its {ranks.world_size} ranks"
            )
        gen_state = states[ranks.rank]
    if gen_state is not None:
        now = eps_gen.get_state()
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != now.dtype or gen_state.shape != now.shape:
            raise CheckpointError(f"--resume: {path} has a malformed eps_gen_state")
        eps_gen.set_state(gen_state.to(now.device))
    return p


class Checked:
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


def epoch_rows(history: Any, done: int, path: Path) -> list[dict[str, Any]]:
    """One row per finished epoch 1..done. Older checkpoints could hold a row for a partial epoch
    (and then a second row for it): keep the last row of each finished epoch, drop the rest."""
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"--resume: {path} has a malformed history (expected a list of rows)")
    rows = {r["epoch"]: r for r in history if type(r.get("epoch")) is int and 1 <= r["epoch"] <= done}
    return [rows[e] for e in sorted(rows)]


def load_optimizer(opt: torch.optim.Optimizer, saved: Any, path: Path) -> None:
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

"""Checkpoints: weights + full config + resume state, written atomically, loaded without pickle code.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: a file whose pickle would construct arbitrary objects or run code
is refused before anything in it runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_deploy.config import (
    ModelConfig,
    TrainConfig,
    model_config_from_dict,
    to_dict,
    train_config_from_dict,
)
from vae_deploy.errors import CheckpointError
from vae_deploy.files import atomic_write
from vae_deploy.model import VAE

FORMAT = "vae-deploy-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    model: VAE,
    train_config: TrainConfig | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint: weights, configs, optimizer and progress for ``--resume``."""
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": to_dict(model.config),
        "train_config": to_dict(train_config) if train_config is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "torch_version": str(torch.__version__),
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load the raw checkpoint dict safely (``weights_only=True``, or safetensors) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _check_state(_read_safetensors(path), path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "pickle protocol 4" notes on foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"  # the PROTO opcode every pickle since protocol 2 starts with
        if "Unsupported operand" in text and not pickled:  # random bytes or text, not a pickle
            raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt or not one)") from None
        found = [ln.strip() for ln in text.splitlines() if "Unsupported global" in ln]
        first = (
            found[0].split(" was not")[0].replace("WeightsUnpickler error: ", "")
            if found
            else (text.strip().splitlines()[0] if text.strip() else "unpickling failed")
        )
        raise CheckpointError(
            f"refused to load {path}: it is not a plain-weights checkpoint (its pickle wants "
            f"objects or code that weights_only loading forbids: {first[:160]})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, wrong format
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a vae-deploy checkpoint (expected a dict with format={FORMAT!r}; "
            "train one with `vae-deploy train`)"
        )
    return _check_state(state, path)


def _check_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Refuse newer formats and fields of the wrong type (a forged file must not reach deeper code)."""
    version = state.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointError(f"{path} has no valid format_version (expected an integer, got {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this "
            f"vae-deploy understands ({FORMAT_VERSION}); upgrade vae-deploy"
        )
    for key, kinds in (("model_config", dict), ("state_dict", dict), ("train_config", (dict, type(None)))):
        if not isinstance(state.get(key), kinds):
            raise CheckpointError(
                f"{path} is not a valid vae-deploy checkpoint: its {key} is a "
                f"{type(state.get(key)).__name__}, expected a dict"
            )
    return state


def _check_weights(weights: dict[str, Any], cfg: ModelConfig, source: str) -> None:
    """Names, shapes and finiteness of the weights against the config, checked on the meta device
    before anything is allocated (a forged config cannot make us build a huge model)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VAE(cfg).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, shape in expected.items():
        t = weights[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source}: weight {key} is a {type(t).__name__}, expected a tensor")
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{source}: weights do not fit the model config ({key} has shape {list(t.shape)}, "
                f"the config needs {list(shape)})"
            )
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: weight {key} has NaN or infinite values")


def model_from_state(state: dict[str, Any], source: str = "checkpoint") -> VAE:
    try:
        cfg = model_config_from_dict(state["model_config"])
    except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise CheckpointError(f"{source} has no valid model config: {exc}") from None
    weights = state.get("state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{source} has no state_dict (expected a dict of tensors)")
    _check_weights(weights, cfg, source)
    model = VAE(cfg)
    try:
        model.load_state_dict(weights)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"{source}: weights do not fit the model config ({str(exc).splitlines()[0][:200]})"
        ) from None
    return model.eval()


def save_safetensors(path: str | os.PathLike, model: VAE, train_config: TrainConfig | None = None) -> Path:
    """Write weights as safetensors with the configs as JSON metadata: shareable without pickle."""
    from safetensors.torch import save

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(to_dict(model.config)),
        "train_config": json.dumps(to_dict(train_config) if train_config is not None else None),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(tensors, metadata=meta))
    return Path(path)


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc)[:160]})") from None
    if meta.get("format") != FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file without vae-deploy model metadata")
    try:
        version = int(meta.get("format_version", 1))
        model_config, tc = json.loads(meta["model_config"]), json.loads(meta.get("train_config") or "null")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has garbled vae-deploy metadata ({str(exc)[:160]})") from None
    return {
        "format": FORMAT,
        "format_version": version,
        "model_config": model_config,
        "train_config": tc,
        "state_dict": tensors,
        "optimizer": None,
        "epoch": 0,
        "step": 0,
        "extra": {},
    }


def load_checkpoint(path: str | os.PathLike) -> VAE:
    """Load a checkpoint (``.pt`` or ``.safetensors``) into a ``VAE`` in eval mode (on CPU)."""
    return model_from_state(read_checkpoint(path), str(path))


def checkpoint_configs(state: dict[str, Any]) -> tuple[ModelConfig, TrainConfig | None]:
    mc = model_config_from_dict(state["model_config"])
    tc = state.get("train_config")
    return mc, (train_config_from_dict(tc) if tc else None)

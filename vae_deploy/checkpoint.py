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
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_deploy.checkpoint_index import (
    TensorInfo,
    loads_bounded,
    read_pt_index,
    read_safetensors_header,
)
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
CHECKPOINT_NAME = "checkpoint.pt"  # in a run folder
SAFETENSORS_NAME = "model.safetensors"  # the same weights beside it, shareable without pickle
# A .pt may hold the weights, Adam's two moments, and small extras: anything far above is refused
# from the zip directory, before torch.load decompresses a byte of it.
PT_BYTES_FACTOR = 8
PT_BYTES_SLACK = 32 << 20


def new_save_id() -> str:
    """A random id written into both files of a checkpoint pair, to tell a torn pair apart."""
    return uuid.uuid4().hex


def save_checkpoint(
    path: str | os.PathLike,
    model: VAE,
    train_config: TrainConfig | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    save_id: str | None = None,
) -> Path:
    """Atomically write a checkpoint: weights, configs, optimizer and progress for ``--resume``.

    ``save_id`` (see :func:`new_save_id`) pairs it with the ``model.safetensors`` written beside it.
    """
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
        "save_id": save_id,
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
    index = read_pt_index(path)  # None: not a zip (legacy torch format; its size bounds its memory)
    if index is not None:
        _check_format(index.state, path)
        _check_index(_check_state(index.state, path), index.total_bytes, path)
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
    _check_format(state, path)
    return _check_state(state, path)


def _check_format(state: Any, path: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a vae-deploy checkpoint (expected a dict with format={FORMAT!r}; "
            "train one with `vae-deploy train`)"
        )


def _check_index(state: dict[str, Any], total_bytes: int, path: Path) -> None:
    """Names, shapes and dtypes from a .pt's index, and its unpacked size, against its model config."""
    expected = expected_tensors(_model_config(state, path))
    _check_weights(state["state_dict"], expected, str(path))
    bound = PT_BYTES_FACTOR * sum(info.nbytes for info in expected.values()) + PT_BYTES_SLACK
    if total_bytes > bound:
        raise CheckpointError(
            f"refusing to load {path}: it unpacks to {total_bytes:,} bytes, more than a checkpoint "
            f"of its model config can hold (at most {bound:,})"
        )


def _model_config(state: dict[str, Any], source: Any) -> ModelConfig:
    try:
        return model_config_from_dict(state["model_config"])
    except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise CheckpointError(f"{source} has no valid model config: {exc}") from None


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
    _model_config(state, path)
    if state["train_config"] is not None:
        try:
            train_config_from_dict(state["train_config"])
        except ValueError as exc:
            raise CheckpointError(f"{path} has no valid train config: {exc}") from None
    return state


def expected_tensors(cfg: ModelConfig) -> dict[str, TensorInfo]:
    """Name -> shape and dtype of every weight of a ``VAE(cfg)``, built on the meta device (nothing
    is allocated, so a forged config cannot make us build a huge model)."""
    with torch.device("meta"):
        sd = VAE(cfg).state_dict()
    return {k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}


def _check_weights(weights: dict[str, Any], expected: dict[str, TensorInfo], source: str) -> None:
    """Names, shapes and dtypes of ``weights`` (tensors, or ``TensorInfo`` from an index) against the
    expected ones; finiteness too for real tensors."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected), key=str)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, want in expected.items():
        t = weights[key]
        if not isinstance(t, (torch.Tensor, TensorInfo)):
            raise CheckpointError(f"{source}: weight {key} is a {type(t).__name__}, expected a tensor")
        if tuple(t.shape) != want.shape:
            raise CheckpointError(
                f"{source}: weights do not fit the model config ({key} has shape {list(t.shape)}, "
                f"the config needs {list(want.shape)})"
            )
        dtype = t.dtype if isinstance(t, TensorInfo) else str(t.dtype).removeprefix("torch.")
        if dtype != want.dtype:
            raise CheckpointError(f"{source}: weight {key} is {dtype}, expected {want.dtype}")
        if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: weight {key} has NaN or infinite values")


def model_from_state(state: dict[str, Any], source: str = "checkpoint") -> VAE:
    cfg = _model_config(state, source)
    weights = state.get("state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{source} has no state_dict (expected a dict of tensors)")
    _check_weights(weights, expected_tensors(cfg), source)
    model = VAE(cfg)
    try:
        model.load_state_dict(weights)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"{source}: weights do not fit the model config ({str(exc).splitlines()[0][:200]})"
        ) from None
    return model.eval()


def save_safetensors(
    path: str | os.PathLike,
    model: VAE,
    train_config: TrainConfig | None = None,
    *,
    save_id: str | None = None,
    step: int | None = None,
) -> Path:
    """Write weights as safetensors with the configs as JSON metadata: shareable without pickle.

    ``save_id`` and ``step`` tie it to the ``checkpoint.pt`` of the same save (see ``read_checkpoint``).
    """
    from safetensors.torch import save

    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(to_dict(model.config)),
        "train_config": json.dumps(to_dict(train_config) if train_config is not None else None),
    }
    if save_id is not None:
        meta["save_id"] = save_id
    if step is not None:
        meta["step"] = str(int(step))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(tensors, metadata=meta))
    return Path(path)


def _read_safetensors(path: Path) -> dict[str, Any]:
    """Check the header (bounded), its metadata and the tensor index against the config, and a
    ``checkpoint.pt`` beside it, before reading any tensor data."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    index, meta = read_safetensors_header(path)
    if meta.get("format") != FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file without vae-deploy model metadata")
    try:
        version = int(meta.get("format_version", "1"))
    except ValueError as exc:
        raise CheckpointError(f"{path} has garbled vae-deploy metadata ({str(exc)[:160]})") from None
    garbled = f"{path} has garbled vae-deploy metadata: its"
    model_config = loads_bounded(meta["model_config"], f"{garbled} model_config")
    tc = loads_bounded(meta.get("train_config") or "null", f"{garbled} train_config")
    state = {
        "format": FORMAT,
        "format_version": version,
        "model_config": model_config,
        "train_config": tc,
        "state_dict": index,
    }
    _check_state(state, path)
    _check_weights(index, expected_tensors(_model_config(state, path)), str(path))
    _check_pair(path, meta)
    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc)[:160]})") from None
    step = meta.get("step", "")
    return {
        **state,
        "state_dict": tensors,
        "optimizer": None,
        "epoch": 0,
        "step": int(step) if step.isascii() and step.isdigit() and len(step) < 19 else 0,
        "extra": {},
        "save_id": meta.get("save_id"),
    }


def _check_pair(path: Path, meta: dict[str, str]) -> None:
    """Refuse a ``model.safetensors`` whose ``checkpoint.pt`` beside it is from another save (a run
    killed between the two writes). Files without save ids (older runs) are not compared."""
    sibling = path.with_name(CHECKPOINT_NAME)
    if path.name != SAFETENSORS_NAME or not sibling.is_file() or not meta.get("save_id"):
        return
    try:
        index = read_pt_index(sibling)
    except CheckpointError:
        return  # not a checkpoint we can read: nothing to compare with
    other = index.state if index is not None and isinstance(index.state, dict) else {}
    if other.get("save_id") and other["save_id"] != meta["save_id"]:
        raise CheckpointError(
            f"{path} and {sibling} are from different saves (step {meta.get('step', '?')} vs "
            f"{other.get('step', '?')}; a run was killed between writing them): load {sibling}, "
            "or --resume the run to write both again"
        )


def load_checkpoint(path: str | os.PathLike) -> VAE:
    """Load a checkpoint (``.pt`` or ``.safetensors``) into a ``VAE`` in eval mode (on CPU)."""
    return model_from_state(read_checkpoint(path), str(path))


def checkpoint_configs(state: dict[str, Any]) -> tuple[ModelConfig, TrainConfig | None]:
    """The model and train configs of a checkpoint dict; ``CheckpointError`` if either is invalid."""
    mc = _model_config(state, "checkpoint")
    tc = state.get("train_config")
    try:
        return mc, (train_config_from_dict(tc) if tc else None)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint has no valid train config: {exc}") from None

"""Model and training configuration: plain dataclasses, loadable from TOML recipes.

A recipe (``train/*.toml``) has a ``[model]`` table and a ``[train]`` table whose keys are the
fields below; command-line options override recipe values.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from vae_deploy.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ARCHS = ("mlp", "conv", "resconv")
ACTIVATIONS = ("relu", "tanh", "silu")
LOSSES = ("bce", "mse", "l1")
DATASETS = ("mnist", "fashion-mnist", "synthetic", "folder", "cifar10", "celeba", "digits")
# Datasets whose images have one size; the others (folder, celeba, synthetic) are made to fit the
# model's image_shape. A recipe or command line that names one of these and no image_shape gets it.
NATIVE_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "digits": (1, 8, 8),
}
DEVICES = ("auto", "cpu", "cuda")  # training devices and runtime providers alike


# Bounds that keep a config (from a recipe, the command line or a checkpoint) buildable: sizes fit
# int32, at most 64 layers, images of at most 2**31 values. Bigger is refused, not attempted.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 64
MAX_COUNT = 2**62  # epochs, steps, limits: anything above cannot be meant and overflows torch
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a VAE. ``image_shape`` is (channels, height, width).

    ``conv_channels`` are the channels after each stride-2 step of the ``conv`` and ``resconv``
    encoders (the decoders mirror them); ``res_blocks`` is the number of residual blocks per
    resolution in ``resconv``.
    """

    arch: str = "mlp"
    latent_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    activation: str = "relu"
    conv_channels: tuple[int, ...] = (32, 64)
    image_shape: tuple[int, int, int] = (1, 28, 28)
    res_blocks: int = 1

    def __post_init__(self) -> None:
        _check_types(self)
        _choice(self, "arch", ARCHS)
        _choice(self, "activation", ACTIVATIONS)
        _in_range(self, "latent_dim", 1, MAX_SIZE)
        _in_range(self, "res_blocks", 0, MAX_LAYERS)
        for name in ("hidden", "conv_channels"):
            sizes = getattr(self, name)
            if len(sizes) > MAX_LAYERS or any(not 1 <= s <= MAX_SIZE for s in sizes):
                raise ConfigError(f"{name} must be at most {MAX_LAYERS} sizes in 1..{MAX_SIZE}, got {_show(sizes)}")
        if self.arch == "mlp" and not self.hidden:
            raise ConfigError(f"hidden must be a non-empty list of positive sizes, got {self.hidden}")
        if self.arch in ("conv", "resconv") and not self.conv_channels:
            raise ConfigError("conv_channels must be a non-empty list of positive channel counts")
        c, h, w = self.image_shape
        if min(self.image_shape) < 1 or c * h * w > MAX_SIZE:
            raise ConfigError(f"image_shape must be (C, H, W) of at most {MAX_SIZE} values, got {self.image_shape}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data and output settings of one training run."""

    dataset: str = "mnist"
    data_root: str | None = None
    download: bool = False
    binarize: bool = False
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    loss: str = "bce"
    beta: float = 1.0
    alpha: float = 1.0
    weight_decay: float = 0.0
    decoder_weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    out: str = "runs/default"
    max_steps: int | None = None
    train_limit: int | None = None
    val_limit: int | None = None
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _choice(self, "loss", LOSSES)
        _choice(self, "dataset", DATASETS)
        _choice(self, "device", ("auto", "cpu", "cuda"))
        for name in ("epochs", "batch_size", "max_steps", "train_limit", "val_limit"):
            _in_range(self, name, 1, MAX_COUNT)
        _in_range(self, "checkpoint_every", 0, MAX_COUNT)
        _in_range(self, "seed", 0, MAX_SEED)
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        for name in ("beta", "alpha", "weight_decay", "decoder_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.out:
            raise ConfigError("out must name a folder, got an empty string")
        for name in ("out", "data_root"):
            if "\x00" in (getattr(self, name) or ""):
                raise ConfigError(f"{name} must be a path, got one with a NUL character")


# --- strict, type-driven checks -------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", type(None): "None"}
    names.update({list: "a list", tuple: "a list", dict: "a table"})
    return names.get(type(value), f"a {type(value).__name__}")


def _expected(hint: Any) -> str:
    """How a field's type reads in an error message."""
    if hint is bool:
        return "a boolean (true or false)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "a string"
    if get_origin(hint) is tuple:
        args = get_args(hint)
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}integers"
    options = [a for a in get_args(hint) if a is not type(None)]
    return " or ".join(_expected(a) for a in options) + " (or left out)"


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` as field ``name`` of type ``hint`` wants it, or ConfigError. Nothing is guessed:
    ``"false"`` is not a boolean, ``True`` and ``"3"`` are not integers (floats accept integers)."""
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        try:
            return _coerce(name, inner, value)
        except ConfigError:
            pass
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        args = get_args(hint)
        if isinstance(value, (list, tuple)) and (args[-1] is Ellipsis or len(value) == len(args)):
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return tuple(int(v) for v in value)
    else:  # pragma: no cover - a field type this parser does not know
        raise TypeError(f"no rule for field {name} of type {hint}")
    raise ConfigError(f"{name} must be {_expected(hint)}, got {_show(value)} ({_kind(value)})")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _check_types(cfg: Any) -> None:
    """Check (and normalise: lists to tuples, ints to floats) every field against its declared type."""
    hints = _hints(type(cfg))
    for f in fields(cfg):
        object.__setattr__(cfg, f.name, _coerce(f.name, hints[f.name], getattr(cfg, f.name)))


def _choice(cfg: Any, name: str, options: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in options:
        raise ConfigError(f"{name} must be one of {options}, got {getattr(cfg, name)!r}")


def _in_range(cfg: Any, name: str, low: int, high: int) -> None:
    value = getattr(cfg, name)
    if value is None or low <= value <= high:
        return
    if value > high:
        raise ConfigError(f"{name} must be at most {high}, got {_show(value)}")
    what = "a positive integer" if low == 1 else f"an integer >= {low}"
    raise ConfigError(f"{name} must be {what}, got {_show(value)}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table of settings, got {_kind(values)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ConfigError(f"unknown key(s) {_show(unknown, 120)} in {where}; expected some of {sorted(known)}")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"bad value in {where}: {exc}") from None


def recipe_names() -> list[str]:
    """The recipes shipped with vae-deploy (``train/*.toml`` in the repository), by name."""
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("vae_deploy.recipes").iterdir() if p.name.endswith(".toml"))


def find_recipe(path: str | Path) -> Path:
    """A recipe file: ``path`` itself when it exists, else a shipped recipe of that name
    (``mlp400_beta`` or ``mlp400_beta.toml``), so recipes work by name after ``pip install``."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    from importlib.resources import as_file, files

    shipped = files("vae_deploy.recipes") / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if not shipped.is_file():
        return path
    with as_file(shipped) as real:  # a real path for an installed (not zipped) package
        return Path(real)


def load_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a TOML recipe into raw ``(model, train)`` dicts (validated later, after overrides)."""
    path = find_recipe(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"model", "train"})
    if extra:
        raise ConfigError(f"recipe {path} has unknown table(s) {extra}; expected [model] and [train]")
    tables = [data.get(name, {}) for name in ("model", "train")]
    for name, table in zip(("model", "train"), tables):
        if not isinstance(table, dict):
            raise ConfigError(f"recipe {path}: [{name}] must be a table, got {_kind(table)}")
    return dict(tables[0]), dict(tables[1])


def make_configs(
    model: dict[str, Any] | None = None, train: dict[str, Any] | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """Validate raw dicts into configs, naming the offending key on error.

    A model without an ``image_shape`` gets its dataset's (see :data:`NATIVE_SHAPES`); ``folder``
    and ``celeba`` images are resized to the shape asked for, so they need one.
    """
    train_cfg = _build(TrainConfig, train or {}, "[train]")
    model = model or {}
    if isinstance(model, dict) and "image_shape" not in model:
        if train_cfg.dataset in NATIVE_SHAPES:
            model = {**model, "image_shape": NATIVE_SHAPES[train_cfg.dataset]}
        elif train_cfg.dataset in ("folder", "celeba"):
            raise ConfigError(
                f"bad value in [model]: image_shape is needed for dataset {train_cfg.dataset}, whose images are "
                "resized to it (--image-shape C,H,W or image_shape = [C, H, W]; e.g. 3,64,64)"
            )
    return _build(ModelConfig, model, "[model]"), train_cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/pickle-safe dict (tuples become lists) for checkpoints and manifests."""
    out = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from a plain dict (a checkpoint's or manifest's), strictly typed."""
    return _build(ModelConfig, values, "model config")


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from a plain dict (a checkpoint's), strictly typed."""
    return _build(TrainConfig, values, "train config")


__all__ = [
    "MAX_LAYERS",
    "MAX_SIZE",
    "ModelConfig",
    "TrainConfig",
    "load_recipe",
    "make_configs",
    "model_config_from_dict",
    "train_config_from_dict",
    "to_dict",
]

"""Model and training configuration: plain dataclasses, loadable from TOML recipes.

A recipe (``train/*.toml``) has a ``[model]`` table and a ``[train]`` table whose keys are the
fields below; command-line options override recipe values.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vae_deploy.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ARCHS = ("mlp", "conv")
ACTIVATIONS = ("relu", "tanh")
LOSSES = ("bce", "mse", "l1")
DATASETS = ("mnist", "fashion-mnist", "synthetic")
DEVICES = ("auto", "cpu", "cuda")  # training devices and runtime providers alike


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a VAE. ``image_shape`` is (channels, height, width)."""

    arch: str = "mlp"
    latent_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    activation: str = "relu"
    conv_channels: tuple[int, ...] = (32, 64)
    image_shape: tuple[int, int, int] = (1, 28, 28)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if int(self.latent_dim) < 1:
            raise ConfigError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if self.arch == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ConfigError(f"hidden must be a non-empty list of positive sizes, got {self.hidden}")
        if self.arch == "conv" and (not self.conv_channels or min(self.conv_channels) < 1):
            raise ConfigError("conv_channels must be a non-empty list of positive channel counts")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ConfigError(f"image_shape must be (C, H, W), got {self.image_shape}")


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
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not float(self.lr) > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        for name in ("beta", "alpha", "weight_decay", "decoder_weight_decay"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(known)}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. int("x") for latent_dim = "x"
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
    return dict(data.get("model", {})), dict(data.get("train", {}))


def make_configs(
    model: dict[str, Any] | None = None, train: dict[str, Any] | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """Validate raw dicts into configs, naming the offending key on error."""
    return _build(ModelConfig, model or {}, "[model]"), _build(TrainConfig, train or {}, "[train]")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/pickle-safe dict (tuples become lists) for checkpoints and manifests."""
    out = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    return _build(ModelConfig, dict(values), "model config")


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, dict(values), "train config")


__all__ = [
    "ModelConfig",
    "TrainConfig",
    "load_recipe",
    "make_configs",
    "model_config_from_dict",
    "train_config_from_dict",
    "to_dict",
]

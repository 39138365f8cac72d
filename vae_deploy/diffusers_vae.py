"""diffusers VAEs (``AutoencoderKL``, ``AutoencoderTiny``) from a local folder: found, recorded
with their hashes, loaded, and rebuilt for verify.

A VAE folder holds ``config.json`` (its ``_class_name`` names the class) and the weights
(``diffusion_pytorch_model.safetensors``, or ``.bin``); a pipeline folder (``model_index.json``)
holds one in ``vae/``. diffusers is an optional extra (``pip install 'vae-deploy[diffusers]'``),
imported here only, on use.

Conventions (what the exported graphs take and give, recorded in the contract): diffusers'
``AutoencoderKL`` and ``AutoencoderTiny`` both take and give images in [-1, 1] (the Tiny one
rescales to TAESD's own [0, 1] inside its encoder and decoder), and ``decode`` takes unscaled
latents: a diffusion pipeline's latents convert as ``z = latents / scaling_factor + shift_factor``.
The KL encoder exports ``latent_dist.mean`` and ``.logvar`` (clamped to [-30, 20] as diffusers
does); the Tiny encoder its latents (no logvar).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vae_deploy.adapters import Method, Rebuilt
from vae_deploy.errors import ExportError, IntegrityError
from vae_deploy.files import read_json, sha256_file

SUPPORTED = ("AutoencoderKL", "AutoencoderTiny")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
VALUE_RANGE = (-1.0, 1.0)  # what vae.encode takes and vae.decode gives, for both classes
ENCODER_OUTPUT = {"AutoencoderKL": "mean-logvar", "AutoencoderTiny": "latents"}
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class VaeFolder:
    """A diffusers VAE on disk: its folder, class, config and weights file."""

    folder: Path
    class_name: str
    config: dict[str, Any]
    weights: Path

    @property
    def downsampling_factor(self) -> int:
        """Image size / latent size, from the config (each block but the last halves the size)."""
        c = self.config
        if self.class_name == "AutoencoderTiny":
            return 2 ** (len(c.get("encoder_block_out_channels", (64, 64, 64, 64))) - 1)
        return 2 ** (len(c.get("block_out_channels", (64,))) - 1)

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 3))

    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor") or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(self.config.get("shift_factor") or 0.0)


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a diffusers model folder (a config.json naming its ``_class_name``) or a
    pipeline folder (model_index.json); a training run's folder (our config.json) is not."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "model_index.json").is_file():
        return True
    try:
        return "_class_name" in _read_config(p / "config.json")
    except (ExportError, OSError):
        return False


def find_vae(path: str | os.PathLike) -> VaeFolder:
    """The VAE in a diffusers VAE folder, or in the ``vae/`` subfolder of a pipeline folder."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder (expected a diffusers VAE folder with config.json)")
    folder = path
    if not (path / "config.json").is_file() and (path / "model_index.json").is_file():
        folder = path / "vae"
        if not (folder / "config.json").is_file():
            raise ExportError(f"{path} is a diffusers pipeline folder without a vae/ subfolder holding config.json")
    config = _read_config(folder / "config.json")
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED:
        hint = " (a pipeline folder? it has no model_index.json)" if class_name else ""
        raise ExportError(
            f"{folder / 'config.json'} is a {class_name or 'model without _class_name'}{hint}; supported "
            f"diffusers VAEs: {', '.join(SUPPORTED)} (other VAEs export with --factory pkg.module:build)"
        )
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        have = ", ".join(sorted(p.name for p in folder.iterdir())[:8])
        raise ExportError(f"{folder} has no {' or '.join(WEIGHT_FILES)} (it holds {have})")
    return VaeFolder(folder, class_name, config, weights)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ExportError(f"{path} is not a readable JSON config ({type(exc).__name__})") from None
    except ValueError as exc:
        raise ExportError(f"{path} {exc}: not a readable JSON config") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a diffusers config (expected a JSON object)")
    return data


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers logs (e.g. that accelerate is missing) and warns on load; keep that out of output."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def load(vae: VaeFolder) -> Any:
    """The eager model (eval mode, no tiling or slicing), loaded by diffusers from the folder."""
    import diffusers

    cls = getattr(diffusers, vae.class_name)
    with _quiet_diffusers():
        try:
            model = cls.from_pretrained(str(vae.folder), local_files_only=True, low_cpu_mem_usage=False)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many types for bad folders
            text = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"diffusers cannot load {vae.folder} as {vae.class_name}: {text}") from None
    for off in ("disable_tiling", "disable_slicing"):
        if callable(getattr(model, off, None)):
            getattr(model, off)()
    return model.eval().float()


def graphs(model: Any) -> tuple[Method, Method]:
    """(encoder, decoder): ``vae.encode`` and ``vae.decode`` as modules."""
    return Method(model, "encode"), Method(model, "decode")


def source_record(vae: VaeFolder, out: str | os.PathLike) -> dict[str, Any]:
    """The manifest's ``source``: the folder (relative to the export folder, and absolute), its
    class, and the sha256s of its config and weights (checked again before verify loads it)."""
    import diffusers

    return {
        "kind": "diffusers",
        "class": vae.class_name,
        "path": os.path.relpath(vae.folder.resolve(), Path(out).resolve()),
        "abs_path": str(vae.folder.resolve()),
        "config_sha256": sha256_file(vae.folder / "config.json"),
        "weights": vae.weights.name,
        "sha256": sha256_file(vae.weights),
        "diffusers_version": diffusers.__version__,
    }


def rebuild(source: dict[str, Any], export_dir: Path, override: str | os.PathLike | None = None) -> Rebuilt:
    """The eager VAE of an export's recorded source: found relative to the export folder (else at
    its absolute path), its config and weights still the recorded ones; or ``override``."""
    if override is not None:
        vae = find_vae(override)
        same = sha256_file(vae.weights) == source.get("sha256")
        note = "" if same else f"note: {vae.folder} is not the VAE this export was made from (weights differ)"
        return Rebuilt(*graphs(load(vae)), str(vae.folder), note)
    candidates = [export_dir / str(source.get("path", "")), Path(str(source.get("abs_path", "")))]
    folder = next((p for p in candidates if str(p) and (p / "config.json").is_file()), None)
    if folder is None:
        raise ExportError(
            f"the diffusers VAE this export was made from ({candidates[1]}) is not there; "
            "pass --checkpoint FOLDER to verify against another copy"
        )
    vae = find_vae(folder)
    changed = [
        name
        for name, path, want in (
            ("config.json", vae.folder / "config.json", source.get("config_sha256")),
            (vae.weights.name, vae.weights, source.get("sha256")),
        )
        if sha256_file(path) != want
    ]
    if changed:
        raise IntegrityError(
            f"{', '.join(changed)} in {vae.folder} changed since this export was made (sha256 differs from the "
            "manifest's); re-export, or pass --checkpoint FOLDER to compare against it anyway"
        )
    return Rebuilt(*graphs(load(vae)), str(vae.folder))

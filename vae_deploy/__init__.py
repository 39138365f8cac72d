"""vae-deploy: train VAEs in PyTorch, export encoder/decoder graphs, verify parity, run on ORT.

``import vae_deploy`` and ``from vae_deploy import VAERuntime`` do not import torch: the runtime
needs only onnxruntime and numpy. The torch side (models, training, export) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VAERuntime": "vae_deploy.runtime",
    "VAE": "vae_deploy.model",
    "Encoder": "vae_deploy.model",
    "Decoder": "vae_deploy.model",
    "ModelConfig": "vae_deploy.config",
    "TrainConfig": "vae_deploy.config",
    "load_checkpoint": "vae_deploy.checkpoint",
    "save_checkpoint": "vae_deploy.checkpoint",
    "train": "vae_deploy.training",
    "export": "vae_deploy.export",
    "export_modules": "vae_deploy.export_modules",
    "verify": "vae_deploy.parity",
    "encode_dataset": "vae_deploy.encode",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vae_deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__

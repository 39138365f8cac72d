"""FLOPs per sample of an encoder or decoder, counted on the ``meta`` device (torch): from the model
config for our models, from the eager module for any other VAE."""

from __future__ import annotations

from typing import Any

from vae_deploy.config import ModelConfig
from vae_deploy.contract import DECODER, ENCODER
from vae_deploy.errors import UsageError

GRAPHS = (DECODER, ENCODER)  # the graphs bench can time, the default first


def flops_per_sample(cfg: ModelConfig, graph: str = DECODER) -> int:
    """FLOPs of one sample through the encoder or decoder: 2 x MACs of Linear/Conv2d/ConvTranspose2d.

    Shapes come from running the module once on the ``meta`` device (no memory, no arithmetic),
    so any architecture the config describes is counted the same way. Biases and activations are
    not counted.
    """
    import torch

    from vae_deploy.model import VAE

    if graph not in GRAPHS:
        raise UsageError(f"graph must be one of {GRAPHS}, got {graph!r}")
    with torch.device("meta"):
        model = VAE(cfg)
    shape = (cfg.latent_dim,) if graph == DECODER else tuple(cfg.image_shape)
    return module_flops(getattr(model, graph), shape)


def module_flops(module: Any, shape: tuple[int, ...]) -> int:
    """FLOPs of one input of ``shape`` through any module, counted the same way: 2 x MACs of its
    Linear/Conv2d/ConvTranspose2d layers on the ``meta`` device (a copy, if the module has weights;
    attention's own matmuls, as in diffusers' VAEs, are not counted)."""
    import copy

    import torch
    from torch import nn

    if any(p.device.type != "meta" for p in module.parameters()):
        module = copy.deepcopy(module).to("meta")
    total = 0

    def count(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * output.numel()
        elif isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += 2 * (mod.in_channels // mod.groups) * kh * kw * output.numel()
        elif isinstance(mod, nn.ConvTranspose2d):  # every input pixel scatters a k x k x C_out patch
            kh, kw = mod.kernel_size
            total += 2 * inputs[0].numel() * (mod.out_channels // mod.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    try:
        with torch.no_grad():
            module(torch.empty(1, *shape, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return int(total)

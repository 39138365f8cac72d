"""Any PyTorch encoder and decoder as the contract's two graphs.

An encoder may return ``(mu, logvar)``, one tensor of stacked parameters ``[N, 2c, ...]`` (mean
first), or latents alone (no logvar); also diffusers' output objects (``.latent_dist`` with
``.mean``/``.logvar``, ``.latents``) and distribution-like objects. A decoder returns images, or
an object with ``.sample``, or a tuple whose first item is the images. ``EncoderGraph`` and
``DecoderGraph`` turn them into plain tensors so every exporter, verify and bench see the same
graph: ``x -> mu[, logvar]`` and ``z -> x_hat``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vae_deploy.errors import ExportError

ENCODER_OUTPUTS = ("auto", "mean-logvar", "stacked", "latents")


class Method(nn.Module):
    """``owner.<method>(x)`` as a module (e.g. a VAE's ``encode``), keeping ``owner``'s parameters."""

    def __init__(self, owner: nn.Module, method: str) -> None:
        super().__init__()
        if not callable(getattr(owner, method, None)):
            raise ExportError(f"{type(owner).__name__} has no {method}() method")
        self.owner, self.method = owner, method

    def forward(self, x: Tensor) -> Any:
        return getattr(self.owner, self.method)(x)


def split(vae: Any) -> tuple[nn.Module | None, nn.Module]:
    """(encoder, decoder) modules from what a user hands over: a pair ``(encoder, decoder)`` (the
    encoder may be None), a dict with those keys, or one module with ``encode`` and ``decode``."""
    if isinstance(vae, dict):
        vae = (vae.get("encoder"), vae.get("decoder"))
    if isinstance(vae, (tuple, list)) and len(vae) == 2:
        encoder, decoder = vae
    elif isinstance(vae, nn.Module) and callable(getattr(vae, "decode", None)):
        encoder = Method(vae, "encode") if callable(getattr(vae, "encode", None)) else None
        decoder = Method(vae, "decode")
    else:
        raise ExportError(
            f"expected (encoder, decoder) modules or a module with encode() and decode(); got {type(vae).__name__}"
        )
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        if not (module is None and name == "encoder") and not isinstance(module, nn.Module):
            raise ExportError(f"the {name} must be a torch.nn.Module, got {type(module).__name__}")
    return encoder, decoder


def unwrap_encoding(out: Any) -> Tensor | tuple[Tensor, Tensor]:
    """An encoder's output as one tensor (ambiguous: latents or stacked) or (mean, logvar)."""
    if hasattr(out, "latent_dist"):  # diffusers AutoencoderKLOutput
        out = out.latent_dist
    if isinstance(out, Tensor):
        return out
    for mean, logvar in (("mean", "logvar"), ("mu", "logvar")):
        if isinstance(getattr(out, mean, None), Tensor) and isinstance(getattr(out, logvar, None), Tensor):
            return getattr(out, mean), getattr(out, logvar)
        if isinstance(out, dict) and isinstance(out.get(mean), Tensor) and isinstance(out.get(logvar), Tensor):
            return out[mean], out[logvar]
    if isinstance(getattr(out, "latents", None), Tensor):  # diffusers AutoencoderTinyOutput
        return out.latents
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, Tensor) for t in out[:2]):
        return out[0] if len(out) == 1 else (out[0], out[1])
    raise ExportError(
        f"the encoder returned {type(out).__name__}; expected (mu, logvar), a tensor of stacked "
        "[mean, logvar] channels, or latents"
    )


def encoder_kind(out: Any, declared: str = "auto") -> str:
    """ "mean-logvar", "latents" or, for one ambiguous tensor, "auto" (the caller decides by
    decoding it); a declared kind must fit what the encoder returns."""
    if declared not in ENCODER_OUTPUTS:
        raise ExportError(f"encoder_output must be one of {', '.join(ENCODER_OUTPUTS)}, got {declared!r}")
    got = unwrap_encoding(out)
    if isinstance(got, tuple):
        structural = "mean-logvar"
    else:  # one tensor: latents if the output object says so, else ambiguous
        structural = "latents" if isinstance(getattr(out, "latents", None), Tensor) else "auto"
    if declared == "auto":
        return structural
    if (declared == "mean-logvar") != isinstance(got, tuple):
        want = "two tensors (mu, logvar)" if declared == "mean-logvar" else "one tensor"
        raise ExportError(f"encoder_output={declared!r} but the encoder returns {type(out).__name__}, not {want}")
    if declared == "stacked" and (got.dim() < 2 or got.shape[1] % 2):
        raise ExportError(f"encoder_output='stacked' needs an even channel count on axis 1, got {list(got.shape)}")
    return declared


class EncoderGraph(nn.Module):
    """images -> ``(mu, logvar)`` (kind "mean-logvar" or "stacked") or ``mu`` (kind "latents")."""

    def __init__(self, encoder: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in ENCODER_OUTPUTS[1:]:
            raise ExportError(f"encoder kind must be one of {ENCODER_OUTPUTS[1:]}, got {kind!r}")
        self.encoder, self.kind = encoder, kind

    @property
    def has_logvar(self) -> bool:
        return self.kind != "latents"

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = unwrap_encoding(self.encoder(x))
        if self.kind == "mean-logvar":
            return out
        if isinstance(out, tuple):
            raise ExportError("the encoder returned (mu, logvar) where one tensor was expected")
        if self.kind == "stacked":
            mu, logvar = out.chunk(2, dim=1)
            return mu, logvar
        return out


class DecoderGraph(nn.Module):
    """latents -> images, whatever wrapper the decoder returns them in."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: Tensor) -> Tensor:
        return images_of(self.decoder(z))


def images_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "sample", None), Tensor):  # diffusers DecoderOutput
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ExportError(f"the decoder returned {type(out).__name__}; expected images (a tensor)")


def outputs(graph: Callable[[Tensor], Any], x: Tensor) -> tuple[Tensor, ...]:
    """A graph's outputs as a tuple (one tensor or several)."""
    out = graph(x)
    return out if isinstance(out, tuple) else (out,)


@dataclass
class Rebuilt:
    """An eager VAE rebuilt from an export's recorded source: its raw encoder (None for a
    decoder-only export) and decoder, where it came from, and a note when it is not the very
    model that was exported (an override)."""

    encoder: nn.Module | None
    decoder: nn.Module
    where: str
    note: str = ""

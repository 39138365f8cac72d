"""A VAE built by the user's own code: a factory ``pkg.module:build`` (or ``path/to/file.py:build``)
called with no arguments, and a weights file loaded into what it returns.

The factory returns ``(encoder, decoder)`` modules (the encoder may be None), a dict with those
keys, or one module with ``encode()`` and ``decode()`` methods. Weights (``.safetensors``, or a
``.pt``/``.pth``/``.bin`` state dict, read with ``weights_only=True``) are loaded with
``strict=True`` into the module, or into ``{"encoder": ..., "decoder": ...}`` for a pair (keys
``encoder.*``, ``decoder.*``). Without weights the factory's own initialisation is what is exported.
``pkg.module`` is imported with the current folder first on ``sys.path`` (as ``python -m`` does).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae_deploy.adapters import Rebuilt, split
from vae_deploy.errors import ExportError, IntegrityError, UsageError, first_line
from vae_deploy.files import sha256_file


def parse(spec: str) -> tuple[str, str]:
    """``pkg.module:build`` or ``path/file.py:build`` -> (module or path, attribute)."""
    target, sep, attr = str(spec).rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise UsageError(f"--factory must be 'pkg.module:function' or 'path/to/file.py:function', got {spec!r}")
    return target, attr


def is_file_spec(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def load_callable(spec: str) -> tuple[Any, Path | None]:
    """The factory function and, for a module loaded from a file, that file."""
    target, attr = parse(spec)
    path = None
    try:
        if is_file_spec(target):
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"factory file {path} does not exist")
            name = f"vae_deploy_factory_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look their module up there
            module_spec.loader.exec_module(module)
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(target)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
            path = Path(module.__file__) if getattr(module, "__file__", None) else None
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything on import
        raise ExportError(f"cannot import the factory {target!r}: {type(exc).__name__}: {first_line(exc)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ExportError(f"{target} has no function {attr!r}")
    return fn, path


def read_state(weights: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a safetensors file or a torch state dict file (weights only)."""
    if not weights.is_file():
        raise UsageError(f"weights file {weights} does not exist")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files
        raise ExportError(f"cannot read weights from {weights}: {type(exc).__name__}: {first_line(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{weights} does not hold a state dict (name -> tensor)")
    return state


def build(spec: str, weights: str | os.PathLike | None = None) -> tuple[nn.Module | None, nn.Module]:
    """(encoder, decoder) from the factory, with ``weights`` loaded (strict) if given."""
    fn, _ = load_callable(spec)
    try:
        made = fn()
    except Exception as exc:  # noqa: BLE001 - user code
        raise ExportError(f"the factory {spec} failed: {type(exc).__name__}: {first_line(exc)}") from None
    encoder, decoder = split(made)
    if weights is not None:
        root = made if isinstance(made, nn.Module) else nn.ModuleDict(
            {k: m for k, m in (("encoder", encoder), ("decoder", decoder)) if m is not None}
        )  # fmt: skip
        result = root.load_state_dict(read_state(Path(weights)), strict=False)
        if result.missing_keys or result.unexpected_keys:
            parts = [
                f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
                if keys
            ]
            raise ExportError(f"{weights} does not fit the model {spec} builds: {'; '.join(parts)}")
    return encoder, decoder


def source_record(spec: str, weights: str | os.PathLike | None, out: str | os.PathLike) -> dict[str, Any]:
    """The manifest's ``source``: the factory, its code file's sha256, and the weights file
    (relative to the export folder and absolute) with its sha256."""
    _, code = load_callable(spec)
    target, attr = parse(spec)
    out = Path(out).resolve()
    record: dict[str, Any] = {"kind": "factory", "factory": spec}
    if is_file_spec(target) and code is not None:
        record["factory"] = f"{os.path.relpath(code.resolve(), out)}:{attr}"
        record["factory_abs"] = f"{code.resolve()}:{attr}"
    if code is not None:
        record["code_sha256"] = sha256_file(code)
    if weights is not None:
        w = Path(weights)
        record.update(weights=os.path.relpath(w.resolve(), out), abs_path=str(w.resolve()), sha256=sha256_file(w))
    return record


def rebuild(source: dict[str, Any], export_dir: Path, override: str | os.PathLike | None = None) -> Rebuilt:
    """The eager VAE of a factory source: the factory imported again, the recorded weights (still
    the same bytes) or ``override`` loaded into it."""
    spec = str(source.get("factory", ""))
    target, attr = parse(spec)
    if is_file_spec(target) and not Path(target).is_absolute():
        local = export_dir / target
        spec = f"{local}:{attr}" if local.is_file() else str(source.get("factory_abs", spec))
    note = ""
    _, code = load_callable(spec)
    if code is not None and source.get("code_sha256") and sha256_file(code) != source["code_sha256"]:
        note = f"note: the factory's code ({code}) changed since this export was made"
    weights = None
    if override is not None:
        weights = Path(override)
        if weights.is_file() and sha256_file(weights) != source.get("sha256"):
            note = f"note: {weights} is not the weights file this export was made from (sha256 differs)"
    elif source.get("sha256"):
        candidates = [export_dir / str(source.get("weights", "")), Path(str(source.get("abs_path", "")))]
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise ExportError(f"the weights this export was made from ({candidates[1]}) are not there; "
                              "pass --checkpoint WEIGHTS")  # fmt: skip
        if sha256_file(weights) != source["sha256"]:
            raise IntegrityError(
                f"{weights} has changed since this export was made (its sha256 differs from the manifest's); "
                "re-export it, or pass --checkpoint to compare against it anyway"
            )
    encoder, decoder = build(spec, weights)
    return Rebuilt(encoder, decoder, f"{spec} with {weights or 'its own initialisation'}", note)

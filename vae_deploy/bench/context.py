"""What every backend is built from: the checked export folder, the graph, the eager checkpoint,
a temporary folder, and the one seeded input per batch size. ``Backend`` is what a factory returns."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vae_deploy.contract import DECODER, FileEntry, Manifest
from vae_deploy.errors import ExportError, UsageError
from vae_deploy.files import sha256_file
from vae_deploy.manifest import listed_path, read_verified, source_checkpoint
from vae_deploy.runtime import VAERuntime


class Unavailable(Exception):
    """A backend cannot run on this machine or with this export; the message says why."""


@dataclass
class Backend:
    """A way to run one graph: ``prepare(x)`` returns a zero-argument step that runs one batch;
    ``threads(batch_size)`` says how (for reports); ``peak`` names the limit it is compared with;
    ``note`` says what exactly runs (reported)."""

    name: str
    prepare: Callable[[np.ndarray], Callable[[], Any]]
    threads: Callable[[int], dict[str, Any]]
    peak: str = "cpu_fp32"
    note: str = ""  # for the report: what exactly runs (which file, which CPU plan)


@dataclass(frozen=True)
class Checkpoint:
    """The eager model's checkpoint, or why there is none; ``note`` when it is not the exported one."""

    path: Path | None
    problem: str | None = None
    note: str | None = None


def find_checkpoint(export_dir: Path, manifest: Manifest, override: str | os.PathLike | None) -> Checkpoint:
    """``override`` (``--checkpoint``) if given, else the export's source checkpoint found as verify
    finds it; a missing or changed source only makes the eager backends unavailable. For a
    diffusers or factory export: the override (a folder or weights file), else its recorded source."""
    if manifest.model.source.get("kind", "checkpoint") != "checkpoint":
        return Checkpoint(Path(override) if override is not None else None)
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise UsageError(f"--checkpoint {path} does not exist")
        recorded = manifest.model.source.get("sha256")
        if recorded and sha256_file(path) != recorded:
            note = "the checkpoint differs from the one this export was made from (timings still comparable)"
            return Checkpoint(path, note=note)
        return Checkpoint(path)
    try:
        return Checkpoint(source_checkpoint(export_dir, manifest))
    except ExportError as exc:  # IntegrityError included: a changed source is not the exported model
        return Checkpoint(None, problem=str(exc))


@dataclass
class Context:
    """One benchmark's export folder (already checked against its manifest), graph and checkpoint."""

    export_dir: Path
    manifest: Manifest
    graph: str
    checkpoint: Checkpoint
    tmp: Path  # removed when the run ends
    image_size: tuple[int, int] | None = None  # where the export takes any height and width
    _loaded: dict[str, Any] = field(default_factory=dict, init=False, repr=False)  # "model", "runtime"

    def entry(self, fmt: str) -> FileEntry:
        """The manifest entry of this graph in format ``fmt`` (Unavailable if the export lacks it)."""
        entry = self.manifest.entry(self.graph, fmt)
        if entry is None:
            have = ", ".join(sorted(self.manifest.formats(self.graph))) or "none"
            hint = " (export with --fp16)" if fmt == "onnx-fp16" else f" (export with --formats ...,{fmt})"
            raise Unavailable(f"the export has no {self.graph} {fmt} file (it has: {have}){hint}")
        return entry

    def path(self, fmt: str, graph: str | None = None) -> Path:
        """The path of a listed file (of this graph unless ``graph`` is given)."""
        entry = self.entry(fmt) if graph is None else self.manifest.entry(graph, fmt)
        if entry is None:
            raise Unavailable(f"the export has no {graph} {fmt} file")
        return listed_path(self.export_dir, entry)

    def model_bytes(self, fmt: str) -> tuple[bytes, str]:
        """(the sha256-checked bytes of this graph's file in ``fmt``, a name for errors)."""
        entry = self.entry(fmt)
        return read_verified(self.export_dir, entry), f"{entry.file} in {self.export_dir}"

    def module(self) -> Any:
        """The eager encoder or decoder (eval mode), loaded once (imports torch): the checkpoint's,
        or for a diffusers or factory export its source rebuilt (hash-checked) as verify does."""
        if "model" not in self._loaded and self.manifest.model.source.get("kind", "checkpoint") != "checkpoint":
            from vae_deploy.references import eager_graphs

            try:
                self._loaded["model"] = eager_graphs(self.export_dir, self.manifest, self.checkpoint.path)
            except ExportError as exc:
                raise Unavailable(str(exc)) from None
            except ModuleNotFoundError as exc:
                raise Unavailable(f"the eager model needs {exc.name}, which is not installed") from None
        if isinstance(self._loaded.get("model"), dict):
            return self._loaded["model"][self.graph]
        if "model" not in self._loaded:
            if self.checkpoint.path is None:
                raise Unavailable(self.checkpoint.problem or "no checkpoint; pass --checkpoint for eager")
            from vae_deploy.checkpoint import load_checkpoint

            self._loaded["model"] = load_checkpoint(self.checkpoint.path)
        return getattr(self._loaded["model"], self.graph)

    def runtime(self) -> VAERuntime:
        """``VAERuntime`` on the CPU for the export folder, opened once."""
        if "runtime" not in self._loaded:
            self._loaded["runtime"] = VAERuntime(self.export_dir, "cpu")
        return self._loaded["runtime"]

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(latent, image) shapes of one sample: fixed ones, or at ``image_size``."""
        model = self.manifest.model
        if model.dynamic_size and self.image_size is None:
            raise UsageError("this export takes any image size: give bench an image_size (height, width)")
        return model.shapes_at(image_size=self.image_size if model.dynamic_size else None)

    def inputs(self, batch: int) -> np.ndarray:
        """The one seeded input every backend gets: z ~ N(0, I) for the decoder, else pixels
        uniform in the model's value range."""
        latent, image = self.shapes()
        rng = np.random.default_rng(batch)
        if self.graph == DECODER:
            return rng.standard_normal((batch, *latent), dtype=np.float32)
        lo, hi = self.manifest.model.value_range
        return (lo + (hi - lo) * rng.random((batch, *image), dtype=np.float32)).astype(np.float32)

"""The documented errors of vae-deploy.

Every failure a user can cause (bad input, bad files, missing data, unavailable providers) is one
of these; the CLI prints its message as one line and exits non-zero. Anything else is a bug.
This module imports nothing heavy so the torch-free runtime can use it.
"""

from __future__ import annotations


class VaeDeployError(Exception):
    """Base class: a user-facing error whose message says what was expected."""

    exit_code = 1

    def __str__(self) -> str:
        return printable(super().__str__())


class UsageError(VaeDeployError, ValueError):
    """Bad arguments or input values (wrong shape, dtype, range, option)."""

    exit_code = 2


class ResourceError(UsageError):
    """A job would need more memory than the machine has (or an absurd amount for its output)."""


class ConfigError(UsageError):
    """A model/training config or recipe is invalid."""


class DataError(VaeDeployError):
    """A dataset is missing or malformed."""


class CheckpointError(VaeDeployError):
    """A checkpoint is missing, corrupt, unsafe, or not a vae-deploy checkpoint."""


class ExportError(VaeDeployError):
    """An export folder is missing, incomplete, tampered with, or failed verification."""


class IntegrityError(ExportError):
    """A file's sha256 does not match the manifest."""


class ParityError(ExportError):
    """An exported graph does not match eager PyTorch within tolerance."""


class OutputDirError(VaeDeployError):
    """An output folder is not ours to write into (it holds someone else's files), or cannot be made."""


class ProviderError(VaeDeployError):
    """An execution provider (e.g. CUDA) was asked for but cannot run; ``reason`` says why."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class TrainingDiverged(VaeDeployError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ServeError(VaeDeployError):
    """A server could not start or deploy (port taken, too few CPUs in the cluster, replicas failing)."""


class ClusterError(VaeDeployError):
    """A cluster engine we run on (Ray) could not be started or joined, or failed a job."""


class MissingExtraError(VaeDeployError):
    """An optional dependency (e.g. torch, matplotlib) is needed for this command."""


# top-level module -> the extra that installs it
EXTRAS = {
    "torch": "torch",
    "torchvision": "torch",
    "onnx": "torch",
    "onnxscript": "torch",
    "onnx_ir": "torch",
    "safetensors": "torch",
    "diffusers": "diffusers",
    "matplotlib": "viz",
    "sklearn": "viz",
    "ray": "ray",
    "fastapi": "ray",
    "starlette": "ray",
    "tritonclient": "triton",
}


def missing_extra(exc: ModuleNotFoundError) -> MissingExtraError | None:
    """The one-line error for a missing optional dependency, or None if ``exc`` is not about one."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return MissingExtraError(f"this needs {top}, which comes with the {extra} extra: pip install 'vae-deploy[{extra}]'")


def printable(text: str) -> str:
    """``text`` safe to print on any UTF-8 stream: undecodable file-name bytes (the lone surrogates
    Python decodes them to) become ``\\xff``-style escapes instead of crashing the write."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that was not a file-name byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line[:limit]

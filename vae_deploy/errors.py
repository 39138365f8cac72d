"""The documented errors of vae-deploy.

Every failure a user can cause (bad input, bad files, missing data, unavailable providers) is one
of these; the CLI prints its message as one line and exits non-zero. Anything else is a bug.
This module imports nothing heavy so the torch-free runtime can use it.
"""

from __future__ import annotations


class VaeDeployError(Exception):
    """Base class: a user-facing error whose message says what was expected."""

    exit_code = 1


class UsageError(VaeDeployError, ValueError):
    """Bad arguments or input values (wrong shape, dtype, range, option)."""

    exit_code = 2


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
    """An execution provider (e.g. CUDA) was asked for but cannot run."""


class TrainingDiverged(VaeDeployError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class MissingExtraError(VaeDeployError):
    """An optional dependency (e.g. matplotlib) is needed for this command."""


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line[:limit]

"""Memory bounds: estimate what a job will allocate and refuse, in one line, what would not fit.

Views and ``evaluate`` estimate their peak memory from their options before doing any work and
call :func:`require_memory`, so a huge option fails at once with our error instead of a raw
allocator failure (or the OOM killer) half-way through. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

from vae_deploy.errors import ResourceError

GIB = 1024**3
DEFAULT_MEMORY = 64 * GIB  # when the platform says nothing: large, so only absurd requests fail
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_physical() -> int | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def _cgroup_headroom() -> int | None:
    """What a container's memory limit still allows (None where there is no limit)."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def _address_space_headroom() -> int | None:
    """What ``ulimit -v`` (RLIMIT_AS) still allows this process (None where there is no limit)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable (/proc/meminfo), else the physical
    memory (sysconf), else a large default; capped by a container's memory limit and by
    ``ulimit -v`` where they are set."""
    found = _meminfo_available() or _sysconf_physical() or DEFAULT_MEMORY
    limits = [h for h in (_cgroup_headroom(), _address_space_headroom()) if h is not None]
    return min([found, *limits])


def gib(nbytes: float) -> str:
    """``nbytes`` as a short GiB figure, e.g. ``0.25 GiB``, ``1.5 GiB``, ``11,921 GiB``."""
    value = nbytes / GIB
    return f"{value:,.0f} GiB" if value >= 100 else f"{value:.3g} GiB"


def require_memory(nbytes: int, what: str, hint: str = "") -> None:
    """Raise a one-line ResourceError (a UsageError) if ``what`` needs more than :func:`available_memory`."""
    free = available_memory()
    if nbytes > free:
        raise ResourceError(f"{what} needs {gib(nbytes)}, more than the {gib(free)} available; {hint}".rstrip("; "))


__all__ = ["available_memory", "gib", "require_memory"]

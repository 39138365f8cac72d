"""Tuned CPU plans, cached per machine and model file: where they live, how they are keyed, and
reading and writing them. onnxruntime + the standard library only (the runtime imports this).

A plan measured on one CPU is not a plan for another: the fastest thread count, spinning and row
chunking differ between, say, a 2-vCPU AMD EPYC and a 2-vCPU Xeon with AMX. So a plan is cached
under a key of

- the CPU: vendor, model name, family/model/stepping (KVM guests often say just "AMD EPYC"), the
  vector/matrix extensions the kernels use, and how many CPUs this process may run on;
- the onnxruntime version (its kernels and thread pool change between releases);
- the model file's sha256 (another graph, or its int8 copy, is another workload).

Plans live in ``$VAE_DEPLOY_CACHE_DIR/plans/`` if that variable is set (tests and CI point it at a
temporary folder), else ``$XDG_CACHE_HOME/vae-deploy/plans/``, else ``~/.cache/vae-deploy/plans/``:
the user's cache, never the export folder (an export is copied between machines; its plan is not).
One JSON file per key, written atomically; a missing, unreadable, foreign or malformed file is a
cache miss, never an error. Deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

from vae_deploy.engines import CpuPlan, cpu_count
from vae_deploy.errors import UsageError
from vae_deploy.files import atomic_write, read_json

CACHE_ENV = "VAE_DEPLOY_CACHE_DIR"
PLAN_FORMAT = "vae-deploy-cpu-plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 1 << 20  # a plan file is a few KB
# the CPU features that change which kernels onnxruntime (MLAS) and oneDNN run
KERNEL_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
    "bf16",
)


def cache_dir() -> Path:
    """The folder tuned plans are cached in (see the module doc for how it is chosen)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser() / "plans"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "vae-deploy" / "plans"


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none); read once."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", ...)."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def cpu_flags(wanted: tuple[str, ...] = KERNEL_FLAGS) -> list[str]:
    """Those of ``wanted`` that the CPU has (x86 ``flags`` or Arm ``Features``)."""
    info = _cpuinfo()
    have = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in wanted if f in have]


def cpu_identity() -> dict[str, Any]:
    """What identifies this CPU for a plan: see the module doc."""
    info = _cpuinfo()
    return {
        "vendor": info.get("vendor_id") or info.get("CPU implementer") or platform.machine(),
        "model": cpu_model(),
        "family": info.get("cpu family", ""),
        "model_id": info.get("model") or info.get("CPU part", ""),
        "stepping": info.get("stepping") or info.get("CPU variant", ""),
        "flags": cpu_flags(),
        "cpus": cpu_count(),
    }


def plan_key(model_sha256: str) -> dict[str, Any]:
    """The cache key of a model file's plan on this machine."""
    return {"cpu": cpu_identity(), "onnxruntime": ort.__version__, "model_sha256": model_sha256}


def plan_path(key: dict[str, Any]) -> Path:
    """The cache file of a key: ``<model sha256[:16]>-<digest of the rest[:16]>.json``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{key['model_sha256'][:16]}-{digest[:16]}.json"


@dataclass(frozen=True)
class CachedPlan:
    """A plan read from (or just written to) the cache, with what the tuner measured."""

    plan: CpuPlan
    path: Path
    created: str = ""
    details: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def load_plan(model_sha256: str) -> CachedPlan | None:
    """The cached plan of a model file on this machine, or None (a bad file counts as none)."""
    key = plan_key(model_sha256)
    path = plan_path(key)
    try:
        data = read_json(path, MAX_PLAN_BYTES)
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION or data.get("key") != key:
            return None
        return CachedPlan(CpuPlan.from_dict(data["plan"]), path, str(data.get("created", "")), data.get("details", {}))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UsageError):
        return None


def save_plan(model_sha256: str, plan: CpuPlan, details: dict[str, Any] | None = None) -> CachedPlan:
    """Cache a plan for a model file on this machine (atomically; replaces an older one)."""
    key = plan_key(model_sha256)
    path = plan_path(key)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    data = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "key": key,
        "created": created,
        "plan": plan.to_dict(),
        "details": details or {},
    }
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())
    return CachedPlan(plan, path, created, details or {})

"""How long a benchmark times each point, how big its limit measurements are, and at which batch sizes."""

from __future__ import annotations

from dataclasses import dataclass

from vae_deploy.errors import UsageError

DEFAULT_BATCH_SIZES = (1, 8, 64, 512, 4096)
QUICK_BATCH_SIZES = (1, 64)


@dataclass(frozen=True)
class Budget:
    """How long each (backend, batch size) point is timed, and the size of the limit measurements."""

    warmup_s: float = 0.2  # untimed calls before the first round (at least 3 calls)
    round_s: float = 0.05  # timed calls per round per backend (at least 1 call)
    min_rounds: int = 10
    max_s: float = 3.0  # a point counts as done after this much timed time even if not settled
    settle: float = 0.02  # settled: the median moved less than this (relative) over the last round
    matmul_n: int = 4096  # CPU peak: best of `matmul_repeats` n x n x n fp32 matmuls
    matmul_repeats: int = 3
    ceiling_n: int = 2048  # the int8/bf16 ceilings: n x n x n matmuls
    gpu_matmul_n: int = 8192
    copy_mib: int = 256  # memory-bandwidth copy size

    def __post_init__(self) -> None:
        if min(self.warmup_s, self.round_s, self.max_s, self.settle) <= 0 or self.min_rounds < 1:
            raise UsageError(f"benchmark budget values must be positive: {self}")


QUICK_BUDGET = Budget(
    warmup_s=0.02,
    round_s=0.03,
    min_rounds=2,
    max_s=0.15,
    matmul_n=2048,
    matmul_repeats=2,
    ceiling_n=512,
    gpu_matmul_n=4096,
    copy_mib=64,
)

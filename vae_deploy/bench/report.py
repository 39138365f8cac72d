"""A benchmark's results and their outputs: rows, the report (its ``to_dict`` is the JSON schema),
the console table, the JSON file and the throughput plot (matplotlib, imported on use)."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vae_deploy.errors import MissingExtraError, UsageError
from vae_deploy.files import atomic_write


@dataclass
class Row:
    """One measured (backend, batch size) point."""

    backend: str
    graph: str
    batch_size: int
    latency_ms: dict[str, float]  # p50, p90, p99, mean, min
    samples_per_s: float
    fraction_of_peak: float | None
    gflop_per_s: float | None  # None where the FLOPs could not be counted
    peak: str  # which limit fraction_of_peak is taken against
    runs: int
    rounds: int
    settled: bool
    threads: dict[str, Any]
    ratios: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


@dataclass
class BenchReport:
    """Everything one benchmark run measured; ``to_dict`` is the ``--json`` schema."""

    machine: dict[str, Any]
    limits: dict[str, Any]
    settings: dict[str, Any]
    results: list[Row]
    skipped: list[dict[str, Any]]
    errors: dict[str, dict[str, float]]  # backend -> output error against fp32 (int8)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "limits": self.limits,
            "settings": self.settings,
            "results": [r.to_dict() for r in self.results],
            "skipped": self.skipped,
            "errors": self.errors,
        }


def _flops_text(flops: int | None) -> str:
    return "?" if not flops else f"{flops:,}"


def format_table(report: BenchReport) -> str:
    """The console table: one line per (batch size, backend), then settings, errors and skips."""
    lim = report.limits
    lines = [
        f"{report.settings['graph']} of {report.settings['export_dir']}: "
        f"{_flops_text(report.settings['flops_per_sample'])} FLOP/sample"
        + (f" at {report.settings['image_size']}" if report.settings.get("image_size") else "")
        + f"; machine: {report.machine['cpu']} "
        f"x{report.machine['cpus']}" + (f", {report.machine['gpu']}" if report.machine.get("gpu") else ""),
        f"limits: cpu fp32 matmul {lim['cpu_fp32_matmul_gflops']:.1f} GFLOP/s, "
        + "".join(f"{label} {lim[key]:.1f} G{unit}/s, " for key, label, unit in CPU_CEILINGS[1:] if lim.get(key))
        + f"copy {lim['cpu_copy_gbps']:.1f} GB/s"
        + "".join(
            f", gpu {k} {lim[f'gpu_{k}_matmul_tflops']:.1f} TFLOP/s"
            for k in ("fp32", "tf32", "fp16", "bf16")
            if f"gpu_{k}_matmul_tflops" in lim
        )
        + (f", gpu copy {lim['gpu_copy_gbps']:.0f} GB/s" if "gpu_copy_gbps" in lim else ""),
        "",
        f"{'backend':17s} {'batch':>6s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'samples/s':>12s} "
        f"{'x eager':>8s} {'% peak':>7s} {'runs':>6s}",
    ]
    for r in report.results:
        vs = r.ratios.get("vs_eager")
        frac = "-" if r.fraction_of_peak is None else f"{100 * r.fraction_of_peak:.1f}"
        lines.append(
            f"{r.backend:17s} {r.batch_size:6d} {r.latency_ms['p50']:9.4f} {r.latency_ms['p90']:9.4f} "
            f"{r.latency_ms['p99']:9.4f} {r.samples_per_s:12,.0f} {('-' if vs is None else f'{vs:.2f}'):>8s} "
            f"{frac:>7s} {r.runs:6d}" + ("" if r.settled else "  (not settled)")
        )
    lines.append("")
    lines.append("threads:")
    for name, text in threads_summary([r.to_dict() for r in report.results]).items():
        lines.append(f"  {name}: {text}")
    for name, note in report.settings.get("notes", {}).items():
        lines.append(f"{name}: {note}")
    for key, label, _ in CPU_CEILINGS[1:]:
        why = lim.get(key.replace("_gflops", "_note").replace("_gops", "_note"))
        if why:
            lines.append(f"{label} ceiling {why}")
    for name, err in report.errors.items():
        if "mean_abs_255" in err:
            lines.append(
                f"{name} vs fp32 over {err['rows']} samples: mean |error| {err['mean_abs_255']:.3f}/255, "
                f"max {err['max_abs_255']:.2f}/255"
            )
        else:
            lines.append(f"{name} vs fp32: mean |error| {err['mean_abs']:.3g}, max {err['max_abs']:.3g}")
    for s in report.skipped:
        at = f" at batch {s['batch_size']}" if s.get("batch_size") else ""
        lines.append(f"skipped {s['backend']}{at}: {s['reason']}")
    load = report.machine.get("load_avg_start"), report.machine.get("load_avg_end")
    other = report.machine.get("other_load") or {}
    lines.append(
        f"load average (1/5/15 min): start {load[0]}, end {load[1]}; other processes used "
        f"{other.get('other_cores', '?')} cores on average during the run (hypervisor steal "
        f"{other.get('steal_cores', '?')}); took {report.settings['seconds']} s"
    )
    return "\n".join(lines)


CPU_CEILINGS = (  # (limits key, label, unit): the fp32 peak and the best-precision ceilings beside it
    ("cpu_fp32_matmul_gflops", "cpu fp32 matmul", "FLOP"),
    ("cpu_int8_matmul_gops", "int8 matmul (onnxruntime)", "OP"),
    ("cpu_bf16_matmul_gflops", "bf16 matmul (torch)", "FLOP"),
)


def threads_summary(results: list[dict[str, Any]]) -> dict[str, str]:
    """Per backend, its thread settings in one line: what all batch sizes share, then what differs."""
    per: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        per.setdefault(r["backend"], {})[r["batch_size"]] = r["threads"]
    out = {}
    for name, by_batch in per.items():
        settings = list(by_batch.values())
        common = {k: v for k, v in settings[0].items() if all(s.get(k, object()) == v for s in settings)}
        parts = [", ".join(f"{k}={v}" for k, v in common.items())]
        for batch, s in by_batch.items():
            extra = {k: v for k, v in s.items() if k not in common}
            if extra:
                parts.append(f"batch {batch}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        out[name] = "; ".join(p for p in parts if p)
    return out


def write_json(report: BenchReport, path: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically (temp file + rename)."""
    path = Path(path)
    atomic_write(path, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return path


def write_results(stem: str | os.PathLike, data: dict[str, Any], markdown: str, indent: int = 2) -> Path:
    """A benchmark script's results: ``STEM.json`` (``data``) and ``STEM.md`` (``markdown``), each
    written atomically, the folder made if needed. Returns ``STEM.json``."""
    stem = Path(stem)
    atomic_write(stem.with_name(stem.name + ".json"), (json.dumps(data, indent=indent) + "\n").encode())
    atomic_write(stem.with_name(stem.name + ".md"), markdown.encode())
    return stem.with_name(stem.name + ".json")


def require_matplotlib() -> None:
    """Raise MissingExtraError unless matplotlib can be imported (checked before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            "--plot needs matplotlib: pip install 'vae-deploy[viz]' (or pip install matplotlib)"
        ) from None


def plot_throughput(report: BenchReport | dict[str, Any], path: str | os.PathLike) -> Path:
    """Throughput vs batch size per backend on log axes, with the compute ceiling(s) dashed."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report.to_dict() if isinstance(report, BenchReport) else report
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--plot must end in .png, .svg or .pdf, got {path.name!r}")
    by: dict[str, list[tuple[int, float]]] = {}
    for r in data["results"]:
        by.setdefault(r["backend"], []).append((r["batch_size"], r["samples_per_s"]))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, pts in by.items():
        pts.sort()
        style = "--" if "cuda" in name else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
    flops = data["settings"]["flops_per_sample"]
    lim = data["limits"]
    ceilings = [(f"{label} peak", (lim.get(key) or 0) * 1e9) for key, label, _ in CPU_CEILINGS]
    ceilings += [
        (f"gpu {k} peak", lim[f"gpu_{k}_matmul_tflops"] * 1e12)
        for k in ("fp32", "fp16")
        if f"gpu_{k}_matmul_tflops" in lim
    ]
    for label, peak in ceilings:
        if peak and flops:
            ax.axhline(peak / flops, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                label,
                (0.01, peak / flops),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="grey",
                va="bottom",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    m = data["machine"]
    where = f"{m.get('gpu') or m.get('cpu')} ({m.get('cpus')} cpus)"
    ax.set_title(f"{data['settings']['graph']} throughput: {where}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=path.suffix.lower()[1:], dpi=120)  # the format the name says
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path

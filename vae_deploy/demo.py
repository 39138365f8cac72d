"""``vae-deploy demo`` as a library call: train -> export -> verify -> sample -> bench, on defaults.

Everything is validated (data, output folders, the samples path) before the first write, and the
run folder follows :mod:`vae_deploy.outdir`: a demo replaces only its own files in a run folder of
ours and refuses anyone else's folder; nothing is ever deleted wholesale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vae_deploy.config import ModelConfig, make_configs
from vae_deploy.errors import UsageError

# The reference model: MLP 784-400-(2x20), BCE + KL, Adam 1e-3, batch 128 (also the benchmarks').
REFERENCE_MODEL = ModelConfig(arch="mlp", latent_dim=20, hidden=(400,))
REFERENCE_TRAIN: Mapping[str, Any] = MappingProxyType({"batch_size": 128, "lr": 1e-3, "loss": "bce"})
DEMO_FORMATS = ("onnx", "torchscript", "pt2")
DEMO_SAMPLES = 64


@dataclass
class DemoResult:
    """What the demo made: the run, the export, the sample file, and how verify and sampling went."""

    run_dir: Path
    checkpoint: Path
    export_dir: Path
    samples: Path
    verified: bool
    provider: str
    samples_per_second: float
    bench_table: str | None = None


def _check_apart(out: Path, export_dir: Path) -> None:
    a, b = out.resolve(), export_dir.resolve()
    if a == b or b in a.parents:
        raise UsageError(f"--export-dir {export_dir} must not be the run folder --out {out} or hold it")


def run_demo(
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    dataset: str = "mnist",
    epochs: int = 5,
    out: str | os.PathLike = "runs/demo",
    export_dir: str | os.PathLike = "exported",
    samples: str | os.PathLike | None = None,
    bench: bool = True,
    formats: tuple[str, ...] = DEMO_FORMATS,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train the reference model, export, verify, sample ``DEMO_SAMPLES`` images (default
    ``OUT/samples.png``) and, with ``bench``, time the decoder. Raises ``ParityError`` if verify fails."""
    from vae_deploy.data import load_splits
    from vae_deploy.errors import ParityError
    from vae_deploy.export import export
    from vae_deploy.images import check_out_path
    from vae_deploy.outdir import check_output_dir
    from vae_deploy.parity import verify
    from vae_deploy.sample import sample_to_file
    from vae_deploy.training import train

    out, export_dir = Path(out), Path(export_dir)
    _, train_cfg = make_configs(
        None,
        {
            **REFERENCE_TRAIN,
            "dataset": dataset,
            "data_root": None if data_root is None else str(data_root),
            "download": download,
            "epochs": epochs,
            "out": str(out),
        },
    )
    samples_path = check_out_path(out / "samples.png" if samples is None else samples)
    _check_apart(out, export_dir)
    check_output_dir(out, "run")
    check_output_dir(export_dir, "export")
    splits = load_splits(dataset, data_root, download=download)  # data problems surface before any write

    m = REFERENCE_MODEL
    log(f"== 1/5 train: MLP 784-{'-'.join(map(str, m.hidden))}-(2x{m.latent_dim}), BCE + KL")
    result = train(m, train_cfg, overwrite=True, progress=progress, log=log, splits=splits)
    log(f"checkpoint: {result.checkpoint}")
    log(f"== 2/5 export -> {export_dir}/")
    exported = export(result.checkpoint, export_dir, formats=formats, verify=False, log=log)
    log("== 3/5 verify against eager PyTorch")
    report = verify(exported.out_dir, data_root=data_root, log=lambda _: None)
    log(report.table())
    if not report.passed:
        raise ParityError(f"verify failed: {report.summary()}")
    log(f"== 4/5 sample {DEMO_SAMPLES} images on onnxruntime (seed 0)")
    s = sample_to_file(exported.out_dir, DEMO_SAMPLES, samples_path, seed=0, provider="auto")
    log(f"provider {s.provider}: wrote {s.path} ({s.samples_per_second:,.0f} samples/s)")
    table = None
    if bench:
        from vae_deploy.bench import format_table, run_bench

        log("== 5/5 bench (quick): decoder throughput per backend")
        table = format_table(run_bench(exported.out_dir, quick=True, progress=progress, log=lambda _: None))
        log(table)
    return DemoResult(
        out,
        result.checkpoint,
        exported.out_dir,
        s.path,
        report.passed,
        s.provider,
        s.samples_per_second,
        table,
    )

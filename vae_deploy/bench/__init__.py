"""Benchmark an export's encoder or decoder on every backend, side by side, against the machine's limit.

    report = run_bench("exported", batch_sizes=(1, 64, 4096))   # what `vae-deploy bench` runs
    print(format_table(report)); write_json(report, "out.json"); plot_throughput(report, "out.png")

Backends (names as in the JSON): ``eager`` (the checkpoint's PyTorch module, inference mode),
``torchscript``, ``pt2`` (torch.export), ``onnx-cpu`` (``VAERuntime`` on the CPU), ``onnx-cpu-bare``
(``InferenceSession.run`` on the very session ``VAERuntime`` uses at that batch size: the cost of
the wrapper, validation included), ``onnx-cpu-default`` (a bare session with onnxruntime's default
options: what tuning bought), ``onnx-cpu-int8`` (the export's ``decoder.int8.onnx``, or the fp32
graph quantized the same way into a temporary file for this run; run through ``VAERuntime`` like
``onnx-cpu``, compared with the int8 ceiling, its error against fp32 reported), and on a CUDA
machine ``eager-cuda``, ``onnx-cuda`` (IOBinding with
device-resident input and output), ``onnx-cuda-graph`` (the same with a captured CUDA graph) and
``onnx-cuda-fp16`` (the export's half-precision decoder). CPU rows take numpy in and give numpy
out; CUDA rows keep input and output on the device and synchronise after every call. A backend
that cannot run here is reported under ``skipped`` with the reason; it never stops the run.

Method: every batch size gets one input (seeded), shared by all backends. Each backend is warmed
up, then the backends take turns (round robin, so machine noise hits them alike) running timed
rounds of ~0.05 s of single calls, each timed alone, with the process quiesced in between (thread
pools that still spin from the previous backend would steal its cores). The rounds go on until
every backend's median latency moved less than ``settle`` (2%) over its last round after at least
``min_rounds`` rounds, or spent its time budget. Throughput is batch size / median latency. The
same run measures the machine's limits (the best large fp32 matmul in torch and numpy on the CPU,
measured at the start and at the end, the better one kept; beside it the best-precision ceilings:
onnxruntime's int8 matmul, and torch's bf16 matmul where the CPU has bf16 hardware; on a GPU dense
matmul TFLOP/s per precision and device-copy bandwidth), and ``fraction_of_peak`` = achieved
FLOP/s / the peak of the backend's precision (int8 rows: the int8 ceiling) and
``fraction_of_best`` = the same against the machine's best ceiling of any precision, with
the FLOPs per sample counted from the model config (2 x the multiply-accumulates of every Linear,
Conv2d and ConvTranspose2d; biases and activations are not counted), as in nanoGPT's MFU. The CPU
time other processes took during the run is recorded (``machine.other_load``, in cores).

Modules, one job each (imports go down this list, never up): ``budget`` (how long to time),
``flops`` (FLOPs per sample), ``machine`` (what the machine is, its load and limits), ``timing``
(warm-up, quiescing, timed rounds, the settle rule), ``report`` (rows, table, JSON, plot),
``context`` (what backends are built from), ``onnx_backends``, ``int8`` and ``torch_backends``
(the factories; only the last imports torch at its top), ``backends`` (name -> factory) and
``run`` (``run_bench``). ``import vae_deploy.bench`` does not import torch.
"""

from __future__ import annotations

from vae_deploy.bench.backends import BACKENDS, CPU_BACKENDS, CUDA_BACKENDS, parse_backends
from vae_deploy.bench.budget import DEFAULT_BATCH_SIZES, QUICK_BATCH_SIZES, QUICK_BUDGET, Budget
from vae_deploy.bench.flops import GRAPHS, flops_per_sample
from vae_deploy.bench.machine import (
    cpu_counters,
    cpu_matmul_gflops,
    machine_info,
    machine_slug,
    measure_limits,
    other_load,
    others_cores,
    wait_quiet,
)
from vae_deploy.bench.report import (
    BenchReport,
    Row,
    format_table,
    plot_throughput,
    require_matplotlib,
    threads_summary,
    write_json,
    write_results,
)
from vae_deploy.bench.run import run_bench

__all__ = [
    "BACKENDS",
    "CPU_BACKENDS",
    "CUDA_BACKENDS",
    "DEFAULT_BATCH_SIZES",
    "GRAPHS",
    "QUICK_BATCH_SIZES",
    "QUICK_BUDGET",
    "BenchReport",
    "Budget",
    "Row",
    "cpu_counters",
    "cpu_matmul_gflops",
    "flops_per_sample",
    "format_table",
    "machine_info",
    "machine_slug",
    "measure_limits",
    "other_load",
    "others_cores",
    "wait_quiet",
    "parse_backends",
    "plot_throughput",
    "require_matplotlib",
    "run_bench",
    "threads_summary",
    "write_json",
    "write_results",
]

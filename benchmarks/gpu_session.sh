#!/usr/bin/env bash
# One command for a session that has the GPU machine (issue: the CUDA path, proven on a real GPU).
# Run it on the device machine, from the repository root, after onnxruntime-gpu has been installed
# there (../shared/tools/ortgpu-for-device prints how; its last call ends with `&& bash
# benchmarks/gpu_session.sh`). Writes everything under ${OUT:-gpu-results}/:
#   pytest-cuda.log   every `cuda`-marked test, verbose
#   suite.json|md|png the standard suite with the CUDA backends and the GPU's measured limits
#   verify-cuda.txt   the verify table on CUDA for fp32 and fp16
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import onnxruntime as o, torch; print(o.__version__, o.get_available_providers(), torch.cuda.get_device_name(0))' | tee "$out/device.txt"
python3 -m pytest -q -m cuda -rA -p no:cacheprovider tests 2>&1 | tee "$out/pytest-cuda.log"
work=$(mktemp -d)
python3 -m vae_deploy.cli train --dataset synthetic --epochs 1 --max-steps 50 --out "$work/run" >/dev/null
python3 -m vae_deploy.cli export "$work/run/checkpoint.pt" --out "$work/exported" --formats onnx,torchscript,pt2 --fp16 \
  | tee "$out/verify-cuda.txt"
python3 benchmarks/run_suite.py --export-dir "$work/exported" --out "$out" 2>&1 | tee "$out/suite.log"

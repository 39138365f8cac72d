"""examples/embed_decoder.py: a tiny app that runs the exported decoder with onnxruntime alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "embed_decoder.py"

# Runs the example as __main__, then fails if torch (or vae-deploy itself) was ever imported.
WRAPPER = """
import runpy, sys
sys.argv = [{example!r}, *{args!r}]
try:
    runpy.run_path({example!r}, run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vae_deploy"))
assert not leaked, f"the example imported {{leaked[:5]}}"
print("torch-free")
"""


@pytest.fixture(scope="session")
def exported(mlp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vae_deploy.export import export

    out = tmp_path_factory.mktemp("embed") / "exported"
    return export(mlp_checkpoint, out, formats=("onnx",), verify=False, log=lambda _: None).out_dir


def _run_example(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    code = WRAPPER.format(example=str(EXAMPLE), args=args)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_example_samples_without_torch_and_matches_the_runtime(exported: Path, tmp_path: Path) -> None:
    png, npy = tmp_path / "samples.png", tmp_path / "samples.npy"
    args = [str(exported / "decoder.onnx"), "-n", "12", "--seed", "7", "--out", str(png), "--npy", str(npy)]
    done = _run_example(args, cwd=tmp_path)  # outside the repo: nothing of vae_deploy on the path
    assert done.returncode == 0, done.stderr
    assert "torch-free" in done.stdout and "latent [8]" in done.stdout

    with Image.open(png) as im:
        assert im.mode == "L" and im.size == (2 + 4 * 30, 2 + 3 * 30)  # 12 images: 4 x 3 grid
    images = np.load(npy)
    assert images.shape == (12, 1, 28, 28) and images.dtype == np.float32

    from vae_deploy.runtime import VAERuntime

    # Same seed, same images: the example's z is the runtime's documented stream.
    np.testing.assert_allclose(images, VAERuntime(exported, "cpu").sample(12, seed=7), atol=1e-6)


def test_example_reads_shapes_from_metadata_not_assumptions(conv_checkpoint: Path, tmp_path: Path) -> None:
    from vae_deploy.export import export

    exported = export(conv_checkpoint, tmp_path / "conv", formats=("onnx",), verify=False, log=lambda _: None)
    out = tmp_path / "conv.png"
    done = _run_example([str(exported.out_dir / "decoder.onnx"), "-n", "3", "--out", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "latent [2]" in done.stdout and "[1, 28, 28]" in done.stdout
    with Image.open(out) as im:
        assert im.size == (2 + 2 * 30, 2 + 2 * 30)

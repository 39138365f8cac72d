"""Trust, data side: never compute the wrong thing silently, bound every resource, errors that are ours.

Memory bounds (resources.py) on every view and evaluate, IDX files that lie, non-UTF-8 paths, view
and evaluate options out of range, one tiler for colour images of any size, and a property test.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vae_deploy import figures, resources, viz
from vae_deploy.checkpoint import save_checkpoint
from vae_deploy.cli import main
from vae_deploy.config import ModelConfig, TrainConfig
from vae_deploy.data import load_splits, read_idx
from vae_deploy.errors import DataError, ResourceError, UsageError, VaeDeployError
from vae_deploy.evaluate import bounds, evaluate
from vae_deploy.images import tile, write_samples
from vae_deploy.model import VAE

RAW = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _model(tmp: Path, shape: tuple[int, int, int] = (1, 28, 28), d: int = 3, name: str = "m.pt", **train) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mlp", latent_dim=d, hidden=(16,), image_shape=shape)
    return save_checkpoint(tmp / name, VAE(cfg), TrainConfig(**train) if train else None)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _raw_root(root: Path, data_root: Path, images: bytes | None = None, labels: bytes | None = None) -> Path:
    """A torchvision-style root holding the real t10k files, or these bytes instead of them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, replace in zip(RAW, (images, labels)):
        real = gzip.decompress((data_root / "MNIST" / "raw" / f"{stem}.gz").read_bytes())
        (raw / stem).write_bytes(real if replace is None else replace)
    return root


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "internal error" not in err and all(n in err for n in needles), err
    return err


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(tmp_path_factory.mktemp("trust"))


@pytest.fixture
def little_memory(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pretend the machine has 256 MiB free."""
    monkeypatch.setattr(resources, "available_memory", lambda: 256 * 2**20)
    return 256 * 2**20


# --- 1. memory bounds ---------------------------------------------------------------------------


def test_available_memory_is_memavailable_and_require_memory_refuses_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meminfo = Path("/proc/meminfo").read_text()
    listed = [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable")]
    free = resources.available_memory()
    if listed:
        assert abs(free - listed[0]) < 0.25 * listed[0]  # it moves while we look
    assert free > 0
    resources.require_memory(1024, "a kilobyte")
    with pytest.raises(ResourceError, match=r"^a picture needs 2,048 GiB, more than the [\d.,]+ GiB available; x$"):
        resources.require_memory(2048 * 2**30, "a picture", "x")
    assert issubclass(ResourceError, UsageError)
    monkeypatch.setattr(resources, "_meminfo_available", lambda: None)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert resources.available_memory() <= pages
    monkeypatch.setattr(resources, "_sysconf_physical", lambda: None)
    assert resources.available_memory() <= resources.DEFAULT_MEMORY


@pytest.mark.parametrize(
    "view, opts, message",
    [
        (
            viz.interpolate,
            {"steps": 20_000},
            "steps=20000 would make a picture 20,002 images wide; at most 1,000",
        ),
        (viz.vary, {"n": 100_000}, "n=100000 would make a picture 100,001 images wide"),
        (viz.reconstruct, {"n": 10**9}, "at most 1,000"),
    ],
)
def test_absurd_pictures_are_refused_before_any_work(
    view, opts: dict, message: str, model: Path, tmp_path: Path
) -> None:
    # before: interpolate --steps 20000 died in matplotlib (MemoryError on a 1.1M-pixel-wide image);
    # the data root does not exist, so reading any data first would be a DataError instead
    with pytest.raises(ResourceError, match=message):
        view(viz.load_source(model), tmp_path / "x.png", dataset="mnist", data_root=tmp_path / "none", **opts)
    assert not list(tmp_path.iterdir())


def test_latent_map_grid_is_bounded(tmp_path: Path) -> None:
    source = viz.load_source(_model(tmp_path, d=2))
    with pytest.raises(ResourceError, match="grid=3000 would make a picture 3,000 images wide"):
        viz.latent_map(source, tmp_path / "x.png", dataset="synthetic", grid=3000)


def test_views_refuse_what_does_not_fit_with_an_honest_estimate(
    model: Path, tmp_path: Path, little_memory: int, data_root: Path
) -> None:
    source = viz.load_source(model)
    # 10 rows x 900 images: a 49,500 x 620 pixel figure, ~2.5 GiB while drawing, said in one line
    with pytest.raises(ResourceError, match=r"^vary -n 900 needs 2\.\d+ GiB, more than the 0\.25 GiB"):
        viz.vary(source, tmp_path / "v.png", dataset="mnist", data_root=tmp_path / "none", n=900)
    with pytest.raises(ResourceError, match=r"interpolate --steps 800 needs .*use fewer --steps"):
        viz.interpolate(source, tmp_path / "i.png", steps=800, slerp_row=True)
    d2 = viz.load_source(_model(tmp_path, d=2, name="d2.pt"))
    with pytest.raises(ResourceError, match="latent-map --limit 2000 --grid 200 needs"):
        viz.latent_map(d2, tmp_path / "m.png", grid=200)
    # what fits still runs, on real MNIST
    assert _png(viz.vary(source, tmp_path / "ok.png", dataset="mnist", data_root=data_root, n=4)).size
    assert not (tmp_path / "v.png").exists()


_MEASURE = """
import re, sys
import torch
from vae_deploy import viz, evaluate as ev
from vae_deploy.checkpoint import model_from_state, read_checkpoint
status = lambda key: int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
estimates = []
viz.require_memory = ev.require_memory = lambda n, what, hint="": estimates.append(n)
src = viz.load_source(sys.argv[1])
model = model_from_state(read_checkpoint(sys.argv[1]), "m")
x = torch.from_numpy(viz.validation_set(src, "synthetic", None)[0][:2])
job = {
    "vary": lambda n: viz.vary(src, sys.argv[3], dataset="synthetic", n=n),
    "iwae": lambda k: ev.bounds(model, x, k=k),
}[sys.argv[2]]
job(2)  # imports, data, first calls: not what is measured
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the peak (VmHWM) from here
before = status("VmRSS")
job(int(sys.argv[4]))
print(status("VmHWM") - before, estimates[-1])
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures with Linux's /proc")
@pytest.mark.parametrize("job, size", [("vary", 100), ("iwae", 20_000)])
def test_memory_estimates_are_close_to_the_measured_peak(job: str, size: int, model: Path, tmp_path: Path) -> None:
    """The estimates are what is allocated (peak RSS of a fresh process), not arbitrary caps."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(model), job, str(tmp_path / "m.png"), str(size)],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )  # fmt: skip
    measured, estimated = (int(v) for v in run.stdout.split()[-2:])
    assert measured > 100 * 2**20
    assert 0.7 * measured < estimated < 2.5 * measured, (measured, estimated)


def test_png_grids_are_bounded_before_sampling(
    model: Path, tmp_path: Path, little_memory: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from vae_deploy.export import export
    from vae_deploy.sample import sample_to_file

    exported = export(model, tmp_path / "exp", formats=("onnx",), verify=False, log=lambda _: None).out_dir
    # before: the picture was only made after sampling, then died tiling (MemoryError under ulimit -v)
    drawn: list[int] = []
    with pytest.raises(ResourceError, match="a 6,722 x 6,722 pixel PNG of 50,000 images needs 0.58"):
        sample_to_file(exported, 50_000, tmp_path / "s.png", seed=0, progress=drawn.append)
    assert drawn == []  # refused before sampling
    assert main(["sample", str(exported), "-n", "50000", "--seed", "0", "--out", f"{tmp_path}/s.png"]) == 2
    _one_line_error(capsys, "PNG of 50,000 images needs", "write .npy instead")
    with pytest.raises(ResourceError, match="PNG of 30,000 images needs 0.3"):
        write_samples(tmp_path / "w.png", np.zeros((30_000, 1, 28, 28), np.float32))
    assert not list(tmp_path.glob("*.png"))


def test_evaluate_refuses_a_huge_k_in_one_line(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _model(tmp_path)
    # before: "RuntimeError: DefaultCPUAllocator: can't allocate memory" (or the OOM killer)
    with pytest.raises(ResourceError, match=r"k=1000000000 importance samples needs [\d,]+ GiB, more than"):
        evaluate(ckpt, dataset="mnist", data_root=data_root, k=10**9, limit=2)
    x = load_splits("mnist", data_root, val_limit=2).val_x
    with pytest.raises(ResourceError, match="use a smaller --k"):
        bounds(VAE(ModelConfig(latent_dim=3, hidden=(16,))), x, k=10**8)
    args = ["evaluate", str(ckpt), "--dataset", "mnist", "--data-root", str(data_root), "--limit", "2"]
    assert main([*args, "--k", "1000000000"]) == 2
    _one_line_error(capsys, "GiB", "--k")
    assert main([*args, "--k", "3"]) == 0  # a sane k still runs
    assert "2 images" in capsys.readouterr().out


# --- 2. errors that are not ours ----------------------------------------------------------------


def _idx(dims: tuple[int, ...], body: bytes = b"", ndim: int | None = None) -> bytes:
    header = bytes([0, 0, 8, len(dims) if ndim is None else ndim])
    return header + b"".join(d.to_bytes(4, "big") for d in dims) + body


@pytest.mark.parametrize(
    "data, message",
    [
        (_idx(()), "0 dimensions, expected 1 to 4"),  # before: ValueError from numpy's reshape
        (_idx((), ndim=200) + bytes(8), "200 dimensions"),  # before: struct.error
        (bytes([0, 0, 8, 3, 0, 0]), "ends inside its IDX header"),
        (_idx((2**31, 2**31, 2**31), bytes(10)), r"promises .* GiB of data, more than the 16 GiB"),
        (_idx((10, 28, 28), bytes(100)), r"truncated: its header says \(10, 28, 28\) = 7,840 bytes"),
        (_idx((2, 2), bytes(5)), "padded"),
    ],
)
def test_idx_files_that_lie_are_data_errors(data: bytes, message: str, tmp_path: Path) -> None:
    for path in (tmp_path / "f", tmp_path / "f.gz"):
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
        with pytest.raises(DataError, match=message):
            read_idx(path)


def test_a_truncated_real_file_is_a_data_error_in_every_command(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = gzip.decompress((data_root / "MNIST/raw/t10k-images-idx3-ubyte.gz").read_bytes())
    root = _raw_root(tmp_path / "cut", data_root, images=real[: len(real) // 2])
    gz = root / "MNIST/raw/t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(real[: len(real) // 2], compresslevel=1))
    with pytest.raises(DataError, match="truncated: .* 7,840,000 bytes of data, the file has 3,919,992"):
        read_idx(gz)
    ckpt = str(_model(tmp_path))
    assert main(["evaluate", ckpt, "--dataset", "mnist", "--data-root", str(root)]) == 1
    _one_line_error(capsys, "truncated")
    assert main(["vary", ckpt, "--dataset", "mnist", "--data-root", str(root), "--out", f"{tmp_path}/v.png"]) == 1
    _one_line_error(capsys, "truncated")


def test_a_corrupt_file_where_torchvision_looks_is_our_error(data_root: Path, tmp_path: Path) -> None:
    # all four files present: torchvision reads them first and raised a bare AssertionError
    root = _raw_root(tmp_path / "tv", data_root)
    raw = root / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes(_idx(()))
    (raw / "train-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError, match="train-images-idx3-ubyte: IDX header says 0 dimensions"):
        load_splits("mnist", root)


def test_empty_and_mismatched_splits_are_data_errors(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = _raw_root(tmp_path / "empty", data_root, images=_idx((0, 28, 28)), labels=_idx((0,)))
    with pytest.raises(DataError, match="mnist's training split is empty .*expected at least one image"):
        load_splits("mnist", empty)
    ckpt = str(_model(tmp_path))
    assert main(["evaluate", ckpt, "--dataset", "mnist", "--data-root", str(empty), "--k", "2"]) == 1
    _one_line_error(capsys, "split is empty")
    args = [
        "reconstruct",
        ckpt,
        "--dataset",
        "mnist",
        "--data-root",
        str(empty),
        "--out",
        f"{tmp_path}/r.png",
    ]
    assert main(args) == 1
    _one_line_error(capsys, "split is empty")
    odd = _raw_root(tmp_path / "odd", data_root, labels=_idx((3,), bytes(3)))
    with pytest.raises(DataError, match=r"expected \[N, H, W\] images and \[N\] labels, got \(10000, 28, 28\)"):
        load_splits("mnist", odd)


def test_evaluate_limit_zero_and_bad_options_are_usage_errors(
    model: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in ({"limit": 0}, {"limit": -3}, {"k": 2.5}, {"seed": 2**70}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            evaluate(model, dataset="mnist", data_root=data_root, **{"k": 2, **bad})
    assert main(["evaluate", str(model), "--data-root", str(data_root), "--limit", "0"]) == 2
    _one_line_error(capsys, "limit must be a positive integer")


def _bytes_dir(parent: Path, name: bytes) -> Path:
    os.mkdir(os.fsencode(parent) + b"/" + name)
    return Path(os.fsdecode(os.fsencode(parent) + b"/" + name))


def test_non_utf8_folders_and_files_print_and_work(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _raw_root(_bytes_dir(tmp_path, b"data\xff"), data_root)
    out = _bytes_dir(tmp_path, b"out\xfe")
    model_dir = _bytes_dir(tmp_path, b"run\xfd")
    ckpt = _model(model_dir, name="checkpoint.pt")
    # before: the title crashed matplotlib (set_text), and "wrote ..." crashed a UTF-8 stdout
    args = ["reconstruct", str(model_dir), "--dataset", "mnist", "--data-root", str(root)]
    assert main([*args, "-n", "3", "--out", f"{out}/r\udcfc.png"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path}/out\\xfe/r\\xfc.png"
    assert _png(Path(f"{out}/r\udcfc.png")).shape[0] > 50
    # our errors name such paths printably
    assert main(["evaluate", str(ckpt), "--dataset", "mnist", "--data-root", f"{out}/none\udcfb"]) == 1
    _one_line_error(capsys, "out\\xfe/none\\xfb/MNIST/raw")
    # and evaluate's JSON stays valid UTF-8
    report = out / "e.json"
    assert (
        main(
            [
                "evaluate",
                str(ckpt),
                "--data-root",
                str(root),
                "--limit",
                "3",
                "--k",
                "2",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    assert json.loads(report.read_bytes().decode("utf-8"))["checkpoint"].endswith("run\\xfd/checkpoint.pt")


@pytest.mark.parametrize(
    "view, opts, message",
    [
        (viz.reconstruct, {"seed": -1}, "seed must be an integer from 0 to 4294967295, got -1"),
        (viz.interpolate, {"seed": -5}, "seed must be"),
        (viz.vary, {"seed": 2**40}, "seed must be"),
        (viz.latent_map, {"seed": -2, "method": "pca"}, "seed must be"),
        (viz.reconstruct, {"n": 0}, "n must be a positive integer, got 0"),
        (viz.reconstruct, {"n": 2.5}, "n must be an integer, got 2.5"),
        (viz.vary, {"n": -3}, "n must be a positive integer"),
        (viz.interpolate, {"steps": 1}, r"steps must be at least 2 \(both ends included\), got 1"),
        (viz.interpolate, {"steps": -4}, "steps must be at least 2"),
        (viz.interpolate, {"indices": (-1, 3)}, "index must be a non-negative integer"),
        (viz.latent_map, {"grid": 0}, "grid must be a positive integer"),
        (viz.latent_map, {"limit": 0}, "limit must be a positive integer"),
        (viz.latent_map, {"limit": 1}, "t-SNE needs at least 3 images, got --limit 1"),
        (viz.latent_map, {"limit": 2, "method": "tsne"}, "or use --method pca"),
    ],
)
def test_view_options_out_of_range_are_usage_errors(
    view, opts: dict, message: str, model: Path, tmp_path: Path
) -> None:
    # before: negative seeds and 1-2 image t-SNE were raw ValueErrors from numpy/scikit-learn
    with pytest.raises(UsageError, match=message):
        view(viz.load_source(model), tmp_path / "x.png", dataset="mnist", data_root=tmp_path / "none", **opts)


def test_view_errors_from_the_cli_are_one_line(model: Path, tmp_path: Path, capsys) -> None:
    for args in (
        ["reconstruct", "--seed", "-1"],
        ["latent-map", "--limit", "1"],
        ["interpolate", "--steps", "5000"],
    ):
        assert main([args[0], str(model), "--dataset", "synthetic", *args[1:], "--out", f"{tmp_path}/x.png"]) == 2
        _one_line_error(capsys, args[1].lstrip("-"))


def test_small_maps_work_with_pca_and_one_image(data_root: Path, tmp_path: Path) -> None:
    source = viz.load_source(_model(tmp_path, d=5))
    # before: IndexError (PCA of one point has one axis)
    path = viz.latent_map(source, tmp_path / "one.png", dataset="mnist", data_root=data_root, method="pca", limit=1)
    assert _png(path).shape[1] > 300
    path = viz.latent_map(source, tmp_path / "three.png", dataset="mnist", data_root=data_root, limit=3)
    assert _png(path).shape[1] > 300


def test_curves_refuse_metrics_that_are_not_numbers_or_too_big(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"epoch": 1, "train_loss": 3.0, "val_loss": 2.0},
        {"epoch": 2, "train_loss": "oops", "val_loss": 1.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # before: matplotlib plotted the string as a category, a wrong picture and no error
    with pytest.raises(UsageError, match=r"metrics.jsonl:2: train_loss is 'oops', expected a number"):
        viz.curves(run, tmp_path / "c.png")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": "one"}) + "\n")
    with pytest.raises(UsageError, match="numeric 'epoch'"):
        viz.read_metrics(run)
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n" + " " * 40 * 2**20 + "\n")
    monkeypatch.setattr(resources, "available_memory", lambda: 256 * 2**20)
    with pytest.raises(ResourceError, match=r"reading .*metrics.jsonl needs 0\.391 GiB, more than the 0\.25 GiB"):
        viz.curves(run, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


# --- 3. one tiler, colour, any image size -------------------------------------------------------


def test_the_views_draw_with_images_tile(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for shape in ((1, 28, 28), (3, 16, 16), (1, 8, 20)):
        rows = [rng.random((4, *shape), dtype=np.float32), rng.random((2, *shape), dtype=np.float32)]
        fig = figures.new_figure(3, 2)
        ax = fig.add_subplot()
        figures.draw_grid(ax, rows, ["a", "b"])
        drawn = ax.images[0]
        np.testing.assert_array_equal(drawn.get_array(), tile(rows, 2, fill=1.0))
        assert (drawn.get_cmap().name == "gray") == (shape[0] == 1)
    assert not hasattr(viz, "_mosaic")


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 12, 20)])
def test_every_view_works_in_colour_and_any_size(shape: tuple[int, int, int], tmp_path: Path) -> None:
    """Before: synthetic data was always 1x28x28, so no such model could be viewed at all."""
    d3 = viz.load_source(_model(tmp_path, shape, d=3, name="d3.pt", dataset="synthetic"))
    d2 = viz.load_source(_model(tmp_path, shape, d=2, name="d2.pt", dataset="synthetic"))
    pictures = [
        viz.reconstruct(d3, tmp_path / "r.png", n=5),
        viz.interpolate(d3, tmp_path / "i.png", steps=6, slerp_row=True),
        viz.vary(d3, tmp_path / "v.png", n=3),
        viz.latent_map(d2, tmp_path / "m2.png", limit=100, grid=7),
        viz.latent_map(d3, tmp_path / "m3.png", limit=100, method="pca"),
    ]
    for path in pictures:
        pixels = _png(path).astype(int)
        colourful = (np.abs(pixels[..., 0] - pixels[..., 1]) > 8).mean()
        # the latent maps always have coloured points; the grids have colour only for a colour model
        assert colourful > 0.001 if shape[0] == 3 or path.stem.startswith("m") else colourful == 0
    images, _ = viz.validation_set(d3, None, None)
    assert images.shape[1:] == shape


def test_pictures_need_one_or_three_channels(tmp_path: Path) -> None:
    source = viz.load_source(_model(tmp_path, (2, 8, 8)))
    with pytest.raises(UsageError, match=r"1 or 3 channels; this model's are \(2, 8, 8\)"):
        viz.vary(source, tmp_path / "v.png", dataset="mnist", data_root=tmp_path / "none")


# --- 4. property: a PNG or one of our errors ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[int, viz.Source]:
    tmp = tmp_path_factory.mktemp("tiny")
    return {d: viz.load_source(_model(tmp, (1, 8, 8), d=d, name=f"d{d}.pt", dataset="synthetic")) for d in (2, 3)}


_sizes = st.one_of(st.integers(-3, 12), st.sampled_from([0, 1, 2, 1001, 10**6, 2**63]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    view=st.sampled_from(["reconstruct", "interpolate", "vary", "latent_map"]),
    d=st.sampled_from([2, 3]),
    size=_sizes,
    limit=st.integers(-2, 12),
    seed=st.one_of(st.integers(-3, 50), st.sampled_from([2**32 - 1, 2**32, 2**64])),
    method=st.sampled_from(["auto", "tsne", "pca"]),
)
def test_views_write_a_png_or_raise_our_error(
    tiny: dict[int, viz.Source], tmp_path: Path, view: str, d: int, size: int, limit, seed: int, method: str
) -> None:
    out = tmp_path / f"{view}.png"
    out.unlink(missing_ok=True)
    opts = {
        "reconstruct": {"n": size},
        "interpolate": {"steps": size},
        "vary": {"n": size},
        "latent_map": {"grid": size, "limit": limit, "method": method},
    }[view]
    try:
        path = getattr(viz, view)(tiny[d], out, seed=seed, **opts)
    except VaeDeployError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert not out.exists()
    else:
        assert path == out and min(_png(out).shape[:2]) > 50

"""Datasets of image files and of other layouts, on real files: a folder with mixed formats, nested
labels, a corrupt file, odd names and transparency; its decode cache; scikit-learn's digits; the
folder-vs-built-in MNIST equivalence; CIFAR-10's binary and python files (read, never unpickled)."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_deploy import image_folder
from vae_deploy.cli import main
from vae_deploy.data import load_splits, read_idx, split_indices
from vae_deploy.errors import ConfigError, DataError
from vae_deploy.inert_pickle import Call, Global, read_inert


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test decodes into its own cache folder (never the user's ~/.cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(image_folder.CACHE_ENV, str(cache))
    return cache


def _solid(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """cats/ and dogs/ (one nested deeper), five formats, upper-case suffix, a corrupt file, a hidden
    folder, a text file, a non-UTF-8 name, a transparent PNG and an EXIF-rotated JPEG."""
    root = tmp_path / "photos"
    (root / "cats" / "deeper").mkdir(parents=True)
    (root / "dogs").mkdir()
    (root / ".thumbs").mkdir()
    rgba = _solid((30, 20), (255, 0, 0, 255), "RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, 30, 10))  # the top half fully transparent: white when flattened
    rgba.save(root / "cats" / "a.png")
    _solid((40, 40), (0, 255, 0)).save(root / "cats" / "deeper" / "b.jpg", quality=95)
    _solid((16, 16), (0, 0, 255)).save(root / "dogs" / "c.webp", lossless=True)
    _solid((16, 16), (10, 20, 30)).save(root / "dogs" / "d.bmp")
    gray16 = Image.fromarray(np.full((12, 12), 40000, np.uint16))  # 16-bit gray: 40000/257 = 156
    gray16.save(root / "dogs" / "e.PNG")
    wide = Image.new("RGB", (40, 20), (255, 255, 0))
    wide.paste((0, 255, 255), (0, 0, 20, 20))  # left half cyan, right half yellow
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    wide.save(root / "dogs" / "f.jpg", exif=exif, quality=95)
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    _solid((8, 8), (1, 2, 3)).save(root / ".thumbs" / "hidden.png")
    _solid((8, 8), (200, 100, 50)).save(os.fsdecode(os.fsencode(str(root / "dogs")) + b"/\xff\xfe.png"))
    return root


def test_a_mixed_folder_decodes_with_labels_skips_and_counts(mixed: Path, _cache: Path) -> None:
    d = image_folder.load_folder(mixed, (3, 16, 16))
    names = [os.fsencode(f) for f in d.files]
    assert names == sorted(names) and len(d.files) == 7  # 8 image files, one unreadable; hidden ones skipped
    assert d.skipped == 1 and "broken.jpg" in d.skipped_example
    assert d.classes == ("cats", "dogs")
    assert [d.classes[k] for k in d.labels] == [f.split(os.sep)[0] for f in d.files]
    assert d.images.shape == (7, 3, 16, 16) and d.images.dtype == np.uint8
    px = {f.split(os.sep)[-1]: d.images[i] for i, f in enumerate(d.files)}
    a = px["a.png"]  # transparent top half over white, opaque red below
    assert (a[:, 1, 8] == 255).all() and tuple(a[:, 14, 8]) == (255, 0, 0)
    assert np.abs(px["b.jpg"].astype(int) - [[[0]], [[255]], [[0]]]).max() <= 3
    assert tuple(px["c.webp"][:, 0, 0]) == (0, 0, 255) and tuple(px["d.bmp"][:, 5, 5]) == (10, 20, 30)
    assert (px["e.PNG"] == 156).all()  # 16-bit gray scaled to 8 bits, then to RGB
    f = px["f.jpg"].astype(int)  # upright: the wide image stands, cyan on top; the crop keeps both
    assert np.abs(f[:, 2, 8] - [0, 255, 255]).max() <= 8 and np.abs(f[:, 13, 8] - [255, 255, 0]).max() <= 8
    assert "1 unreadable file skipped (e.g. dogs/broken.jpg" in d.describe()
    # the cache is outside the folder, and nothing was written into the folder
    assert d.cache.parent == _cache and not any(p.suffix in (".u8", ".tmp") for p in mixed.rglob("*"))


def test_the_cache_is_reused_and_follows_the_folder(mixed: Path) -> None:
    first = image_folder.load_folder(mixed, (1, 12, 12))
    again = image_folder.load_folder(mixed, (1, 12, 12))
    assert first.fresh and not again.fresh and np.array_equal(np.asarray(first.images), np.asarray(again.images))
    other = image_folder.load_folder(mixed, (3, 12, 12))  # another shape: its own entry
    assert other.fresh and other.cache != first.cache
    _solid((9, 9), (7, 7, 7)).save(mixed / "cats" / "new.png")  # the folder changes: decoded again
    grown = image_folder.load_folder(mixed, (1, 12, 12))
    assert grown.fresh and len(grown.images) == len(first.images) + 1 and grown.cache == first.cache
    grown.cache.write_bytes(grown.cache.read_bytes()[:-3])  # a damaged cache is rebuilt, not trusted
    assert image_folder.load_folder(mixed, (1, 12, 12)).fresh


def test_folder_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds no image files .* 1 other file"):
        load_splits("folder", empty, image_shape=(3, 8, 8))
    with pytest.raises(DataError, match="no such folder"):
        load_splits("folder", tmp_path / "missing", image_shape=(3, 8, 8))
    with pytest.raises(DataError, match="pass --data-root DIR"):
        load_splits("folder", None, image_shape=(3, 8, 8))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 image files"):
        load_splits("folder", junk, image_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="image_shape is needed for dataset folder"):
        from vae_deploy.config import make_configs

        make_configs({}, {"dataset": "folder"})
    code = main(["train", "--dataset", "folder", "--data-root", str(empty), "--image-shape", "3,8,8", "--out",
                 str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "holds no image files" in err
    assert not (tmp_path / "run").exists()


def test_a_folder_splits_deterministically_and_says_so(mixed: Path) -> None:
    s = load_splits("folder", mixed, image_shape=(3, 8, 8))
    assert (len(s.train_x), len(s.val_x)) == (6, 1) and "6 train / 1 validation" in s.note
    assert s.classes == ("cats", "dogs") and "1 unreadable file skipped" in s.note
    raw = load_splits("folder", mixed, image_shape=(3, 8, 8), as_float=False)
    assert raw.train_x.dtype == torch.uint8 and torch.equal(raw.train_x.float() / 255, s.train_x)


def test_mnist_as_png_files_equals_the_built_in_dataset(data_root: Path, tmp_path: Path) -> None:
    """A slice of MNIST written as PNGs (names in file order) decodes to the same pixels, and a folder
    of n images splits by the same rule the built-in t10k fallback uses (so all 10,000 split alike)."""
    raw = read_idx(data_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")
    folder = tmp_path / "mnist_png"
    folder.mkdir()
    n = 300
    for i in range(n):
        Image.fromarray(raw[i]).save(folder / f"{i:05d}.png")
    s = load_splits("folder", folder, image_shape=(1, 28, 28), as_float=False)
    train, val = split_indices(n)
    assert torch.equal(s.train_x[:, 0], torch.from_numpy(raw[:n][train.numpy()]))
    assert torch.equal(s.val_x[:, 0], torch.from_numpy(raw[:n][val.numpy()]))
    built_in = load_splits("mnist", data_root, as_float=False)
    train, val = split_indices(len(raw))
    assert torch.equal(built_in.val_x[:, 0], torch.from_numpy(raw[val.numpy()]))
    assert torch.equal(built_in.train_x[:, 0], torch.from_numpy(raw[train.numpy()]))


def test_digits_are_real_8x8_images() -> None:
    s = load_splits("digits")
    assert s.train_x.shape == (1617, 1, 8, 8) and s.val_x.shape == (180, 1, 8, 8)
    assert 0 <= s.train_x.min() and s.train_x.max() == 1.0 and s.classes == tuple("0123456789")
    assert set(s.val_y.tolist()) == set(range(10)) and "1,617 train / 180 validation" in s.note
    from vae_deploy.config import make_configs

    model, _ = make_configs({"arch": "resconv"}, {"dataset": "digits"})
    assert model.image_shape == (1, 8, 8)  # the dataset's own shape when none is given


# --- CIFAR-10 ------------------------------------------------------------------------------------


def _py2_batch(pixels: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 python batch as Python 2's cPickle wrote it (protocol 2, str as BINSTRING,
    a numpy array as _reconstruct + BUILD), built opcode by opcode."""

    def s(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text  # SHORT_BINSTRING

    no_fields = b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # names, fields, itemsize, alignment, flags
    dtype = b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R" + b"(K\x03" + s(b"|") + no_fields
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        + b"(K\x01M" + struct.pack("<H", pixels.shape[0]) + b"M" + struct.pack("<H", pixels.shape[1]) + b"\x86"
        + dtype + b"\x89T" + struct.pack("<i", pixels.size) + pixels.tobytes() + b"tb"
    )  # fmt: skip
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + label_list + s(b"batch_label") + s(b"x") + b"u."


def _cifar(root: Path, kind: str, per_batch: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-bin" if kind == "bin" else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    everything = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        everything.append(pixels)
        if kind == "bin":
            (folder / f"{name}.bin").write_bytes(np.column_stack([np.array(labels, np.uint8), pixels]).tobytes())
        elif kind == "py2":
            (folder / name).write_bytes(_py2_batch(pixels, labels))
        else:  # Python 3's pickle at protocol 2 (bytes via _codecs.encode) and 4 (BINBYTES8)
            batch = {b"data": pixels, b"labels": labels, b"batch_label": b"x"}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if i % 2 else 4))
    return np.concatenate(everything).reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("kind", ["bin", "py2", "py3"])
def test_cifar10_reads_every_layout_without_unpickling(kind: str, tmp_path: Path) -> None:
    want = _cifar(tmp_path, kind)
    s = load_splits("cifar10", tmp_path, as_float=False)
    assert torch.equal(torch.cat([s.train_x, s.val_x]), torch.from_numpy(want))
    assert (len(s.train_x), len(s.val_x)) == (20, 4) and s.classes[0] == "airplane"
    assert s.train_y[:4].tolist() == [0, 1, 2, 3] and s.val_y.tolist() == [5, 6, 7, 8]


def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # what a tampered file would carry
            return (os.system, (f"touch {marker}",))

    _cifar(tmp_path, "py3")
    target = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    target.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [1]}, protocol=2))
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_splits("cifar10", tmp_path)
    assert not marker.exists()
    tree = read_inert(pickle.dumps(Evil(), protocol=4))  # the call is a record, not a call
    assert isinstance(tree, Call) and tree.func == Global("posix" if os.name == "posix" else "nt", "system")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        target.write_bytes(b"\x80\x02}q\x00(")  # truncated
        load_splits("cifar10", tmp_path)


def test_cifar10_missing_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-bin.*--download"):
        load_splits("cifar10", tmp_path)
    with pytest.raises(DataError, match="not a CIFAR-10 binary batch"):
        folder = tmp_path / "cifar-10-batches-bin"
        folder.mkdir()
        for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
            (folder / f"{name}.bin").write_bytes(b"\x00" * 100)
        load_splits("cifar10", tmp_path)


def test_celeba_layout_uses_its_partition_file(tmp_path: Path) -> None:
    images = tmp_path / "celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    lines = []
    for i in range(1, 9):
        buf = io.BytesIO()
        _solid((178, 218), (i * 20, 0, 0)).save(buf, format="JPEG", quality=95)
        (images / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        lines.append(f"{i:06d}.jpg {0 if i <= 5 else 1 if i <= 7 else 2}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    s = load_splits("celeba", tmp_path, image_shape=(3, 16, 16), as_float=False)
    assert (len(s.train_x), len(s.val_x)) == (5, 2) and "train (5) / validation (2)" in s.note
    assert abs(int(s.val_x[0, 0, 8, 8]) - 120) <= 4  # 000006.jpg: the first validation image


def test_encode_a_folder_with_odd_names_from_a_checkpoint(mixed: Path, tmp_path: Path) -> None:
    """Defaults come from the checkpoint (dataset folder, its folder); a non-UTF-8 name survives."""
    from vae_deploy.checkpoint import save_checkpoint
    from vae_deploy.config import ModelConfig, TrainConfig
    from vae_deploy.encode import encode_dataset
    from vae_deploy.model import VAE

    cfg = ModelConfig(arch="resconv", image_shape=(3, 16, 16), conv_channels=(4,), latent_dim=3)
    ckpt = save_checkpoint(tmp_path / "m.pt", VAE(cfg), TrainConfig(dataset="folder", data_root=str(mixed)))
    result = encode_dataset(ckpt, tmp_path / "z.npz", batch_size=3)
    assert (result.count, result.skipped, result.latent_shape) == (7, 1, (3,))
    with np.load(tmp_path / "z.npz") as z:
        assert os.path.join("dogs", os.fsdecode(b"\xff\xfe.png")) in list(z["files"])
        assert z["mu"].shape == (7, 3) and list(z["classes"]) == ["cats", "dogs"]

"""Embed a vae-deploy decoder in your own app: onnxruntime + numpy + pillow, nothing else.

    python examples/embed_decoder.py exported/decoder.onnx -n 64 --seed 0 --out samples.png

Everything the app needs is inside decoder.onnx: input ``z`` float32 [batch, *latent_shape], output
``x_hat`` float32 [batch, C, H, W] in [0, 1], and the latent and image shapes in its metadata
(``vae_deploy.latent_shape``, ``vae_deploy.image_shape``; docs/CONTRACT.md). z is drawn exactly as
``vae_deploy.VAERuntime.sample(n, seed)`` draws it, so both give the same images for a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def load_decoder(path: str) -> tuple[ort.InferenceSession, tuple[int, ...], tuple[int, int, int]]:
    """The decoder session, its latent shape and its image shape (C, H, W), read from the file."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # or CUDAExecutionProvider
    meta = session.get_modelmeta().custom_metadata_map
    if "vae_deploy.latent_shape" in meta:
        latent_shape = tuple(json.loads(meta["vae_deploy.latent_shape"]))
    else:  # files written by vae-deploy 0.1 (contract version 1)
        latent_shape = (int(meta["vae_deploy.latent_dim"]),)
    image_shape = tuple(json.loads(meta["vae_deploy.image_shape"]))
    return session, latent_shape, image_shape


BLOCK_ROWS = 1024  # vae-deploy's sampling stream (version 2): one key per block of 1024 rows


def latents(seed: int, start: int, stop: int, latent_shape: tuple[int, ...]) -> np.ndarray:
    """Rows [start, stop) of the seeded z stream (docs/CONTRACT.md): row i depends only on (seed, i)."""
    parts = []
    for block in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(block,)))
        first = block * BLOCK_ROWS
        rows = rng.standard_normal((min(stop, first + BLOCK_ROWS) - first, *latent_shape), dtype=np.float32)
        parts.append(rows[max(0, start - first) :])
    return np.concatenate(parts)


def sample(session: ort.InferenceSession, latent_shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """n images [n, C, H, W] in [0, 1] decoded from z ~ N(0, I), seeded."""
    return session.run(["x_hat"], {"z": latents(seed, 0, n, latent_shape)})[0]


def grid(images: np.ndarray, padding: int = 2) -> Image.Image:
    """Tile [n, C, H, W] images (C = 1 or 3) into one roughly square picture."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((padding + rows * (h + padding), padding + cols * (w + padding), c), np.uint8)
    pixels = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    for i, img in enumerate(pixels):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        canvas[top : top + h, left : left + w] = img
    return Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoder", help="path to decoder.onnx from a vae-deploy export folder")
    parser.add_argument("-n", type=int, default=64, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--npy", help="also save the raw images [n, C, H, W] float32 here")
    args = parser.parse_args(argv)

    session, latent_shape, image_shape = load_decoder(args.decoder)
    images = sample(session, latent_shape, args.n, args.seed)
    grid(images).save(args.out)
    if args.npy:
        np.save(args.npy, images)
    print(f"{args.n} samples of shape {list(image_shape)} (latent {list(latent_shape)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

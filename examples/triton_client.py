"""Sample images from a vae-deploy decoder served by NVIDIA Triton, over gRPC (tritonclient + numpy).

    vae-deploy triton exported --repo model_repository          # writes vae_decoder, vae_encoder
    docker run --gpus all --rm -p 8001:8001 -v $PWD/model_repository:/models \\
        nvcr.io/nvidia/tritonserver:25.01-py3 tritonserver --model-repository=/models
    python examples/triton_client.py --url localhost:8001 --model vae_decoder -n 64 --seed 0 --out samples.npy

The latent shape and the batch limit are read from the model's config on the server. z is drawn as
``VAERuntime.sample(n, seed)`` draws it, so the images are the runtime's (bit for bit on CPU
instances, to float rounding on GPUs). Needs ``pip install 'tritonclient[grpc]'`` (and pillow for .png).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 30.0


def latents(n: int, latent_shape: tuple[int, ...], seed: int) -> np.ndarray:
    """z ~ N(0, I), exactly as vae-deploy's runtime draws it for (n, seed)."""
    return np.random.default_rng(seed).standard_normal((n, *latent_shape), dtype=np.float32)


def build_request(
    z: np.ndarray, input_name: str = "z", output_name: str = "x_hat"
) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
    """The inputs and requested outputs of one decode request for latents z [batch, *latent_shape]."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    tensor = grpcclient.InferInput(input_name, list(z.shape), "FP32")
    tensor.set_data_from_numpy(z)
    return [tensor], [grpcclient.InferRequestedOutput(output_name)]


def model_shape(client: grpcclient.InferenceServerClient, model: str) -> tuple[tuple[int, ...], int]:
    """(latent shape, max batch size) from the model's config on the server."""
    config = client.get_model_config(model, client_timeout=TIMEOUT_S).config
    (z,) = [t for t in config.input if t.name == "z"]
    dims = tuple(int(d) for d in z.dims)
    if config.max_batch_size == 0:  # the config lists the batch axis itself
        dims = dims[1:]
    if any(d < 1 for d in dims):
        raise ValueError(f"{model} has latent dims {list(dims)}; this example needs fixed ones")
    return dims, config.max_batch_size or 1024


def decode(client: grpcclient.InferenceServerClient, model: str, z: np.ndarray, max_batch: int) -> np.ndarray:
    """Images for latents z, in requests of at most ``max_batch`` rows (Triton batches them further)."""
    parts = []
    for start in range(0, len(z), max_batch):
        inputs, outputs = build_request(z[start : start + max_batch])
        result = client.infer(model, inputs, outputs=outputs, client_timeout=TIMEOUT_S)
        parts.append(result.as_numpy("x_hat"))
    return np.concatenate(parts)


def save(images: np.ndarray, path: str) -> None:
    if path.endswith(".png"):
        from PIL import Image

        n, c, h, w = images.shape
        cols = int(np.ceil(np.sqrt(n)))
        grid = np.zeros((c, -(-n // cols) * h, cols * w), np.float32)
        for i, img in enumerate(images):
            grid[:, (i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = img
        pixels = (np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8)
        Image.fromarray(pixels[0] if c == 1 else pixels.transpose(1, 2, 0)).save(path)
    else:
        np.save(path, images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton's gRPC address")
    parser.add_argument("--model", default="vae_decoder")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.npy", help=".npy ([n, C, H, W] float32) or .png (grid)")
    args = parser.parse_args(argv)
    try:
        client = grpcclient.InferenceServerClient(args.url)
        if not client.is_server_live(client_timeout=TIMEOUT_S):
            raise InferenceServerException(f"Triton at {args.url} is not live")
        latent_shape, max_batch = model_shape(client, args.model)
        images = decode(client, args.model, latents(args.n, latent_shape, args.seed), max_batch)
    except (InferenceServerException, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {args.model} at {args.url}: {message}", file=sys.stderr)
        return 1
    save(images, args.out)
    print(f"wrote {len(images)} images {list(images.shape[1:])} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

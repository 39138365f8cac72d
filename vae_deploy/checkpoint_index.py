"""A checkpoint's index, read without materialising a single tensor: names, shapes, dtypes, sizes.

``read_pt_index`` reads a torch zip checkpoint's pickle (bounded in size) with an unpickler that
knows only the few globals a plain-weights checkpoint uses and turns every tensor into a
:class:`TensorInfo`; ``read_safetensors_header`` parses a ``.safetensors`` header (bounded length,
bounded JSON nesting). The caller compares them with the model config before anything is loaded,
so a small file cannot make us allocate gigabytes. Torch-free.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vae_deploy.errors import CheckpointError

PICKLE_LIMIT = 8 << 20  # a checkpoint's pickle holds configs and history, never tensor data
HEADER_LIMIT = 100 << 20  # safetensors header length
JSON_DEPTH_LIMIT = 32
MAX_EXPANSION = 64  # a zip member may decompress to at most this many times its stored size (+1 MiB)

ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
}
_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorInfo:
    """What the index says about one tensor (``dtype`` as torch names it, e.g. ``float32``)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class PtIndex:
    """A torch zip checkpoint, indexed: its state with ``TensorInfo`` for tensors, and sizes."""

    state: Any
    total_bytes: int  # the members' uncompressed sizes, from the zip directory


class _Storage:
    __slots__ = ("dtype", "numel")

    def __init__(self, dtype: str, numel: int) -> None:
        self.dtype, self.numel = dtype, numel


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorInfo:
    if not isinstance(storage, _Storage) or not isinstance(size, tuple) or len(size) > 16:
        raise CheckpointError("malformed tensor record")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in size):
        raise CheckpointError("malformed tensor shape")
    return TensorInfo(tuple(size), storage.dtype)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Refused(Exception):
    pass


class _IndexUnpickler(pickle.Unpickler):
    """Builds nothing but containers, scalars and ``TensorInfo``: no other global is ever called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError("malformed storage record")
        kind, numel = pid[1], pid[4]
        if not isinstance(kind, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError("malformed storage record")
        return _Storage(kind.dtype, numel)


def read_pt_index(path: str | os.PathLike) -> PtIndex | None:
    """Index a torch zip checkpoint; None if ``path`` is not a zip (a legacy torch file)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path} is not a readable torch checkpoint (no single data.pkl)")
            if pickles[0].file_size > PICKLE_LIMIT:
                raise CheckpointError(
                    f"{path} is not a plain-weights checkpoint: its pickle is {pickles[0].file_size:,} "
                    f"bytes (at most {PICKLE_LIMIT:,} allowed)"
                )
            for info in infos:
                if info.file_size > MAX_EXPANSION * info.compress_size + (1 << 20):
                    raise CheckpointError(
                        f"refusing to load {path}: its member {info.filename} expands from "
                        f"{info.compress_size:,} to {info.file_size:,} bytes (a zip bomb?)"
                    )
            with zf.open(pickles[0]) as f:
                raw = f.read(PICKLE_LIMIT + 1)
    except CheckpointError:
        raise
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({str(exc)[:160]})") from None
    try:
        state = _IndexUnpickler(io.BytesIO(raw)).load()
    except _Refused as exc:
        raise CheckpointError(
            f"refused to load {path}: it is not a plain-weights checkpoint (its pickle wants {exc}, "
            "which weights-only loading forbids)"
        ) from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle: truncated, bad opcodes, too deep
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    return PtIndex(state, sum(i.file_size for i in infos))


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def loads_bounded(text: str | bytes, what: str, max_depth: int = JSON_DEPTH_LIMIT) -> Any:
    """``json.loads`` that turns bad or too deeply nested JSON into ``CheckpointError``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply (at most {max_depth} levels)") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{what} is not valid JSON ({str(exc)[:120]})") from None
    if _depth(value) > max_depth:
        raise CheckpointError(f"{what} is nested too deeply (at most {max_depth} levels)")
    return value


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (name -> ``TensorInfo``) and string metadata a ``.safetensors`` header lists.

    Checks the header's length and structure and that every tensor's byte range fits its shape and
    the file, reading only the header.
    """
    path = Path(path)
    bad = f"{path} is not a readable safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if n < 2 or n > HEADER_LIMIT or 8 + n > size:
                raise CheckpointError(f"{bad} (header length {n} does not fit a file of {size:,} bytes)")
            header = loads_bounded(f.read(n), f"{bad}: its header")
    except OSError as exc:
        raise CheckpointError(f"{bad} ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{bad} (its __metadata__ is not a table of strings)")
    tensors, data_size = {}, size - 8 - n
    for name, entry in header.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and entry["dtype"] in _SAFETENSORS_DTYPES
            and isinstance(entry.get("shape"), list)
            and len(entry["shape"]) <= 16
            and all(type(d) is int and 0 <= d < 2**62 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(type(o) is int for o in entry["data_offsets"])
        ):
            raise CheckpointError(f"{bad} (malformed entry for tensor {name!r:.60})")
        info = TensorInfo(tuple(entry["shape"]), _SAFETENSORS_DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_size or end - start != info.nbytes:
            raise CheckpointError(f"{bad} (tensor {name!r:.60} does not fit its byte range)")
        tensors[name] = info
    return tensors, meta

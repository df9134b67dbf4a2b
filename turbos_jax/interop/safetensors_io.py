"""Reading and writing the safetensors format with numpy alone (no torch), bf16 included.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name
to {"dtype", "shape", "data_offsets": [begin, end)} (offsets into the byte buffer after the header),
and that buffer. A sharded checkpoint adds `model.safetensors.index.json` ({"weight_map": name ->
file}). Tensors are read as read-only memory maps, so only the bytes a caller slices and copies
ever reach host memory.

The `safetensors` package's numpy API cannot read or write bfloat16 (safetensors 0.8.0:
"data type 'bfloat16' not understood"), the dtype of nearly every published checkpoint, so this
module parses the (documented, tiny) format itself with `ml_dtypes` for bf16.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A checkpoint file is missing, malformed or holds a dtype this reader does not know."""


def _read_header(path: str) -> tuple[dict, int, dict]:
    """(header without __metadata__, byte offset of the data buffer, __metadata__ or {})."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a mapping")
    except (OSError, struct.error, ValueError) as e:
        raise SafetensorsError(f"{path}: not a readable safetensors file ({e})") from None
    return header, 8 + length, metadata


def read_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` strings of one safetensors file ({} when it has none)."""
    return _read_header(path)[2]


class TensorReader:
    """The tensors of a checkpoint directory (index + shards, or one model.safetensors), or of one
    safetensors file when `directory` is a file."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(directory):
            directory, files = os.path.dirname(directory), [os.path.basename(directory)]
        elif os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise SafetensorsError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, start, _ = _read_header(path)
            for key, info in header.items():
                self._where[key] = (path, info, start)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])

    def dtype(self, key: str) -> np.dtype:
        path, info, _ = self._where[key]
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        return DTYPES[info["dtype"]]

    def read(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor in its stored dtype."""
        path, info, start = self._where[key]
        dtype = self.dtype(key)
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise SafetensorsError(f"{path}: tensor {key} has {end - begin} bytes for shape {shape}")
        if not shape or end == begin:
            with open(path, "rb") as f:
                f.seek(start + begin)
                return np.frombuffer(f.read(end - begin), dtype).reshape(shape)
        return np.memmap(path, dtype, "r", offset=start + begin, shape=shape)


def write_file(
    path: str, tensors: list[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> None:
    """One safetensors file of `tensors` (in order) with `metadata` strings (default format "pt",
    what transformers expects), written to `path`.tmp and renamed over `path` only once complete."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for key, arr in tensors:
        if arr.dtype not in CODES:
            raise SafetensorsError(f"tensor {key}: cannot store dtype {arr.dtype}")
        header[key] = {
            "dtype": CODES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data buffer starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(path + ".tmp", path)


def write_sharded(
    tensors: Iterable[tuple[str, np.ndarray]], directory: str, max_shard_bytes: int
) -> list[str]:
    """Writes (name, array) pairs, in order, into model-0000k-of-0000n.safetensors files of at most
    `max_shard_bytes` each (a larger tensor gets a file of its own) plus the index. Arrays are held
    only until their shard is written. Returns the file names."""
    os.makedirs(directory, exist_ok=True)
    written: list[str] = []
    weight_map: dict[str, int] = {}
    pending, size, total = [], 0, 0

    def flush():
        nonlocal pending, size
        if pending:
            name = f"shard-{len(written):05d}.tmp"
            write_file(os.path.join(directory, name), pending)
            for key, _ in pending:
                weight_map[key] = len(written)
            written.append(name)
            pending, size = [], 0

    for key, arr in _unique(tensors):
        if pending and size + arr.nbytes > max_shard_bytes:
            flush()
        pending.append((key, arr))
        size += arr.nbytes
        total += arr.nbytes
    flush()
    n = len(written)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(written, names, strict=True):
        os.replace(os.path.join(directory, tmp), os.path.join(directory, final))
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: names[i] for k, i in sorted(weight_map.items())},
    }
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names


def _unique(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    seen = set()
    for key, arr in tensors:
        if key in seen:
            raise SafetensorsError(f"tensor {key} written twice")
        seen.add(key)
        yield key, arr

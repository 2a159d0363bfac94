"""Safetensors shards read lazily (memory-mapped, tensor by tensor) and written streaming, with errors that name
the file and the tensor. Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian tensor bytes."""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """A shard is malformed or truncated, a tensor is missing, or a tensor has the wrong shape or dtype."""


def dtype_name(dtype) -> str:
    """Safetensors dtype name ('F32', 'BF16', ...) of a numpy dtype."""
    try:
        return NAMES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors") from None


class ShardFile:
    """One .safetensors file: the header is parsed and checked against the file size on open; tensors are
    memory-mapped views read on demand."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: {size} bytes is too short for a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: header length {n} does not fit in the file's {size} bytes "
                                      "(truncated or not a safetensors file)")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: malformed safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: malformed safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors = {}
        for name, entry in header.items():
            try:
                dtype, shape, (start, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r} "
                                      f"(dtypes we read: {', '.join(DTYPES)})") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - start != nbytes or start < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} spans bytes [{start}, {end}) but shape "
                                      f"{list(shape)} of {entry['dtype']} needs {nbytes} bytes")
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {self.data_start + end} but the "
                                      f"file has only {size} bytes (truncated shard)")
            self.tensors[name] = (np.dtype(dtype), shape, start)
        self._map = None

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only memory-mapped array (copy it to keep it past this object)."""
        dtype, shape, start = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self.data_start + start).reshape(shape)


class SafetensorsCheckpoint:
    """All shards of a checkpoint directory: `model.safetensors.index.json` (weight_map) if present, else every
    *.safetensors file. `get(name)` says which file should have held a missing tensor."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, INDEX_FILE)
        self._files: dict[str, ShardFile] = {}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    self.weight_map = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index ({e!r}); expected {{'weight_map': {{name: file}}}}")
            for file in sorted(set(self.weight_map.values())):
                if not os.path.isfile(os.path.join(self.directory, file)):
                    name = next(k for k, v in self.weight_map.items() if v == file)
                    raise CheckpointError(f"{index} maps tensor {name!r} to {file}, which does not exist in "
                                          f"{self.directory}")
        else:
            files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory} has no *.safetensors files and no {INDEX_FILE}")
            self.weight_map = {}
            for file in files:
                for name in self._shard(file).tensors:
                    self.weight_map[name] = file

    def _shard(self, file: str) -> ShardFile:
        if file not in self._files:
            self._files[file] = ShardFile(os.path.join(self.directory, file))
        return self._files[file]

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self.weight_map.get(name, "?"))

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` (memory-mapped); a CheckpointError names the tensor and the file it should be in."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint {self.directory} (no shard or "
                                  f"index entry holds it)")
        shard = self._shard(self.weight_map[name])
        if name not in shard.tensors:
            raise CheckpointError(f"tensor {name!r} is missing from {shard.path} (the index says it is there)")
        return shard.get(name)

    def shape_dtype(self, name: str):
        self.get(name)
        dtype, shape, _ = self._shard(self.weight_map[name]).tensors[name]
        return shape, dtype


def write_shard(path: str, entries: list[tuple[str, tuple, np.dtype]], produce: Callable[[str], np.ndarray],
                metadata: dict | None = None) -> int:
    """Writes one .safetensors file holding `entries` (name, shape, dtype) in order, asking `produce(name)` for
    each tensor only when it is written (so at most one tensor is in memory). Returns the data size in bytes."""
    header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
    for name, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            array = np.ascontiguousarray(produce(name))
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: tensor {name!r} produced {array.dtype}{list(array.shape)}, planned "
                                      f"{np.dtype(dtype)}{list(shape)}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
    return offset


def plan_shards(entries: Iterable[tuple[str, tuple, np.dtype]], max_shard_bytes: int) -> list[list]:
    """Groups entries in order into shards of at most `max_shard_bytes` (a larger single tensor gets its own)."""
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current:
        shards.append(current)
    return shards

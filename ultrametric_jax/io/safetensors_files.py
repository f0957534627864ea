"""Safetensors files through the `safetensors` library: verified reading, sharded writing.

Reading opens a file per tensor with the `pread` backend, so only the tensor being read is
resident (a memory map kept open would count the whole shard in the process's memory).
Writing holds one file's tensors at a time. The library refuses a file whose header does not
fit it (byte ranges beyond the end, sizes that do not match shape and dtype): a truncated
file, say; `describe_damage` then names the tensor at fault. Every float tensor read is
checked finite.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from ultrametric_jax.errors import CheckpointError, ConfigError
from ultrametric_jax.io.verify import check_finite

# The safetensors dtypes this loader accepts.
ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- reading

def describe_damage(path: str) -> str | None:
    """What is wrong with a safetensors file the library refused, naming the tensor at fault.

    Only a diagnosis: reading is the library's. None when nothing specific is found.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "shorter than 8 bytes"
        n = int.from_bytes(raw, "little")
        if 8 + n > size:
            return f"bad header length {n} (the file has {size} bytes)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"the header is not JSON ({e})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            return f"tensor {name}: malformed header entry {entry!r}"
        if dtype not in ST_DTYPES:
            return f"tensor {name}: unsupported safetensors dtype {dtype}"
        if math.prod(shape) * ST_DTYPES[dtype].itemsize != end - begin:
            return f"tensor {name}: byte size {end - begin} does not match shape {shape} of {dtype}"
        if end > data_bytes:
            return (f"tensor {name}: its bytes [{begin}, {end}) lie beyond the end of the data "
                    f"({data_bytes} bytes): the file is truncated")
    return None


def tensor_table(path: str) -> dict[str, tuple[tuple, str]]:
    """{name: (shape, safetensors dtype)} of a file, after the library has validated it."""
    try:
        with safe_open(path, framework="np") as f:
            table = {}
            for name in f.keys():
                view = f.get_slice(name)
                table[name] = (tuple(view.get_shape()), view.get_dtype())
    except SafetensorError as e:
        raise CheckpointError(f"invalid safetensors file {path}: "
                              f"{describe_damage(path) or e}") from None
    for name, (_, dtype) in table.items():
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"invalid safetensors file {path}: tensor {name}: "
                                  f"unsupported safetensors dtype {dtype}")
    return table


def read_tensor(path: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file, checked finite; the file is open only meanwhile."""
    try:
        with safe_open(path, framework="np", backend="pread") as f:
            arr = f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None
    check_finite(arr, name, path)
    return arr


class SafetensorsReader:
    """Tensor by tensor access to an HF checkpoint dir (single file or sharded)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(index):
            weight_map = _read_weight_map(index)
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"no safetensors weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}")
        self._entries = {}  # name -> (file path, shape, safetensors dtype)
        for fname in files:
            fpath = os.path.join(directory, fname)
            if not os.path.exists(fpath):
                raise CheckpointError(f"missing safetensors shard {fname} in {directory}")
            for name, (shape, dtype) in tensor_table(fpath).items():
                self._entries[name] = (fpath, shape, dtype)
        for name, fname in (weight_map or {}).items():
            if self._entries.get(name, (None,))[0] != os.path.join(directory, fname):
                raise CheckpointError(f"missing tensor {name} in shard {fname} of {directory} "
                                      f"(its index lists it there)")

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """Read one tensor from disk into a fresh numpy array, checked finite."""
        if name not in self._entries:
            raise CheckpointError(f"missing tensor {name} in checkpoint {self.directory}")
        return read_tensor(self._entries[name][0], name)


def _read_weight_map(index_path: str) -> dict:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"invalid safetensors index {index_path}: "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"invalid safetensors index {index_path}: weight_map is not a "
                              "JSON object")
    return weight_map


# ----------------------------------------------------------------------------- writing

def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple, np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: dict | None = None):
    """Write a safetensors file given (name, shape, dtype) specs, fetching each tensor.

    The file's tensors are all held in memory while the library writes it.
    """
    arrays = {}
    for name, shape, dtype in tensors:
        arr = np.ascontiguousarray(fetch(name), dtype=dtype)
        if arr.shape != tuple(shape):
            raise CheckpointError(f"tensor {name}: expected shape {tuple(shape)}, got {arr.shape}")
        arrays[name] = arr
    save_file(arrays, path, metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, 0o666 & ~_umask())  # the library creates 0600 files; keep the user's umask


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nbytes(spec) -> int:
    return math.prod(spec[1]) * np.dtype(spec[2]).itemsize


def plan_shards(specs: list[tuple[str, tuple, np.dtype]], max_shard_bytes: int) -> list[list]:
    """Group tensor specs, in order, into shards of at most max_shard_bytes (one tensor minimum)."""
    shards, current, size = [], [], 0
    for spec in specs:
        if current and size + _nbytes(spec) > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += _nbytes(spec)
    if current:
        shards.append(current)
    return shards


def write_sharded(directory: str, specs: list[tuple[str, tuple, np.dtype]],
                  fetch: Callable[[str], np.ndarray], max_shard_bytes: int,
                  progress: bool = False) -> list[str]:
    """Write model.safetensors, or model-0000k-of-0000n.safetensors + index when it is larger."""
    os.makedirs(directory, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    with progress_bar(sum(len(s) for s in shards), "writing tensors", progress) as bar:
        counted = _counting(fetch, bar)
        if len(shards) == 1:
            write_safetensors(os.path.join(directory, SINGLE_FILE), shards[0], counted)
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(directory, fname), shard, counted)
            names.append(fname)
            weight_map.update((spec[0], fname) for spec in shard)
    total = sum(_nbytes(spec) for spec in specs)
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def progress_bar(total, desc, enabled):
    """A tqdm bar (a context manager: closed when an error interrupts it)."""
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def _counting(fetch, bar):
    def wrapped(name):
        out = fetch(name)
        bar.update(1)
        return out
    return wrapped



def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '200MB', '10KiB'."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "B": 1}
    if isinstance(size, str):
        text = size.strip().upper()
        unit = next((u for u in units if text.endswith(u)), "")
        try:
            value = float(text[: len(text) - len(unit)]) * units.get(unit, 1)
        except ValueError:
            value = 0.0
    else:
        value = float(size)
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(f"invalid size {size!r}: expected a positive number of bytes such as "
                          "'5GB', '200MB' or '10KiB'")
    return int(value)

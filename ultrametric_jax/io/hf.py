"""Hugging Face safetensors checkpoints <-> the Flax Llama.

The name mapping is a table on the last path component: a Flax parameter path joined with
dots is the transformers name once its leaf is renamed (and 2-D `kernel`s transposed from
[in, out] to torch's [out, in]). Reading and writing stream tensor by tensor through a minimal
safetensors implementation (8-byte little-endian header length, JSON header, raw bytes), so a
conversion never holds more than the model plus one tensor in host memory.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ultrametric_jax.errors import CheckpointError
from ultrametric_jax.model.config import LlamaConfig

# Flax leaf name -> (transformers leaf name, transpose?).
LEAF_TABLE = {
    "kernel": ("weight", True),
    "bias": ("bias", False),
    "embedding": ("weight", False),
    "weight": ("weight", False),
}

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"




# ----------------------------------------------------------------------------- names

def hf_name(path: tuple) -> tuple[str, bool]:
    """(transformers name, transpose?) of a Flax parameter path."""
    *prefix, leaf = (str(p) for p in path)
    if leaf not in LEAF_TABLE:
        raise CheckpointError(f"no transformers name for parameter {'.'.join(map(str, path))}")
    name, transpose = LEAF_TABLE[leaf]
    return ".".join([*prefix, name]), transpose


def param_leaves(model, filter_=nnx.Param) -> list[tuple[tuple, nnx.Variable]]:
    """(path, Variable) of every parameter of `model` matching `filter_`, in path order."""
    return list(nnx.to_flat_state(nnx.state(model, filter_)))


# ----------------------------------------------------------------------------- safetensors io

def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict, byte offset of the data section)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"invalid safetensors file {path}: shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > os.path.getsize(path):
                raise CheckpointError(f"invalid safetensors file {path}: bad header length {n}")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"invalid safetensors file {path}: {e}") from None
    return header, 8 + n


class SafetensorsReader:
    """Random access to the tensors of an HF checkpoint dir (single file or sharded)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"no safetensors weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}")
        self._entries = {}  # name -> (file path, data offset, entry)
        for fname in files:
            fpath = os.path.join(directory, fname)
            if not os.path.exists(fpath):
                raise CheckpointError(f"missing safetensors shard {fname} in {directory}")
            header, offset = read_safetensors_header(fpath)
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self._entries[name] = (fpath, offset, entry)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple:
        return tuple(self._entries[name][2]["shape"])

    def get(self, name: str) -> np.ndarray:
        """Read one tensor from disk into a fresh numpy array (no memory map kept)."""
        if name not in self._entries:
            raise CheckpointError(f"missing tensor {name} in checkpoint {self.directory}")
        fpath, offset, entry = self._entries[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name}: unsupported safetensors dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        out = np.empty(entry["shape"], dtype)
        if out.nbytes != end - begin:
            raise CheckpointError(f"tensor {name}: byte size {end - begin} does not match "
                                  f"shape {entry['shape']} of {entry['dtype']}")
        with open(fpath, "rb") as f:
            f.seek(offset + begin)
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple, np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: dict | None = None):
    """Write a safetensors file given (name, shape, dtype) specs, fetching each tensor lazily."""
    specs = list(tensors)
    header, pos = {}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section aligned to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(fetch(name), dtype=dtype)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"tensor {name}: expected shape {tuple(shape)}, got {arr.shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def plan_shards(specs: list[tuple[str, tuple, np.dtype]], max_shard_bytes: int) -> list[list]:
    """Group tensor specs, in order, into shards of at most max_shard_bytes (one tensor minimum)."""
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_sharded(directory: str, specs: list[tuple[str, tuple, np.dtype]],
                  fetch: Callable[[str], np.ndarray], max_shard_bytes: int,
                  progress: bool = False) -> list[str]:
    """Write model.safetensors, or model-0000k-of-0000n.safetensors + index when it is larger."""
    os.makedirs(directory, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    bar = progress_bar(sum(len(s) for s in shards), "writing tensors", progress)
    counted = _counting(fetch, bar)
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, SINGLE_FILE), shards[0], counted)
        bar.close()
        return [SINGLE_FILE]
    names, weight_map, total = [], {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, fname), shard, counted)
        names.append(fname)
        for name, shape, dtype in shard:
            weight_map[name] = fname
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    bar.close()
    return names


def progress_bar(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def _counting(fetch, bar):
    def wrapped(name):
        out = fetch(name)
        bar.update(1)
        return out
    return wrapped


# ----------------------------------------------------------------------------- model fill

def abstract_model(config: LlamaConfig, dtype=jnp.float32, param_dtype=None):
    """The model's structure with ShapeDtypeStruct leaves: no parameter memory allocated."""
    from ultrametric_jax.model.llama import LlamaForCausalLM
    param_dtype = param_dtype or dtype
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype,
                                                   rngs=nnx.Rngs(0)))


def prepare_leaf(path: tuple, want, arr: np.ndarray, source: str):
    """A transformers-layout tensor -> the jnp value of the Flax leaf `path`.

    Checks the shape against `want` (a ShapeDtypeStruct), transposes kernels and casts to the
    parameter dtype; a wrong shape raises naming the tensor, the expected and the actual shape.
    """
    name, transpose = hf_name(path)
    transpose = transpose and arr.ndim == 2
    expected = tuple(want.shape[::-1]) if transpose else tuple(want.shape)
    if tuple(arr.shape) != expected:
        raise CheckpointError(f"shape mismatch for tensor {name} in {source}: "
                              f"expected {expected}, got {tuple(arr.shape)}")
    arr = arr.T if transpose else arr
    return jnp.asarray(np.asarray(arr).astype(want.dtype, copy=False))


def fill_model(abstract, fetch: Callable[[str], np.ndarray], *, source: str,
               progress: bool = False):
    """Materialise an abstract model leaf by leaf.

    fetch(hf_name) returns the tensor in transformers layout (numpy); only one source tensor
    is alive at a time.
    """
    graphdef, state = nnx.split(abstract)
    leaves = list(nnx.to_flat_state(state))
    bar = progress_bar(len(leaves), f"loading {os.path.basename(str(source)) or source}", progress)
    for path, var in leaves:
        var.set_value(prepare_leaf(path, var.get_value(), fetch(hf_name(path)[0]), source))
        bar.update(1)
    bar.close()
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- public entry

def hf_source(directory: str):
    """(config, fetch) of an HF Llama dir; fetch(hf_name) reads one tensor."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"missing config.json in {directory}")
    config = LlamaConfig.from_json_file(config_path)
    reader = SafetensorsReader(directory)
    return config, reader.get


def load_hf(directory: str, dtype=jnp.float32, param_dtype=None, progress: bool = False):
    """Load an HF Llama dir (config.json + model.safetensors[.index.json])."""
    config, fetch = hf_source(directory)
    return fill_model(abstract_model(config, dtype, param_dtype), fetch, source=directory,
                      progress=progress)


def write_hf_config(config: LlamaConfig, dtype, out_dir: str, extra: dict | None = None) -> str:
    """Write out_dir/config.json: the transformers config, its dtype, plus `extra` keys."""
    dtype_name = jnp.dtype(dtype).name
    hf_config = {**config.to_hf_dict(), "dtype": dtype_name, "torch_dtype": dtype_name,
                 **(extra or {})}
    path = os.path.join(out_dir, "config.json")
    with open(path, "w") as f:
        json.dump(hf_config, f, indent=2)
    return path


def save_hf_weights(model, directory: str, max_shard_size: int | str = "5GB",
                    filter_=nnx.Param, progress: bool = False) -> list[str]:
    """Write the parameters as transformers-named safetensors (sharded above max_shard_size)."""
    leaves = param_leaves(model, filter_)
    by_name, specs = {}, []
    for path, var in leaves:
        name, transpose = hf_name(path)
        value = var.get_value()
        shape = tuple(value.shape[::-1]) if transpose and value.ndim == 2 else tuple(value.shape)
        by_name[name] = (var, transpose)
        specs.append((name, shape, np.dtype(value.dtype)))

    def fetch(name):
        var, transpose = by_name[name]
        arr = np.asarray(jax.device_get(var.get_value()))
        return arr.T if transpose and arr.ndim == 2 else arr

    return write_sharded(directory, specs, fetch, parse_size(max_shard_size), progress)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '200MB', '10KiB'."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)

"""Hugging Face checkpoints (config.json + safetensors) <-> the Flax Llama.

The name mapping is a table on the last path component: a Flax parameter path joined with
dots is the transformers name once its leaf is renamed (and 2-D `kernel`s transposed from
[in, out] to torch's [out, in]). The files are read and written tensor by tensor by
`safetensors_files` (the `safetensors` library, every tensor verified), so loading never
holds more than the model plus one tensor.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrametric_jax.errors import CheckpointError
# The file layer, re-exported: the HF format's files.
from ultrametric_jax.io.safetensors_files import (INDEX_FILE, SINGLE_FILE,  # noqa: F401
                                                  SafetensorsReader, describe_damage,
                                                  parse_size, plan_shards, progress_bar,
                                                  write_safetensors, write_sharded)
from ultrametric_jax.io.verify import cast_overflows, check_finite
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.model.llama import LlamaForCausalLM
from ultrametric_jax.surgery.router import RouterParam

# Flax leaf name -> (transformers leaf name, transpose?).
LEAF_TABLE = {
    "kernel": ("weight", True),
    "bias": ("bias", False),
    "embedding": ("weight", False),
    "weight": ("weight", False),
}



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


def base_filter():
    """The base Llama's parameters: every nnx.Param that is not a router parameter."""
    return nnx.All(nnx.Param, nnx.Not(RouterParam))


# ----------------------------------------------------------------------------- model fill

def abstract_model(config: LlamaConfig, dtype=jnp.float32, param_dtype=None):
    """The model's structure with ShapeDtypeStruct leaves: no parameter memory allocated."""
    param_dtype = param_dtype or dtype
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype,
                                                   rngs=nnx.Rngs(0)))


def prepare_leaf(path: tuple, want, arr: np.ndarray, source: str):
    """A transformers-layout tensor -> the jnp value of the Flax leaf `path`.

    Checks the shape against `want` (a ShapeDtypeStruct), transposes kernels and casts to the
    parameter dtype; a wrong shape raises naming the tensor, the expected and the actual shape,
    and a cast that overflows (float32 weights beyond float16's range, say) names the tensor.
    """
    name, transpose = hf_name(path)
    transpose = transpose and arr.ndim == 2
    expected = tuple(want.shape[::-1]) if transpose else tuple(want.shape)
    if tuple(arr.shape) != expected:
        raise CheckpointError(f"shape mismatch for tensor {name} in {source}: "
                              f"expected {expected}, got {tuple(arr.shape)}")
    arr = np.asarray(arr.T if transpose else arr)
    with np.errstate(over="ignore"):  # an overflow is reported by name just below
        cast = arr.astype(want.dtype, copy=False)
    if cast_overflows(arr.dtype, cast.dtype):
        check_finite(cast, name, source, after=f"casting {arr.dtype} to {cast.dtype}")
    return jnp.asarray(cast)


def fill_model(abstract, fetch: Callable[[str], np.ndarray], *, source: str,
               progress: bool = False):
    """Materialise an abstract model leaf by leaf.

    fetch(hf_name) returns the tensor in transformers layout (numpy); only one source tensor
    is alive at a time.
    """
    graphdef, state = nnx.split(abstract)
    leaves = list(nnx.to_flat_state(state))
    desc = f"loading {os.path.basename(str(source)) or source}"
    with progress_bar(len(leaves), desc, progress) as bar:
        for path, var in leaves:
            var.set_value(prepare_leaf(path, var.get_value(), fetch(hf_name(path)[0]), source))
            bar.update(1)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- public entry

def read_config(path: str) -> LlamaConfig:
    """The LlamaConfig of a config.json; a file that is not a JSON object is a CheckpointError."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"invalid config.json {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"invalid config.json {path}: not a JSON object")
    return LlamaConfig.from_hf_dict(cfg)


def hf_source(directory: str):
    """(config, fetch) of an HF Llama dir; fetch(hf_name) reads one tensor."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"missing config.json in {directory}")
    config = read_config(config_path)
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

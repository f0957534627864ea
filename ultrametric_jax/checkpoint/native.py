"""The project's own checkpoint format: a directory holding

    ultrametric.json   {"format": "ultrametric_jax.native", "version": 1, "param_dtype": ...}
    config.json        the transformers-style Llama config
    params/            an Orbax checkpoint of the parameters, keyed by their Flax paths
    tokenizer.json     when the source had a tokenizer

Loading restores straight into the target dtype and shapes of an abstractly built model.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ultrametric_jax.checkpoint.hf import CheckpointError, abstract_model, param_leaves
from ultrametric_jax.config import LlamaConfig

FORMAT_FILE = "ultrametric.json"
FORMAT_NAME = "ultrametric_jax.native"
PARAMS_DIR = "params"


def _checkpointer(largest_bytes: int):
    """A synchronous Orbax checkpointer (an async one first copies the whole model to host).

    Bytes in flight are bounded by the largest tensor (rounded up to whole GB, as Orbax counts
    them), so converting costs the model plus about one tensor of memory.
    """
    import orbax.checkpoint as ocp
    limit = max(1, math.ceil(largest_bytes / 1e9))
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(
        save_concurrent_gb=limit, restore_concurrent_gb=limit))


def _largest(arrays) -> int:
    return max(int(math.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def is_native(path: str) -> bool:
    return os.path.isfile(os.path.join(path, FORMAT_FILE))


def _nested(leaves, value_of):
    tree = {}
    for path, var in leaves:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value_of(var)
    return tree


def _lookup(tree, path):
    for key in path:
        tree = tree[str(key)]
    return tree


def save_native(model, out_dir: str, tokenizer=None) -> str:
    """Write `model` (its nnx.Param leaves), its config and tokenizer to out_dir."""
    import orbax.checkpoint as ocp
    from ultrametric_jax.tokenizer import save_tokenizer
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    leaves = param_leaves(model)
    params = _nested(leaves, lambda v: v.get_value())
    dtype = jnp.dtype(leaves[0][1].get_value().dtype).name
    target = os.path.join(out_dir, PARAMS_DIR)
    checkpointer = _checkpointer(_largest(v.get_value() for _, v in leaves))
    checkpointer.save(target, args=ocp.args.StandardSave(params), force=True)
    checkpointer.close()
    del params
    config = model.config.to_hf_dict()
    config.update(dtype=dtype, torch_dtype=dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir, config=model.config)
    # Written last: its presence marks a complete checkpoint.
    with open(os.path.join(out_dir, FORMAT_FILE), "w") as f:
        json.dump({"format": FORMAT_NAME, "version": 1, "param_dtype": dtype}, f, indent=2)
    return out_dir


def load_native(path: str, dtype=jnp.float32, param_dtype=None):
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    with open(os.path.join(path, FORMAT_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}/{FORMAT_FILE} does not describe a {FORMAT_NAME} checkpoint")
    config = LlamaConfig.from_json_file(os.path.join(path, "config.json"))
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"missing parameter directory {params_dir}")
    abstract = abstract_model(config, dtype, param_dtype)
    graphdef, state = nnx.split(abstract)
    leaves = list(nnx.to_flat_state(state))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = _nested(leaves, lambda v: jax.ShapeDtypeStruct(
        v.get_value().shape, v.get_value().dtype, sharding=device))
    checkpointer = _checkpointer(_largest(v.get_value() for _, v in leaves))
    try:
        restored = checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
    except Exception as e:
        raise CheckpointError(f"cannot restore native checkpoint {path}: {e}") from e
    finally:
        checkpointer.close()
    for path_, var in leaves:
        var.set_value(_lookup(restored, path_))
    del restored
    return nnx.merge(graphdef, state)

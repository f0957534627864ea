"""The project's own checkpoint format: a directory holding

    ultrametric.json   {"format": "ultrametric_jax.native", "version": 1, "param_dtype": ...,
                        "groups": [...]}
    config.json        the transformers-style Llama config
    params/GROUP/      one Orbax checkpoint per group of parameters: model.embed_tokens,
                       model.layers.N (each decoder layer), model.norm, lm_head
    tokenizer.json     when the source had a tokenizer

Groups keep every step streaming: `convert_to_native` reads a source checkpoint and writes
one group at a time without ever building the whole model, and loading restores group by
group straight into the target dtype of an abstractly built model.
"""
from __future__ import annotations

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from ultrametric_jax.errors import CheckpointError
from ultrametric_jax.io.hf import (abstract_model, base_filter, hf_name, param_leaves,
                                   prepare_leaf, progress_bar, read_config, write_hf_config)
from ultrametric_jax.io.tokenizer import save_tokenizer
from ultrametric_jax.io.verify import check_finite
from ultrametric_jax.model.config import LlamaConfig

FORMAT_FILE = "ultrametric.json"
FORMAT_NAME = "ultrametric_jax.native"
PARAMS_DIR = "params"


def is_native(path: str) -> bool:
    return os.path.isfile(os.path.join(path, FORMAT_FILE))


def group_of(path: tuple) -> str:
    """'model.layers.N' for a decoder layer's parameters, else the module holding the leaf."""
    keys = [str(k) for k in path]
    depth = 3 if keys[:2] == ["model", "layers"] else len(keys) - 1
    return ".".join(keys[:depth])


def _relative(path: tuple, group: str) -> tuple[str, ...]:
    return tuple(str(k) for k in path)[len(group.split(".")):]


def _nested(items):
    tree = {}
    for keys, value in items:
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def _checkpointer(largest_bytes: int):
    """A synchronous Orbax checkpointer (an async one first copies everything to host).

    Bytes in flight are bounded by the largest tensor (rounded up to whole GB, as Orbax counts
    them).
    """
    limit = max(1, math.ceil(largest_bytes / 1e9))
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(
        save_concurrent_gb=limit, restore_concurrent_gb=limit))


def _nbytes(a) -> int:
    return int(math.prod(a.shape)) * jnp.dtype(a.dtype).itemsize


class _GroupWriter:
    """Writes params/GROUP checkpoints, then the metadata files that mark completion; a context
    manager, so that its Orbax checkpointer is closed however the writing ends."""

    def __init__(self, out_dir: str, largest_bytes: int):
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(os.path.join(self.out_dir, PARAMS_DIR), exist_ok=True)
        marker = os.path.join(self.out_dir, FORMAT_FILE)
        if os.path.exists(marker):
            os.remove(marker)  # an overwritten checkpoint is incomplete until finished
        self.checkpointer = _checkpointer(largest_bytes)
        self.groups = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.checkpointer.close()

    def write(self, group: str, items):
        target = os.path.join(self.out_dir, PARAMS_DIR, group)
        self.checkpointer.save(target, args=ocp.args.StandardSave(_nested(items)), force=True)
        self.groups.append(group)

    def finish(self, config: LlamaConfig, dtype: str, tokenizer=None) -> str:
        write_hf_config(config, dtype, self.out_dir)
        if tokenizer is not None:
            save_tokenizer(tokenizer, self.out_dir, config=config)
        with open(os.path.join(self.out_dir, FORMAT_FILE), "w") as f:
            json.dump({"format": FORMAT_NAME, "version": 1, "param_dtype": dtype,
                       "groups": self.groups}, f, indent=2)
        return self.out_dir


def save_native(model, out_dir: str, tokenizer=None) -> str:
    """Write `model`'s base Llama parameters (no routers), config and tokenizer to out_dir."""
    leaves = param_leaves(model, base_filter())
    with _GroupWriter(out_dir, max(_nbytes(v.get_value()) for _, v in leaves)) as writer:
        for group, items in itertools.groupby(leaves, key=lambda pv: group_of(pv[0])):
            writer.write(group, [(_relative(p, group), v.get_value()) for p, v in items])
        dtype = jnp.dtype(leaves[0][1].get_value().dtype).name
        return writer.finish(model.config, dtype, tokenizer)


def convert_to_native(config: LlamaConfig, fetch, out_dir: str, dtype=jnp.float32, *,
                      source: str, tokenizer=None, progress: bool = False) -> str:
    """Stream a checkpoint into the native format, one group of tensors in memory at a time.

    `fetch(hf_name)` returns a tensor in transformers layout (see hf_source and
    gguf_source).
    """
    leaves = param_leaves(abstract_model(config, dtype, dtype))
    desc = f"converting {os.path.basename(source) or source}"
    with (_GroupWriter(out_dir, max(_nbytes(v.get_value()) for _, v in leaves)) as writer,
          progress_bar(len(leaves), desc, progress) as bar):
        for group, items in itertools.groupby(leaves, key=lambda pv: group_of(pv[0])):
            arrays = []
            for path, var in items:
                arrays.append((_relative(path, group), prepare_leaf(
                    path, var.get_value(), fetch(hf_name(path)[0]), source)))
                bar.update(1)
            writer.write(group, arrays)
            del arrays
        return writer.finish(config, jnp.dtype(dtype).name, tokenizer)


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, FORMAT_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"invalid {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}/{FORMAT_FILE} does not describe a {FORMAT_NAME} checkpoint")
    return meta


def iter_native_leaves(path: str, leaves):
    """Restore the (flax path, abstract Variable) `leaves` group by group; yields
    (flax path, array) with each group's arrays only alive while consumed; every value is
    checked finite."""
    path = os.path.abspath(path)
    meta = _read_meta(path)
    groups = {g: list(items) for g, items in
              itertools.groupby(leaves, key=lambda pv: group_of(pv[0]))}
    missing = sorted(set(groups) - set(meta.get("groups", [])))
    if missing:
        raise CheckpointError(f"native checkpoint {path} lacks the parameter groups {missing}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpointer = _checkpointer(max(_nbytes(v.get_value()) for _, v in leaves))
    try:
        for group, items in groups.items():
            target = _nested([(_relative(p, group), jax.ShapeDtypeStruct(
                v.get_value().shape, v.get_value().dtype, sharding=device)) for p, v in items])
            try:
                restored = checkpointer.restore(os.path.join(path, PARAMS_DIR, group),
                                                args=ocp.args.StandardRestore(target))
            except Exception as e:
                raise CheckpointError(f"cannot restore group {group} of native checkpoint "
                                      f"{path}: {e}") from e
            for p, _ in items:
                node = restored
                for key in _relative(p, group):
                    node = node[key]
                check_finite(node, hf_name(p)[0], os.path.join(path, PARAMS_DIR, group))
                yield p, node
            del restored
    finally:
        checkpointer.close()


def native_config(path: str) -> LlamaConfig:
    _read_meta(path)
    return read_config(os.path.join(path, "config.json"))


def load_native(path: str, dtype=jnp.float32, param_dtype=None):
    config = native_config(path)
    graphdef, state = nnx.split(abstract_model(config, dtype, param_dtype))
    leaves = list(nnx.to_flat_state(state))
    variables = dict(leaves)
    for p, value in iter_native_leaves(path, leaves):
        variables[p].set_value(value)
    return nnx.merge(graphdef, state)

"""What a run was trained from and with: the identity of its frozen base model (paths and
sha256 of its files) and the surgery and model configuration that shaped its state.

A run checkpoint records both; restoring it under another base model, or under a configuration
that gives its routers another meaning (another tree, cut level, window or sink, another
architecture), is refused with an error naming what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.surgery.config import SurgeryConfig

_HASH_CHUNK = 1 << 23


class CheckpointMismatchError(ConfigError):
    """A checkpoint exists but belongs to another base model or another state layout."""


# ----------------------------------------------------------------------------- base identity

def _hash_cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ultrametric_jax", "sha256.json")


def file_sha256(path: str) -> str:
    """sha256 of a file, cached by (absolute path, size, mtime) so large weights hash once."""
    path = os.path.abspath(path)
    st = os.stat(path)
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_path()
    try:
        with open(cache_file) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # the cache is an optimisation only
    return cache[key]


def model_files(path: str) -> list[str]:
    """The files that define a base model: a .gguf file, or an HF directory's weights + config."""
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    if not os.path.isdir(path):
        raise ConfigError(f"base model path {path!r} does not exist")
    names = sorted(n for n in os.listdir(path)
                   if n == "config.json" or n.endswith((".safetensors", ".gguf", ".bin")))
    if not names:
        raise ConfigError(f"base model directory {path!r} holds no config.json or weight files")
    return [os.path.abspath(os.path.join(path, n)) for n in names]


def base_model_identity(path: str) -> dict:
    """{"path": abs path, "files": {name: sha256}} of the frozen base model."""
    files = model_files(path)
    return {"path": os.path.abspath(path),
            "files": {os.path.basename(f): file_sha256(f) for f in files}}


def check_same_base(saved: dict, current: dict) -> None:
    if saved.get("files") != current.get("files"):
        raise CheckpointMismatchError(
            f"the checkpoint was trained on base model {saved.get('path')!r} with files "
            f"{saved.get('files')}, but this run uses {current.get('path')!r} with files "
            f"{current.get('files')}; use the original base model or a fresh --workdir")


# ----------------------------------------------------------------------------- setup drift

def _topology(surgery: SurgeryConfig) -> dict:
    """The resolved fields that decide which pairs a trained router lets attend."""
    return {"arity": surgery.arity, "levels": surgery.num_levels, "d_max": surgery.max_distance,
            "cut_level": surgery.cut_level, "window": surgery.window,
            "sink_tokens": surgery.sink_tokens}


def surgery_changes(recorded: SurgeryConfig, current: SurgeryConfig) -> list[str]:
    """'field old -> new' for every topology field that differs (levels resolved from max_len
    where unset, d_max from levels)."""
    old, new = _topology(recorded), _topology(current)
    changes = []
    for name in old:
        if old[name] != new[name]:
            note = ""
            if name == "levels" and recorded.max_len != current.max_len and (
                    recorded.levels is None or current.levels is None):
                note = f" (from max_len {recorded.max_len} -> {current.max_len})"
            changes.append(f"{name} {old[name]} -> {new[name]}{note}")
    return changes


def model_changes(recorded: dict, current: dict) -> list[str]:
    """'model.field old -> new' for every base-model architecture field that differs."""
    return [f"model.{k} {recorded.get(k)!r} -> {current.get(k)!r}"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]


class ConfigDriftError(CheckpointMismatchError):
    """A checkpoint was trained under a surgery or model configuration that gives its state
    another meaning than the current one."""


def recorded_surgery(meta: dict) -> Optional[SurgeryConfig]:
    """The SurgeryConfig a checkpoint's state was trained with (None if it records none)."""
    record = meta.get("surgery") or (meta.get("config") or {}).get("surgery")
    return SurgeryConfig.from_dict(record) if record else None


def check_same_setup(meta: dict, where: str, surgery: SurgeryConfig,
                     model_config: Optional[dict] = None) -> None:
    """ConfigDriftError naming the fields when the checkpoint described by `meta` (`where`:
    e.g. "checkpoint step 8 in DIR") was trained with another topology or architecture."""
    changes = []
    saved = recorded_surgery(meta)
    if saved is not None:
        changes += surgery_changes(saved, surgery)
    if model_config is not None and meta.get("model_config") is not None:
        changes += model_changes(meta["model_config"], model_config)
    if changes:
        raise ConfigDriftError(
            f"{where} was trained with another configuration ({'; '.join(changes)}), which "
            "changes what its routers mean; use the run's own settings (its config.json) or "
            "a fresh --workdir")

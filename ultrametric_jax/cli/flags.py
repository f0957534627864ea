"""Command-line handling of ml_collections configs: `--config FILE` plus `--config.a.b=value`.

Config files are Python files with a `get_config()` that returns a ConfigDict (as in the Flax
examples). Overrides are parsed with the type of the field they replace, so `--config.train.lr=3e-4`
stays a float; an unknown key or a value of the wrong type is an error naming the key. The
resulting config is validated (`validate_config`) before anything heavy is loaded.
"""
from __future__ import annotations

import ast
import math
import os
import runpy
from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.surgery.config import SurgeryConfig

DEFAULT_CONFIG_NAME = "smollm2_shakespeare"
DTYPES = ("float32", "bfloat16", "float16")


def configs_dir() -> str:
    """The repository's configs/ directory (next to the package)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "configs")


def resolve_config_path(spec: Optional[str]) -> str:
    """A config file path from a path or a bare name of configs/ (None: the default)."""
    spec = spec or DEFAULT_CONFIG_NAME
    candidates = [spec]
    if not spec.endswith(".py") and os.sep not in spec:
        candidates.append(os.path.join(configs_dir(), spec + ".py"))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ConfigError(f"--config {spec!r}: no such config file (looked for "
                      f"{', '.join(repr(c) for c in candidates)})")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    try:
        module = runpy.run_path(path)
    except Exception as e:
        raise ConfigError(f"--config {path!r}: the config file failed to run: "
                          f"{type(e).__name__}: {e}") from e
    if not callable(module.get("get_config")):
        raise ConfigError(f"--config {path!r}: the file defines no get_config() function")
    config = module["get_config"]()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config {path!r}: get_config() must return an "
                          f"ml_collections.ConfigDict, got {type(config).__name__}")
    return config


def _parse_value(key: str, text: str, field_type: type, nullable: bool) -> Any:
    if field_type is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}={text!r}: expected a boolean (true/false)")
    if text.strip().lower() == "none" and nullable:
        return None
    if field_type is str:
        return text
    try:
        if field_type is int:
            value = ast.literal_eval(text.strip())
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError
            return value
        if field_type is float:
            return float(text)
        if field_type in (tuple, list):
            value = ast.literal_eval(text)
            return field_type(value if isinstance(value, (tuple, list)) else (value,))
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key}={text!r}: expected a value of type "
                          f"{field_type.__name__}") from None


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set config.<key> (dotted) from its command-line text, keeping the field's type."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parents[:i + 1])!r} "
                              "is not a config section")
        node = child
    if leaf not in node:
        known = ", ".join(sorted(node.keys()))
        where = ".".join(parents) or "the top level"
        raise ConfigError(f"unknown config key {key!r} (known keys under {where}: {known})")
    if isinstance(node.get(leaf), ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; override one of its fields")
    # Optional fields are typed placeholders (FieldReference): only they accept None.
    nullable = isinstance(node._fields.get(leaf), config_dict.FieldReference)
    value = _parse_value(key, text, node.get_type(leaf), nullable)
    try:
        setattr(node, leaf, value)
    except TypeError as e:
        raise ConfigError(f"--config.{key}={text!r}: {e}") from None


def parse_config_args(argv: list[str], *, extra_flags: tuple[str, ...] = ("workdir",)
                      ) -> tuple[ml_collections.ConfigDict, str, dict, list[str]]:
    """Split argv into (config, config_path, {flag: value}, positional rest).

    Accepts `--config FILE`, `--config=FILE`, `--config.a.b=V`, `--config.a.b V` and, for
    every name in extra_flags, `--name V` / `--name=V`.
    """
    config_spec, overrides, flags, rest = None, [], {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            rest.append(arg)
            i += 1
            continue
        name, has_eq, value = arg[2:].partition("=")
        if not has_eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{arg} needs a value")
            value, i = argv[i + 1], i + 1
        if name == "config":
            config_spec = value
        elif name.startswith("config."):
            overrides.append((name[len("config."):], value))
        elif name in extra_flags:
            flags[name] = value
        else:
            known = ", ".join(["--config", "--config.<key>"] + [f"--{f}" for f in extra_flags])
            raise ConfigError(f"unknown flag {arg.split('=')[0]!r} (known: {known})")
        i += 1
    path = resolve_config_path(config_spec)
    config = load_config_file(path)
    for key, text in overrides:
        apply_override(config, key, text)
    return config, path, flags, rest


# ----------------------------------------------------------------------------- validation

def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config value {key}={value!r}: {why}")


def surgery_config(config: ml_collections.ConfigDict) -> SurgeryConfig:
    """The SurgeryConfig of config.surgery (validated by SurgeryConfig itself)."""
    return SurgeryConfig.from_dict(config.surgery.to_dict())


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first invalid field of a run config."""
    required = ("name", "seed", "model", "surgery", "data", "train", "eval", "checkpoint")
    for key in required:
        _check(key in config, key, None, "missing from the config")
    t, e, c, d = config.train, config.eval, config.checkpoint, config.data
    for key, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size),
                       ("train.grad_accum", t.grad_accum), ("train.log_every", t.log_every),
                       ("eval.batches", e.batches), ("eval.batch_size", e.batch_size),
                       ("checkpoint.every", c.every), ("checkpoint.keep", c.keep)):
        _check(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")
    _check(t.seq_len >= 2, "train.seq_len", t.seq_len, "must be >= 2")
    _check(t.batch_size % t.grad_accum == 0, "train.batch_size", t.batch_size,
           f"must be a multiple of train.grad_accum={t.grad_accum}")
    _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "must be a finite number > 0")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _check(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay",
           t.weight_decay, "must be >= 0")
    _check(math.isfinite(t.clip_norm) and t.clip_norm >= 0, "train.clip_norm", t.clip_norm,
           "must be >= 0 (0 disables clipping)")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction,
           "must lie in (0, 1)")
    _check(d.chunk_chars >= 0, "data.chunk_chars", d.chunk_chars, "must be >= 0")
    _check(d.max_chars >= 0, "data.max_chars", d.max_chars, "must be >= 0")
    _check(config.model.dtype in DTYPES, "model.dtype", config.model.dtype,
           f"must be one of {DTYPES}")
    _check(config.model.param_dtype in DTYPES, "model.param_dtype", config.model.param_dtype,
           f"must be one of {DTYPES}")
    surgery = surgery_config(config)
    _check(surgery.max_len >= t.seq_len, "surgery.max_len", surgery.max_len,
           f"must be >= train.seq_len={t.seq_len}")
    if "mesh" in config:
        for axis in ("data", "fsdp", "tensor"):
            size = config.mesh.get(axis, 1)
            _check(size == -1 or size >= 1, f"mesh.{axis}", size, "must be -1 or >= 1")


def prepare_workdir(workdir: str) -> str:
    """Create the run directory; a path that is a file, or not creatable, is a clear error."""
    path = os.path.abspath(os.path.expanduser(workdir))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is" if probe == path else f"lies under {probe!r}, which is"
        raise ConfigError(f"--workdir {workdir!r} {what} a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir!r} cannot be created: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir!r} is not writable")
    return path


def default_workdir(config_path: str) -> str:
    """./workdir/<config file name without .py>."""
    return os.path.join("workdir", os.path.splitext(os.path.basename(config_path))[0])


COMMAND_USAGE = """usage: ultrametric {name} [--config FILE|NAME] [--config.KEY=VALUE ...] [--workdir DIR]

{description}

  --config FILE|NAME   a config file with get_config(), or a name under configs/
                       (default: {default})
  --config.KEY=VALUE   override any field, e.g. --config.train.steps=50
  --workdir DIR        run directory: checkpoints, metrics.jsonl, eval.json, eval.png
                       (default: ./workdir/<config name>)"""


def command_main(name: str, description: str, argv, body) -> int:
    """Shared front end of run/train/eval: parse, validate, call body(config, path, workdir);
    configuration errors print one clear line to stderr and return 2."""
    import sys
    argv = list(argv or [])
    if any(a in ("-h", "--help") for a in argv):
        print(COMMAND_USAGE.format(name=name, description=description,
                                   default=DEFAULT_CONFIG_NAME))
        return 0
    try:
        config, path, flags, rest = parse_config_args(argv)
        if rest:
            raise ConfigError(f"unexpected argument(s) {rest}; see `ultrametric {name} --help`")
        validate_config(config)
        workdir = prepare_workdir(flags.get("workdir") or default_workdir(path))
        return int(body(config, path, workdir) or 0)
    except ConfigError as e:
        print(f"ultrametric {name}: error: {e}", file=sys.stderr)
        return 2

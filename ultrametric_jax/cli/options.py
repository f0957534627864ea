"""The flags of `ultrametric run | train | eval`: an experiment config and a run directory.

    --config FILE|NAME     a Python file with get_config() -> ConfigDict, or the name of one
                           of the shipped configs (ultrametric_jax/configs, the repository's
                           configs/); ml_collections.config_flags loads it
    --config.KEY=VALUE     override any field, parsed with the field's type
    --workdir DIR          the run directory

Each call parses into a fresh absl FlagValues, so commands can run many times in a process.
What ml_collections or absl reject is turned into one ConfigError line that names the flag;
the ConfigDict becomes the typed RunConfig here, once.
"""
from __future__ import annotations

import os
import re
import runpy
import sys
from typing import Any, Callable, Optional

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.settings import RunConfig

DEFAULT_CONFIG_NAME = "smollm2_select"        # the main job
CONFIG_FLAG = "config"
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=\s]+)(?:=(.*))?$", re.DOTALL)
_NONE_TEXT = ("none", "None")


def configs_dir() -> str:
    """The shipped experiment configs: ultrametric_jax/configs in an installed wheel, the
    repository's configs/ (which the wheel ships under that name) in a source checkout."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    packaged = os.path.join(package, "configs")
    if os.path.isdir(packaged):
        return packaged
    return os.path.join(os.path.dirname(package), "configs")


def resolve_config_path(spec: Optional[str]) -> str:
    """A config file path from a path or a bare name of the shipped configs (None: the
    default)."""
    spec = spec or DEFAULT_CONFIG_NAME
    candidates = [spec]
    if os.sep not in spec:
        name = spec if spec.endswith(".py") else spec + ".py"
        candidates.append(os.path.join(configs_dir(), name))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    shipped = sorted(n[:-3] for n in os.listdir(configs_dir())
                     if n.endswith(".py") and not n.startswith("_"))
    raise ConfigError(f"--config {spec!r}: no such config file (looked for "
                      f"{', '.join(repr(c) for c in candidates)}; shipped configs: "
                      f"{', '.join(shipped)})")


# ----------------------------------------------------------------------------- parsing

def _split_argv(argv: list[str]) -> tuple[Optional[str], list[str], list[tuple[str, str]]]:
    """(config spec, the other arguments, overrides whose value spells None).

    The None overrides are taken out: absl has no spelling of None for a typed field, so they
    are applied after parsing, to the optional fields (typed placeholders) they name.
    """
    spec, rest, nones = None, [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg in ("--config", "-config") or arg.startswith(("--config=", "-config=")):
            if "=" in arg:
                spec = arg.split("=", 1)[1]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                spec, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config needs a value")
            i += 1
            continue
        match = _OVERRIDE.match(arg)
        if match and not match.group(1):
            key, value = match.group(2), match.group(3)
            if value is None and i + 1 < len(argv) and argv[i + 1] in _NONE_TEXT:
                value, i = argv[i + 1], i + 1
            nones.pop(key, None)        # a later override of the key wins
            if value in _NONE_TEXT:
                nones[key] = value
                rest = [a for a in rest if _override_key(a) != key]
                i += 1
                continue
        rest.append(arg)
        i += 1
    return spec, rest, list(nones.items())


def _override_key(arg: str) -> Optional[str]:
    match = _OVERRIDE.match(arg)
    return match.group(2) if match else None


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """get_config() of a config file, each failure one ConfigError line."""
    try:
        module = runpy.run_path(path)
    except Exception as e:
        raise ConfigError(f"--config {path!r}: the config file failed to run: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    if not callable(module.get("get_config")):
        raise ConfigError(f"--config {path!r}: the file defines no get_config() function")
    try:
        config = module["get_config"]()
    except Exception as e:
        raise ConfigError(f"--config {path!r}: get_config() failed: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config {path!r}: get_config() must return an "
                          f"ml_collections.ConfigDict, got {type(config).__name__}")
    return config


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _field(config: ml_collections.ConfigDict, key: str) -> tuple[Any, str]:
    """(the section holding config.<key>, the leaf name); ConfigError naming a key that is
    not a field."""
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
    return node, leaf


def _type_name(node: ml_collections.ConfigDict, leaf: str) -> str:
    field_type = node.get_type(leaf)
    return "boolean (true/false)" if field_type is bool else f"value of type {field_type.__name__}"


def _explain(error: Exception, path: str, argv: list[str]) -> ConfigError:
    """The one-line ConfigError for what absl or ml_collections rejected in argv."""
    config = load_config_file(path)
    keys = [k for k in map(_override_key, argv) if k]
    for key in keys:
        _field(config, key)
    if isinstance(error, flags.IllegalFlagValueError):
        match = re.match(r"flag --config\.([^=]+)=(.*?): ", str(error), re.DOTALL)
        if match:
            node, leaf = _field(config, match.group(1))
            return ConfigError(f"--config.{match.group(1)}={match.group(2)!r}: expected a "
                               f"{_type_name(node, leaf)}")
    if isinstance(error, flags.UnrecognizedFlagError):
        return ConfigError(f"unknown flag '--{error.flagname}' (known: --config, "
                           "--config.<key>, --workdir)")
    missing = re.match(r"Missing value for flag (\S+)", str(error))
    if missing:
        return ConfigError(f"{missing.group(1)} needs a value")
    if isinstance(error, flags.Error):
        return ConfigError(_first_line(error))
    raise error


def parse_flags(argv: list[str]) -> tuple[ml_collections.ConfigDict, str, Optional[str]]:
    """(config with overrides applied, its file, --workdir or None) of a command line;
    ConfigError for anything it cannot take."""
    spec, rest, nones = _split_argv(list(argv))
    path = resolve_config_path(spec)
    # --config first: ml_collections refuses overrides before it.
    full = ["ultrametric", f"--config={path}", *rest]
    # ml_collections executes the file as the module "<flag>_config" and reuses a cached
    # module's namespace: drop it, so that nothing of a previously parsed config survives.
    sys.modules.pop(f"{CONFIG_FLAG}_config", None)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(CONFIG_FLAG, flag_values=values, sys_argv=full,
                                    help_string="experiment config file or shipped name")
    flags.DEFINE_string("workdir", None, "run directory", flag_values=values)
    try:
        positional = values(full)[1:]
    except Exception as e:  # noqa: BLE001 - the config file runs here: explained or re-raised
        raise _explain(e, path, rest) from None
    if positional:
        raise ConfigError(f"unexpected argument(s) {positional}")
    config = values.config
    if not isinstance(config, ml_collections.ConfigDict):
        load_config_file(path)      # names what is wrong with the file
        raise ConfigError(f"--config {path!r}: get_config() must return an "
                          "ml_collections.ConfigDict")
    for key, text in nones:
        node, leaf = _field(config, key)
        if isinstance(node._fields.get(leaf), config_dict.FieldReference):
            setattr(node, leaf, None)    # an optional field (typed placeholder)
        elif node.get_type(leaf) is str:
            setattr(node, leaf, text)
        else:
            raise ConfigError(f"--config.{key}={text!r}: expected a {_type_name(node, leaf)}")
    return config, path, values.workdir


# ----------------------------------------------------------------------------- run directory

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

  --config FILE|NAME   a config file with get_config(), or the name of a shipped config
                       ({shipped}; default: {default})
  --config.KEY=VALUE   override any field, e.g. --config.train.steps=50
  --workdir DIR        run directory: checkpoints, metrics.jsonl, eval.json, eval.png
                       (default: ./workdir/<config name>)
  --debug              show the traceback of an error"""


def command_main(name: str, description: str, argv,
                 body: Callable[[RunConfig, str, str], int]) -> int:
    """Shared front end of run/train/eval: parse, type and check the config, prepare the
    run directory, then body(run config, config path, workdir). Errors are raised (the
    dispatcher prints them as one line)."""
    argv = list(argv or [])
    if any(a in ("-h", "--help") for a in argv):
        shipped = ", ".join(sorted(n[:-3] for n in os.listdir(configs_dir())
                                   if n.endswith(".py") and not n.startswith("_")))
        print(COMMAND_USAGE.format(name=name, description=description, shipped=shipped,
                                   default=DEFAULT_CONFIG_NAME))
        return 0
    config, path, workdir = parse_flags(argv)
    run = RunConfig.from_config_dict(config)
    return int(body(run, path, prepare_workdir(workdir or default_workdir(path))) or 0)

"""Config files load and validate; command-line overrides keep types; bad values are named."""
import os

import pytest

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.surgery.config import levels_for
from ultrametric_jax.cli.flags import (configs_dir, parse_config_args, surgery_config,
                                          validate_config)

CONFIGS = ["base", "smollm2_shakespeare", "llama3_8b_wikitext", "tinyllama", "tiny_random"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_validates(name):
    config, path, flags, rest = parse_config_args(["--config", os.path.join(configs_dir(),
                                                                            name + ".py")])
    assert path.endswith(name + ".py") and flags == {} and rest == []
    validate_config(config)
    assert config.train.lr == 1e-3 or name in ("tiny_random", "smollm2_shakespeare")
    mesh = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    # The tests' tiny model pins one device; the others take every device there is.
    assert mesh == (1, 1, 1) if name == "tiny_random" else mesh in ((-1, 1, 1), (1, -1, 1))


def test_surgery_section_mirrors_surgery_config():
    import dataclasses

    from ultrametric_jax.surgery.config import SurgeryConfig
    config, _, _, _ = parse_config_args(["--config", "base"])
    assert set(config.surgery.keys()) == {f.name for f in dataclasses.fields(SurgeryConfig)}
    # Unset optional fields resolve exactly as SurgeryConfig's own defaults do.
    assert surgery_config(config) == SurgeryConfig()


def test_default_config_is_the_cpu_setting():
    config, path, _, _ = parse_config_args([])
    assert os.path.basename(path) == "smollm2_shakespeare.py"
    s = surgery_config(config)
    assert (s.arity, s.num_levels, s.max_distance, s.cut_level, s.window) == (2, 8, 4, 4, 16)
    assert (config.train.batch_size, config.train.seq_len) == (2, 256)
    assert config.model.path == "" and config.data.corpus == "shakespeare"


def test_large_configs_derive_levels_in_integers():
    for name, max_len in (("llama3_8b_wikitext", 8192), ("tinyllama", 2048)):
        config, _, _, _ = parse_config_args(["--config", name])
        s = surgery_config(config)
        assert s.num_levels == levels_for(2, max_len) == {8192: 13, 2048: 11}[max_len]
        assert s.max_distance == s.num_levels // 2


def test_overrides_keep_field_types():
    config, _, flags, _ = parse_config_args([
        "--config=tiny_random", "--config.train.steps=50", "--config.train.lr", "3e-4",
        "--config.surgery.d_max=2", "--config.data.corpus=stdlib", "--workdir", "/tmp/w",
        "--config.train.clip_norm=0", "--config.surgery.levels=None"])
    assert config.train.steps == 50 and isinstance(config.train.steps, int)
    assert config.train.lr == 3e-4 and config.surgery.d_max == 2
    assert config.train.clip_norm == 0.0 and isinstance(config.train.clip_norm, float)
    assert config.surgery.levels is None and config.data.corpus == "stdlib"
    assert flags == {"workdir": "/tmp/w"}


@pytest.mark.parametrize("argv, message", [
    (["--config.train.stepz=3"], r"unknown config key 'train.stepz' \(known keys under "
                                 r"train: batch_size, clip_norm"),
    (["--config.nosuch.x=3"], r"unknown config key 'nosuch.x': 'nosuch' is not a config section"),
    (["--config.train.steps=abc"], r"--config.train.steps='abc': expected a value of type int"),
    (["--config.train.steps=2.5"], r"expected a value of type int"),
    (["--config.train=3"], r"config key 'train' is a section"),
    (["--bogus=1"], r"unknown flag '--bogus'"),
    (["--config", "no_such_config"], r"--config 'no_such_config': no such config file"),
    (["--config.train.steps"], r"--config.train.steps needs a value"),
])
def test_bad_command_lines_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config_args(["--config", "tiny_random"] + argv if argv[0] != "--config" else argv)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", r"invalid config value train.batch_size=0: must be an integer >= 1"),
    ("train.lr=-1", r"invalid config value train.lr=-1.0: must be a finite number > 0"),
    ("train.lr=inf", r"invalid config value train.lr=inf"),
    ("train.grad_accum=3", r"train.batch_size=4: must be a multiple of train.grad_accum=3"),
    ("data.val_fraction=1.0", r"invalid config value data.val_fraction=1.0"),
    ("model.dtype=float8", r"invalid config value model.dtype='float8'"),
    ("surgery.arity=1", r"invalid SurgeryConfig.arity=1"),
    ("surgery.d_max=9", r"invalid SurgeryConfig.d_max=9: must lie in \[0, L=3\]"),
    ("surgery.ste=hard", r"invalid SurgeryConfig.ste='hard'"),
    ("surgery.max_len=16", r"invalid config value surgery.max_len=16: must be >= "
                           r"train.seq_len=32"),
    ("checkpoint.keep=0", r"invalid config value checkpoint.keep=0"),
    ("mesh.fsdp=0", r"invalid config value mesh.fsdp=0"),
])
def test_invalid_values_are_named(override, message):
    config, _, _, _ = parse_config_args(["--config", "tiny_random", "--config." + override])
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        parse_config_args(["--config", str(bad)])
    bad.write_text("def get_config():\n    return {}\n")
    with pytest.raises(ConfigError, match="must return an ml_collections.ConfigDict"):
        parse_config_args(["--config", str(bad)])

"""Config files load and validate; command-line overrides keep types; bad values are named."""
import dataclasses
import os

import pytest

from ultrametric_jax.cli.options import configs_dir, parse_flags
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.settings import RunConfig
from ultrametric_jax.surgery.config import SurgeryConfig, levels_for
from ultrametric_jax.surgery.objectives import ObjectiveConfig


def surgery_config(config) -> SurgeryConfig:
    return RunConfig.from_config_dict(config).surgery

CONFIGS = ["base", "smollm2_shakespeare", "smollm2_select", "llama3_8b_wikitext", "tinyllama",
           "tiny_random"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_validates(name):
    config, path, workdir = parse_flags(["--config", os.path.join(configs_dir(), name + ".py")])
    assert path.endswith(name + ".py") and workdir is None
    run = RunConfig.from_config_dict(config)
    assert run.train.lr == 1e-3 or name in ("tiny_random", "smollm2_shakespeare",
                                            "smollm2_select")
    assert RunConfig.from_dict(run.to_dict()) == run        # what checkpoints record
    mesh = (run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    # The tests' tiny model pins one device; the others take every device there is.
    assert mesh == (1, 1, 1) if name == "tiny_random" else mesh in ((-1, 1, 1), (1, -1, 1))


def test_surgery_section_is_surgery_config():
    config, _, _ = parse_flags(["--config", "base"])
    assert set(config.surgery.keys()) == {f.name for f in dataclasses.fields(SurgeryConfig)}
    # Unset optional fields resolve exactly as SurgeryConfig's own defaults do.
    assert surgery_config(config) == SurgeryConfig()
    # Optional fields are typed placeholders: an override is parsed as their type.
    config, _, _ = parse_flags(["--config", "base", "--config.surgery.levels=6"])
    assert config.surgery.levels == 6 and isinstance(config.surgery.levels, int)


def test_objective_section_is_objective_config():
    config, _, _ = parse_flags(["--config", "base"])
    assert set(config.objective.keys()) == {f.name for f in dataclasses.fields(ObjectiveConfig)}
    assert RunConfig.from_config_dict(config).objective == ObjectiveConfig()
    config, _, _ = parse_flags(["--config", "base", "--config.objective.density_target=0.25",
                                "--config.objective.kd_weight=1"])
    objective = RunConfig.from_config_dict(config).objective
    assert (objective.density_target, objective.kd_weight) == (0.25, 1.0)
    with pytest.raises(ConfigError, match="ObjectiveConfig.density_target=1.5"):
        RunConfig.from_config_dict(parse_flags(
            ["--config", "base", "--config.objective.density_target=1.5"])[0])


def test_default_config_is_the_cpu_setting():
    """The main job: key selectors at 1k tokens for 25% density, the tree keeping every pair,
    no router training, in and out of domain, with the fast behaviour tasks."""
    config, path, _ = parse_flags([])
    assert os.path.basename(path) == "smollm2_select.py"
    run = RunConfig.from_config_dict(config)
    s = run.surgery
    assert (s.arity, s.num_levels, s.max_distance, s.cut_level) == (2, 10, 10, 0)
    assert (s.window, s.sink_tokens, s.key_rank) == (64, 1, 32)
    assert run.selection.target_density == 0.25 and run.train.steps == 0
    assert (run.train.seq_len, run.model.dtype) == (1024, "float32")
    assert run.model.path == "" and run.data.corpus == "shakespeare"
    assert run.eval.extra_corpora == ("stdlib",) and run.eval.tasks
    # the router recipe at 256 tokens stays a shipped config
    config, path, _ = parse_flags(["--config", "smollm2_shakespeare"])
    s = surgery_config(config)
    assert (s.arity, s.num_levels, s.max_distance, s.cut_level, s.window) == (2, 8, 4, 4, 16)
    assert (config.train.batch_size, config.train.seq_len) == (2, 256)


def test_large_configs_derive_levels_in_integers():
    for name, max_len in (("llama3_8b_wikitext", 8192), ("tinyllama", 2048)):
        config, _, _ = parse_flags(["--config", name])
        s = surgery_config(config)
        assert s.num_levels == levels_for(2, max_len) == {8192: 13, 2048: 11}[max_len]
        assert s.max_distance == s.num_levels // 2


def test_overrides_keep_field_types():
    config, _, workdir = parse_flags([
        "--config=tiny_random", "--config.train.steps=50", "--config.train.lr", "3e-4",
        "--config.surgery.d_max=2", "--config.data.corpus=stdlib", "--workdir", "/tmp/w",
        "--config.train.clip_norm=0", "--config.surgery.levels=None"])
    assert config.train.steps == 50 and isinstance(config.train.steps, int)
    assert config.train.lr == 3e-4 and config.surgery.d_max == 2
    assert config.train.clip_norm == 0.0 and isinstance(config.train.clip_norm, float)
    assert config.surgery.levels is None and config.data.corpus == "stdlib"
    assert workdir == "/tmp/w"
    # Space-separated values, a boolean, an override before --config, the last one winning.
    config, path, _ = parse_flags(["--config.train.steps", "7", "--config.distributed",
                                   "--config", "tiny_random", "--config.train.steps=9",
                                   "--config.surgery.d_max=None", "--config.surgery.d_max=2"])
    assert config.train.steps == 9 and config.distributed is True
    assert config.surgery.d_max == 2 and path.endswith("tiny_random.py")


@pytest.mark.parametrize("argv, message", [
    (["--config.train.stepz=3"], r"unknown config key 'train.stepz' \(known keys under "
                                 r"train: batch_size, clip_norm"),
    (["--config.nosuch.x=3"], r"unknown config key 'nosuch.x': 'nosuch' is not a config section"),
    (["--config.train.steps=abc"], r"--config.train.steps='abc': expected a value of type int"),
    (["--config.train.steps=2.5"], r"expected a value of type int"),
    (["--config.train=3"], r"config key 'train' is a section"),
    (["--bogus=1"], r"unknown flag '--bogus'"),
    (["--config", "no_such_config"], r"--config 'no_such_config': no such config file .*"
                                     r"shipped configs: .*base, .*llama3_8b_wikitext"),
    (["--config.train.steps"], r"--config.train.steps needs a value"),
    (["--config.distributed=maybe"], r"--config.distributed='maybe': expected a boolean"),
    (["--config.train.steps=None"], r"--config.train.steps='None': expected a value of type "
                                    r"int"),
    (["--workdir"], r"--workdir needs a value"),
    (["stray"], r"unexpected argument\(s\) \['stray'\]"),
])
def test_bad_command_lines_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_flags(["--config", "tiny_random"] + argv if argv[0] != "--config" else argv)


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
    ("surgery.gumbel_anneal=-1.0", r"invalid SurgeryConfig.gumbel_anneal=-1.0: must be a "
                                   r"finite number >= 0"),
    ("surgery.gumbel_scale=-0.5", r"invalid SurgeryConfig.gumbel_scale=-0.5: must be a finite "
                                  r"number >= 0"),
    ("objective.budget_routes=soft", r"invalid ObjectiveConfig.budget_routes='soft': must be "
                                     r"one of \('argmax', 'feedback', 'sampled'\)"),
    ("surgery.max_len=16", r"invalid config value surgery.max_len=16: must be >= "
                           r"train.seq_len=32"),
    ("checkpoint.keep=0", r"invalid config value checkpoint.keep=0"),
    ("mesh.fsdp=0", r"invalid config value mesh.fsdp=0"),
])
def test_invalid_values_are_named(override, message):
    config, _, _ = parse_flags(["--config", "tiny_random", "--config." + override])
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_config_dict(config)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        parse_flags(["--config", str(bad)])
    bad.write_text("def get_config():\n    return {}\n")
    with pytest.raises(ConfigError, match="must return an ml_collections.ConfigDict"):
        parse_flags(["--config", str(bad)])
    bad.write_text("def get_config():\n    return undefined_name\n")
    with pytest.raises(ConfigError, match=r"get_config\(\) failed: NameError: name "
                                          "'undefined_name' is not defined"):
        parse_flags(["--config", str(bad)])
    bad.write_text("import no_such_module\n")
    with pytest.raises(ConfigError, match="the config file failed to run: ModuleNotFoundError"):
        parse_flags(["--config", str(bad)])


def test_parsing_twice_in_one_process_starts_afresh():
    """Each command line parses into its own flags: nothing carries over between calls."""
    first, _, _ = parse_flags(["--config", "tiny_random", "--config.train.steps=3",
                               "--workdir", "/tmp/a"])
    second, _, workdir = parse_flags(["--config", "tiny_random"])
    assert (first.train.steps, second.train.steps, workdir) == (3, 12, None)
    assert parse_flags(["--config", "base"])[0].train.steps == 1000


def test_the_selector_sweep_settings_are_valid_runs():
    """configs/quality_sweep_select.py: every setting, over its common overrides and the base
    config, is a valid run with key selectors and no router training, and changes its knob."""
    import runpy
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(configs_dir()), "experiments"))
    from sweep_runs import flags
    sweep = runpy.run_path(os.path.join(configs_dir(), "quality_sweep_select.py"))["get_config"]()
    base = os.path.join(configs_dir(), sweep.base_config)
    runs = {name: RunConfig.from_config_dict(parse_flags(
        ["--config", base, f"--config.train.steps={sweep.steps}", *flags(sweep.common),
         *flags(sweep.settings[name])])[0]) for name in sweep.settings}
    default = runs["default"]
    assert default.train.steps == 0 and default.surgery.key_rank == 32
    assert default.surgery.max_distance == default.surgery.num_levels == 10   # one cluster
    assert default.eval.window_baseline and default.model.dtype == "float32"
    assert runs["target_05"].selection.target_density == 0.05
    assert runs["rank_64"].surgery.key_rank == 64 and runs["window_16"].surgery.window == 16
    assert runs["sink_0"].surgery.sink_tokens == 0
    for name, run in runs.items():      # one knob each: everything else as the default
        differs = [section for section in ("surgery", "selection")
                   if getattr(run, section) != getattr(default, section)]
        assert len(differs) == (name != "default"), name

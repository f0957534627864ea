"""What a user meets when things go wrong, through `ultrametric ...` on the tiny random Llama:
a non-finite step, a config that drifted from the run's, a damaged base model, a full disk.
Each case checks the exit status, the one-line message and that nothing the user had changed.
"""
import os
import runpy
import shutil
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

from ultrametric_jax.cli import app as cli
from ultrametric_jax.cli import eval as eval_command
from ultrametric_jax.cli.options import configs_dir
from ultrametric_jax.errors import ConfigError

TINY = os.path.join(configs_dir(), "tiny_random.py")
# What TensorStore raises when the disk fills during an Orbax save (seen on a full tmpfs).
DISK_FULL = ("RESOURCE_EXHAUSTED: Error writing \"00000/0\" in OCDBT database at local file "
             "\"{path}\": Failed writing: \"{path}/d/7912a6f8\": Failed to write 308968 bytes "
             "to file 14: No space left on device [os_error_code='28']")


def _args(model_dir, workdir, *overrides):
    return ["--config", TINY, f"--config.model.path={model_dir}", "--workdir", str(workdir),
            *[f"--config.{o}" for o in overrides]]


def _listing(root):
    """Every path under root (relative), with the size and mtime of files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [(os.path.relpath(os.path.join(dirpath, n), root), "dir") for n in dirnames]
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            out.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size,
                        st.st_mtime_ns))
    return sorted(out, key=str)


def _steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _last_line(err: str) -> str:
    """The final line of stderr (a progress bar may precede it), after checking that no
    traceback was printed."""
    assert "Traceback" not in err, err[-3000:]
    return err.rstrip("\n").split("\n")[-1].split("\r")[-1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return runpy.run_path(TINY)["write_model"](str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A run directory trained for 4 steps (its one checkpoint: step 4)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", *_args(tiny_model_dir, workdir, "train.steps=4")]) == 0
    assert _steps(workdir) == [4]
    return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


# ----------------------------------------------------------------------------- NaN

@pytest.mark.slow
def test_a_diverging_run_keeps_its_last_sound_checkpoint_and_resumes(tiny_model_dir, run_copy,
                                                                     capsys):
    before = _listing(run_copy / "checkpoints")
    # lr 1e30: the update of step 5 is finite but absurd; the loss of step 6 computed from
    # it is NaN. Step 5's state is never written although checkpoint.every=1.
    assert cli.main(["train", *_args(tiny_model_dir, run_copy, "train.steps=8",
                                     "train.lr=1e30", "checkpoint.every=1")]) == 1
    line = _last_line(capsys.readouterr().err)
    assert line.startswith("ultrametric train: non-finite training loss (nan) at step 6 ")
    assert line.endswith(f"stopping. The last good checkpoint is step 4 in "
                         f"{run_copy / 'checkpoints'}; lower train.lr or check the data.")
    assert _listing(run_copy / "checkpoints") == before
    # Diverging on the last step: a trial step from the final state, its update discarded,
    # finds the NaN before that state is written.
    assert cli.main(["train", *_args(tiny_model_dir, run_copy, "train.steps=5",
                                     "train.lr=1e30")]) == 1
    line = _last_line(capsys.readouterr().err)
    assert line.startswith("ultrametric train: non-finite training loss (nan) from the state "
                           "after step 5 (a trial step on the next batch) ")
    assert "The last good checkpoint is step 4 in" in line
    assert _listing(run_copy / "checkpoints") == before
    # Resuming with a sane learning rate continues from step 4.
    assert cli.main(["train", *_args(tiny_model_dir, run_copy, "train.steps=8")]) == 0
    assert "trained 8 steps (resumed from step 4)" in capsys.readouterr().out
    assert _steps(run_copy) == [4, 8]


@pytest.mark.slow
def test_a_run_diverging_from_the_start_writes_no_checkpoint(tiny_model_dir, tmp_path, capsys):
    workdir = tmp_path / "fresh"
    assert cli.main(["train", *_args(tiny_model_dir, workdir, "train.lr=1e30",
                                     "checkpoint.every=1")]) == 1
    line = _last_line(capsys.readouterr().err)
    assert "non-finite training loss (nan) at step 2 " in line
    assert "No checkpoint was written; lower train.lr" in line
    assert _steps(workdir) == []
    assert cli.main(["train", *_args(tiny_model_dir, workdir, "train.steps=4")]) == 0
    out = capsys.readouterr().out
    assert "trained 4 steps in" in out and "resumed" not in out


# ----------------------------------------------------------------------------- config drift

@pytest.mark.slow
@pytest.mark.parametrize("command, override, changes", [
    ("eval", "surgery.d_max=2", "d_max 1 -> 2; cut_level 2 -> 1"),
    ("eval", "surgery.levels=4", "levels 3 -> 4; cut_level 2 -> 3"),
    ("eval", "surgery.sink_tokens=2", "sink_tokens 1 -> 2"),
    ("train", "surgery.window=8", "window 4 -> 8"),
    ("train", "surgery.arity=3", "arity 2 -> 3"),
    ("run", "surgery.levels=None", "levels 3 -> 8; cut_level 2 -> 7"),
])
def test_config_drift_is_refused(tiny_model_dir, run_copy, capsys, command, override, changes):
    before = _listing(run_copy)
    argv = [command, *_args(tiny_model_dir, run_copy, "train.steps=8", override)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"ultrametric {command}: error: checkpoint step 4 in {run_copy / 'checkpoints'} was "
        f"trained with another configuration ({changes}), which changes what its routers "
        "mean; use the run's own settings (its config.json) or a fresh --workdir\n")
    assert _listing(run_copy) == before


@pytest.mark.slow
def test_eval_records_its_surgery_and_allows_what_keeps_the_meaning(tiny_model_dir, run_copy,
                                                                    capsys):
    """max_len does not change L when levels is set: the routers mean the same."""
    import json
    assert cli.main(["eval", *_args(tiny_model_dir, run_copy, "surgery.max_len=512")]) == 0
    report = json.load(open(run_copy / "eval.json"))
    assert report["step"] == 4
    assert report["surgery"]["max_len"] == 512 and report["surgery"]["levels"] == 3
    assert "step 4: held-out perplexity" in capsys.readouterr().out


# ----------------------------------------------------------------------------- damaged models

def _damaged_models(good: str, root) -> dict:
    """name -> (model path, a phrase its error must hold)."""
    def variant(name, change):
        path = str(root / name)
        shutil.copytree(good, path)
        change(path)
        return path

    def drop_tensor(path):
        t = load_file(os.path.join(path, "model.safetensors"))
        t.pop("model.layers.1.mlp.up_proj.weight")
        save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    def cut_tensor(path):
        t = load_file(os.path.join(path, "model.safetensors"))
        t["model.norm.weight"] = t["model.norm.weight"][:5]
        save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    def break_config(path):
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write('{"vocab_size": 320,')

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "io"))
    try:
        from conftest import build_hf_llama
        from gguf_writer import write_llama_gguf
    finally:
        sys.path.pop(0)
    gguf = write_llama_gguf(build_hf_llama(vocab_size=320), root / "whole.gguf")
    data = open(gguf, "rb").read()
    truncated = str(root / "truncated.gguf")
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    return {
        "missing tensor": (variant("missing", drop_tensor),
                           "missing tensor model.layers.1.mlp.up_proj.weight"),
        "wrong shape": (variant("shape", cut_tensor),
                        "model.norm.weight in {path}: expected (32,), got (5,)"),
        "bad config.json": (variant("config", break_config), "{path}/config.json"),
        "truncated gguf": (truncated, "{path}"),
    }


@pytest.mark.parametrize("command", ["train", "eval", "run"])
def test_a_damaged_base_model_is_one_line(tiny_model_dir, tmp_path, capsys, command):
    models = _damaged_models(tiny_model_dir, tmp_path)
    for name, (path, phrase) in models.items():
        before = _listing(tmp_path)
        workdir = tmp_path / f"w_{command}_{name.replace(' ', '_')}"
        assert cli.main([command, *_args(path, workdir)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"ultrametric {command}: error: "), err
        assert phrase.format(path=path) in err, (name, err)
        # Nothing was written into the run directory, and the model is as it was.
        assert os.listdir(workdir) == []
        os.rmdir(workdir)
        assert _listing(tmp_path) == before


# ----------------------------------------------------------------------------- full disk

@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_loses_nothing(tiny_model_dir, run_copy, capsys,
                                                           monkeypatch):
    before = _listing(run_copy / "checkpoints")
    real_save = ocp.CheckpointManager.save

    def disk_full(self, step, *args, **kwargs):
        tmp = os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp")
        os.makedirs(tmp)           # what a failed write leaves behind
        raise ValueError(DISK_FULL.format(path=tmp))

    with monkeypatch.context() as m:
        m.setattr(ocp.CheckpointManager, "save", disk_full)
        assert cli.main(["train", *_args(tiny_model_dir, run_copy, "train.steps=12")]) == 2
    line = _last_line(capsys.readouterr().err)
    assert line == ("ultrametric train: error: No space left on device while writing checkpoint "
                    "step 8; the earlier checkpoints are intact: "
                    f"'{run_copy / 'checkpoints'}'")
    assert _listing(run_copy / "checkpoints") == before      # no partial step left either
    assert ocp.CheckpointManager.save is real_save
    assert cli.main(["train", *_args(tiny_model_dir, run_copy, "train.steps=12")]) == 0
    assert "trained 12 steps (resumed from step 4)" in capsys.readouterr().out
    assert _steps(run_copy) == [8, 12]


# ----------------------------------------------------------------------------- --debug

def test_debug_shows_the_traceback_of_a_user_error(tiny_model_dir, tmp_path, capsys):
    argv = ["eval", *_args(tiny_model_dir, tmp_path / "w", "train.stepz=1")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == ("ultrametric eval: error: unknown config key "
                                       "'train.stepz' (known keys under train: batch_size, "
                                       "clip_norm, grad_accum, log_every, lr, seq_len, steps, "
                                       "warmup_steps, weight_decay)\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        cli.main([*argv, "--debug"])
    missing = str(tmp_path / "missing")
    out = str(tmp_path / "out")
    assert cli.main(["export", "--workdir", missing, "--out", out]) == 2
    assert capsys.readouterr().err == (f"ultrametric export: error: --workdir {missing} does "
                                       "not exist or is not a directory\n")
    with pytest.raises(ConfigError, match="does not exist or is not a directory"):
        cli.main(["export", "--debug", "--workdir", missing, "--out", out])


def test_a_bug_keeps_its_traceback(tiny_model_dir, tmp_path, monkeypatch):
    def broken(run, workdir):
        return np.zeros(2)[3]

    monkeypatch.setattr(eval_command, "evaluate_run", broken)
    with pytest.raises(IndexError):
        cli.main(["eval", *_args(tiny_model_dir, tmp_path / "w")])


def test_eval_task_flags_become_config_fields():
    assert eval_command.task_flags(["--tasks", "fidelity,retrieval", "--full-tasks", "--x=1"]) == [
        "--config.eval.tasks=fidelity,retrieval", "--config.eval.tasks_fast=False", "--x=1"]
    assert eval_command.task_flags(["--tasks=all"]) == ["--config.eval.tasks=all"]


def test_an_unknown_task_is_one_line_before_anything_loads(tmp_path, capsys):
    # The model path does not exist: the task names are checked before it is read.
    code = cli.main(["eval", *_args(str(tmp_path / "no_model"), tmp_path / "run"),
                     "--tasks", "fidelity,nope"])
    err = capsys.readouterr().err
    assert code == 2
    assert _last_line(err) == ("ultrametric eval: error: unknown task 'nope'; choose from "
                               "fidelity, humaneval, instructions, retrieval, fidelity_long "
                               "(or all)")


def test_out_of_domain_corpora_must_be_names():
    from ultrametric_jax.run.settings import EvalConfig
    assert EvalConfig(batches=1, batch_size=1, extra_corpora="stdlib, a.txt").extra_corpora == (
        "stdlib", "a.txt")
    with pytest.raises(ConfigError, match=r"invalid config value eval.extra_corpora=\[3\]: must "
                                          "be a comma-separated list of names"):
        EvalConfig(batches=1, batch_size=1, extra_corpora=[3])

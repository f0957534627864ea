"""The run / train / eval commands on the tiny random Llama: reports, files, clear errors."""
import dataclasses
import json
import os
import runpy
import shutil

import numpy as np
import pytest

from ultrametric_jax.cli import app as cli
from ultrametric_jax.cli.options import configs_dir, parse_flags
from ultrametric_jax.run import pipeline
from ultrametric_jax.run.settings import RunConfig

TINY = os.path.join(configs_dir(), "tiny_random.py")


def tiny_run_config(*argv) -> RunConfig:
    return RunConfig.from_config_dict(parse_flags(["--config", TINY, *argv])[0])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return runpy.run_path(TINY)["write_model"](str(tmp_path_factory.mktemp("tiny")))


def _args(model_dir, workdir, *overrides):
    return ["--config", TINY, f"--config.model.path={model_dir}", "--workdir", str(workdir),
            *[f"--config.{o}" for o in overrides]]


def _torch_dense_perplexity(model_dir, batches):
    """Oracle: transformers' PyTorch Llama on the same held-out batches."""
    import torch
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir,
                                                          dtype=torch.float64).eval()
    total, count = 0.0, 0.0
    for b in batches:
        ids = torch.tensor(np.asarray(b["input_ids"], np.int64))
        mask = torch.tensor(np.asarray(b["attention_mask"], np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, attention_mask=mask).logits[:, :-1], -1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        weights = mask[:, 1:].double()
        total += float((nll * weights).sum())
        count += float(weights.sum())
    return float(np.exp(total / count))


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


@pytest.mark.slow
def test_run_then_eval(tiny_model_dir, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "w"
    assert cli.main(["run", *_args(tiny_model_dir, workdir, "train.steps=6")]) == 0
    out = capsys.readouterr().out
    assert "ultrametric run tiny_random: 6 router steps" in out
    assert "held-out perplexity dense" in out and "attention density" in out
    report = json.load(open(workdir / "eval.json"))
    assert report["step"] == 6
    assert open(workdir / "eval.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    s = report["surgical"]
    assert len(s["density_per_layer"]) == 2 and len(s["routing_entropy_bits_per_level"]) == 2
    assert 0 < s["tree_density"] <= s["density"] <= 1
    assert report["perplexity_change"] == pytest.approx(
        s["perplexity"] / report["dense"]["perplexity"] - 1)
    assert report["surgery"] == json.load(open(workdir / "config.json"))["surgery"]
    # The dense baseline agrees with transformers on the same held-out sequences.
    run = tiny_run_config(f"--config.model.path={tiny_model_dir}")
    assert report["surgery"] == run.surgery.to_dict()
    oracle = _torch_dense_perplexity(tiny_model_dir, pipeline.setup_run(run).val_batches)
    assert report["dense"]["perplexity"] == pytest.approx(oracle, rel=1e-4)
    # eval of the same workdir evaluates the same checkpoint: identical numbers. It reads the
    # checkpoints without touching them, even the temporary directory of a save in progress,
    # and serves the dense baseline from run's cache.
    ckpt = workdir / "checkpoints"
    shutil.copytree(ckpt / "6", ckpt / "7.orbax-checkpoint-tmp-1234567890")
    before = _listing(ckpt)
    from ultrametric_jax.run import evaluate

    def no_dense_recompute(model, batches):
        raise AssertionError("eval measured the dense baseline again")

    with monkeypatch.context() as m:
        m.setattr(evaluate, "perplexity", no_dense_recompute)
        assert cli.main(["eval", *_args(tiny_model_dir, workdir, "train.steps=6")]) == 0
    assert _listing(ckpt) == before
    shutil.rmtree(ckpt / "7.orbax-checkpoint-tmp-1234567890")
    again = json.load(open(workdir / "eval.json"))
    assert again["surgical"] == report["surgical"]
    assert again["dense"]["perplexity"] == pytest.approx(oracle, rel=1e-4)
    assert "step 6: held-out perplexity" in capsys.readouterr().out
    # Training further in the same workdir resumes from step 6.
    assert cli.main(["train", *_args(tiny_model_dir, workdir, "train.steps=8")]) == 0
    assert "trained 8 steps (resumed from step 6)" in capsys.readouterr().out
    # A damaged newest checkpoint is skipped with a warning and left in place: eval falls back
    # to step 6.
    assert sorted(os.listdir(ckpt)) == ["6", "8"]
    os.remove(ckpt / "8" / "meta" / "metadata")
    with pytest.warns(RuntimeWarning, match="skipping corrupt or partial checkpoint step 8"):
        assert cli.main(["eval", *_args(tiny_model_dir, workdir)]) == 0
    assert json.load(open(workdir / "eval.json"))["surgical"] == report["surgical"]
    assert sorted(os.listdir(ckpt)) == ["6", "8"]


def test_eval_without_checkpoint_reports_the_collapsed_model(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["eval", *_args(tiny_model_dir, tmp_path / "e")]) == 0
    captured = capsys.readouterr()
    assert "no checkpoint in" in captured.err
    report = json.load(open(tmp_path / "e" / "eval.json"))
    # Collapse initialisation: identical to the dense model, fully dense attention.
    assert report["surgical"]["perplexity"] == report["dense"]["perplexity"]
    assert report["surgical"]["density"] == 1.0


def test_run_without_router_training_keeps_the_collapsed_routes(tiny_model_dir, tmp_path,
                                                                capsys, monkeypatch):
    """train.steps = 0: no train step runs, the collapse-initialised routers are written as the
    run's step 0 (restorable, exportable), and the surgical model is the dense one."""
    from ultrametric_jax.run import trainer as trainer_module
    from ultrametric_jax.surgery.router import RouterParam

    def no_step(*args, **kwargs):
        raise AssertionError("a train step was built with train.steps = 0")

    workdir = tmp_path / "z"
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "cached_train_step", no_step)
        assert cli.main(["run", *_args(tiny_model_dir, workdir, "train.steps=0")]) == 0
    assert "no router training (train.steps = 0)" in capsys.readouterr().out
    report = json.load(open(workdir / "eval.json"))
    assert report["step"] == 0
    assert report["surgical"]["perplexity"] == report["dense"]["perplexity"]
    assert report["surgical"]["density"] == 1.0
    assert open(workdir / "eval.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"   # no curves
    assert sorted(os.listdir(workdir / "checkpoints")) == ["0"]
    # the step-0 checkpoint holds the collapse initialisation itself
    restored = pipeline.restore_run(str(workdir / "checkpoints"))
    fresh = pipeline.setup_run(tiny_run_config(f"--config.model.path={tiny_model_dir}")).model
    pipeline.inject(tiny_run_config(f"--config.model.path={tiny_model_dir}"), fresh)
    import jax
    from flax import nnx
    for got, want in zip(jax.tree.leaves(nnx.state(restored.model, RouterParam)),
                         jax.tree.leaves(nnx.state(fresh, RouterParam)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert restored.step == 0


@pytest.mark.parametrize("override, message", [
    ("train.steps=-1", "invalid config value train.steps=-1: must be an integer >= 0 "
                       "(0: no router training)"),
    ("train.steps=1.5", "--config.train.steps='1.5': expected a value of type int"),
])
def test_invalid_step_counts_are_named(override, message, tiny_model_dir, tmp_path, capsys):
    assert cli.main(["train", *_args(tiny_model_dir, tmp_path / "w", override)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "train", "eval"])
@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "invalid config value train.batch_size=0: must be an integer >= 1"),
    ("surgery.window=-1", r"invalid SurgeryConfig.window=-1: must be >= 0"),
    ("train.stepz=4", "unknown config key 'train.stepz'"),
    ("train.lr=fast", "--config.train.lr='fast': expected a value of type float"),
])
def test_invalid_config_values_give_clear_errors(command, override, message, tiny_model_dir,
                                                 tmp_path, capsys):
    assert cli.main([command, *_args(tiny_model_dir, tmp_path / "w", override)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ultrametric {command}: error: ") and message in err


@pytest.mark.parametrize("command", ["run", "train", "eval"])
def test_workdir_that_is_a_file_is_refused(command, tiny_model_dir, tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for workdir, message in ((not_a_dir, "is a file, not a directory"),
                             (not_a_dir / "sub", "lies under")):
        assert cli.main([command, *_args(tiny_model_dir, workdir)]) == 2
        err = capsys.readouterr().err
        assert f"--workdir '{workdir}'" in err and message in err


@pytest.mark.parametrize("command", ["run", "train", "eval"])
@pytest.mark.parametrize("override, message", [
    ("mesh.data=16", "invalid config value mesh={'data': 16, 'fsdp': 1, 'tensor': 1}: mesh "
                     "{'data': 16, 'fsdp': 1, 'tensor': 1} needs 16 devices, but 8 are available"),
    ("mesh.data=-1", "invalid config value train.batch_size=4: each micro-batch of 4 sequences "
                     "must split evenly over the 8 data-parallel devices"),
])
def test_mesh_errors_come_before_the_model_loads(command, override, message, tmp_path, capsys):
    # model.path names nothing: the mesh error can only win by coming first.
    assert cli.main([command, "--config", TINY, "--config.model.path=/no/such/model",
                     "--workdir", str(tmp_path / "w"), f"--config.{override}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ultrametric {command}: error: ") and message in err


def test_dense_baseline_cache(tmp_path, monkeypatch):
    """Keyed by the dtypes too, written atomically, and a torn or unwritable file costs only a
    re-measurement."""
    from types import SimpleNamespace

    from ultrametric_jax.run import evaluate
    from ultrametric_jax.run.pipeline import DENSE_CACHE, dense_baseline
    run = tiny_run_config()
    setup = SimpleNamespace(identity={"files": {"model.safetensors": "ab" * 32}}, model=None,
                            val_batches=[])
    measured = []

    def perplexity(model, batches):
        measured.append(run.model.param_dtype)
        return {"perplexity": float(len(measured))}

    def with_param_dtype(dtype):
        return dataclasses.replace(run, model=dataclasses.replace(run.model, param_dtype=dtype))

    monkeypatch.setattr(evaluate, "perplexity", perplexity)
    workdir, path = str(tmp_path), tmp_path / DENSE_CACHE
    assert dense_baseline(setup, run, workdir) == {"perplexity": 1.0}
    assert dense_baseline(setup, run, workdir) == {"perplexity": 1.0}     # from the cache
    run = with_param_dtype("bfloat16")
    assert dense_baseline(setup, run, workdir) == {"perplexity": 2.0}
    assert measured == ["float32", "bfloat16"]
    path.write_text('{"key": {"base_model": ')                                 # torn by a kill
    assert dense_baseline(setup, run, workdir) == {"perplexity": 3.0}
    assert json.loads(path.read_text())["result"] == {"perplexity": 3.0}
    # A write that fails leaves the previous cache whole and no temporary file behind.
    run = with_param_dtype("float16")
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        dense_baseline(setup, run, workdir)
    assert json.loads(path.read_text())["result"] == {"perplexity": 3.0}
    assert os.listdir(tmp_path) == [DENSE_CACHE]


def test_missing_model_and_bad_flags(tmp_path, capsys):
    assert cli.main(["train", "--config", TINY, "--config.model.path=/no/such/model",
                     "--workdir", str(tmp_path / "w")]) == 2
    assert "invalid config value model.path='/no/such/model'" in capsys.readouterr().err
    assert cli.main(["train", "--config", TINY, "--steps=3"]) == 2
    assert "unknown flag '--steps'" in capsys.readouterr().err
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config.KEY=VALUE" in out and "tiny_random" in out and "--debug" in out


def test_default_workdir_is_named_after_the_config(tiny_model_dir, tmp_path, monkeypatch,
                                                   capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--config", TINY, f"--config.model.path={tiny_model_dir}"]) == 0
    assert (tmp_path / "workdir" / "tiny_random" / "eval.json").exists()

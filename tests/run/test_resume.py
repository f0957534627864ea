"""A training run killed with SIGKILL and restarted ends exactly where an uninterrupted run does."""
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ultrametric_jax.cli.options import configs_dir, parse_flags
from ultrametric_jax.run.checkpoint import RunCheckpointReader
from ultrametric_jax.run.pipeline import inject, setup_run
from ultrametric_jax.run.settings import RunConfig
from ultrametric_jax.run.trainer import checkpoint_template

REPO = os.path.dirname(configs_dir())
TINY = os.path.join(configs_dir(), "tiny_random.py")
STEPS = 40


def _command(model_dir, workdir):
    return [sys.executable, "-m", "ultrametric_jax", "train", "--config", TINY,
            f"--config.model.path={model_dir}", f"--config.train.steps={STEPS}",
            "--config.checkpoint.every=4", "--config.checkpoint.keep=3", "--workdir", workdir]


def _env(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "cache"))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _steps(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt):
        return []
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())


def _final_state(model_dir, workdir):
    """The newest checkpoint of workdir, read (never changed) in the trainer's state layout."""
    config = RunConfig.from_config_dict(
        parse_flags(["--config", TINY, f"--config.model.path={model_dir}"])[0])
    setup = setup_run(config)
    inject(config, setup.model)
    reader = RunCheckpointReader(os.path.join(workdir, "checkpoints"))
    try:
        return reader.restore_latest(checkpoint_template(config, setup.model))
    finally:
        reader.close()


@pytest.mark.slow
def test_sigkill_then_restart_equals_uninterrupted_run(tmp_path):
    model_dir = runpy.run_path(TINY)["write_model"](str(tmp_path / "tiny"))
    env = _env(tmp_path)
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")

    proc = subprocess.Popen(_command(model_dir, killed), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not _steps(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _steps(killed)
    assert at_kill and at_kill[-1] < STEPS, at_kill

    # The restart and an uninterrupted run of the same length, side by side.
    runs = [subprocess.Popen(_command(model_dir, w), env=env, cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for w in (killed, clean)]
    (resumed_out, resumed_err), (clean_out, clean_err) = [r.communicate(timeout=600)
                                                          for r in runs]
    assert runs[0].returncode == 0, resumed_err[-3000:]
    assert runs[1].returncode == 0, clean_err[-3000:]
    assert f"trained {STEPS} steps (resumed from step {at_kill[-1]})" in resumed_out

    a, b = _final_state(model_dir, killed), _final_state(model_dir, clean)
    assert a.step == b.step == STEPS
    assert a.meta["data_state"] == b.meta["data_state"]
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The metrics log holds each step once, as if the run had never been interrupted.
    records = [json.loads(line) for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    clean_records = [json.loads(line) for line in open(os.path.join(clean, "metrics.jsonl"))]
    assert [r["loss"] for r in records] == [r["loss"] for r in clean_records]

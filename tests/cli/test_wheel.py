"""The wheel as a user installs it: built from the source tree, installed into a fresh virtual
environment, it holds every module and config, and `ultrametric train --config tiny_random`
(the config named by name) trains exactly as the source checkout does."""
import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from ultrametric_jax.cli import app as cli
from ultrametric_jax.cli.options import configs_dir

REPO = os.path.dirname(configs_dir())
SOURCES = ("ultrametric_jax", "pallas_kernels", "configs", "pyproject.toml", "README.md")
STEPS = 4


def _run(cmd, env, cwd):
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (cmd, result.stdout[-2000:], result.stderr[-4000:])
    return result


def _records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_wheel_installs_and_trains_a_config_named_by_name(tmp_path):
    # Build from a copy of the sources, so the checkout gains no build/ or egg-info.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(dist), str(src)], env, tmp_path)
    (wheel,) = glob.glob(str(dist / "ultrametric_jax-*.whl"))

    # Every module of the source tree and every config, under its packaged name.
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {os.path.relpath(p, REPO) for package in ("ultrametric_jax", "pallas_kernels")
                for p in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True)}
    expected |= {f"ultrametric_jax/configs/{os.path.basename(p)}"
                 for p in glob.glob(os.path.join(configs_dir(), "*.py"))}
    assert "ultrametric_jax/configs/tiny_random.py" in expected
    assert expected <= names, sorted(expected - names)

    # A fresh environment that sees the installed dependencies but not the checkout.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], env, tmp_path)
    python, ultrametric = str(venv / "bin" / "python"), str(venv / "bin" / "ultrametric")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], env, tmp_path)
    where = _run([python, "-c", "import ultrametric_jax.cli.options as o; "
                  "print(o.__file__); print(o.configs_dir())"], env, tmp_path).stdout.split()
    site = str(venv / "lib")
    assert where[0].startswith(site) and where[1].startswith(site), where
    assert "tiny_random" in _run([ultrametric, "train", "--help"], env, tmp_path).stdout

    model = str(tmp_path / "tiny")
    _run([python, "-c", "import os, runpy, sys; from ultrametric_jax.cli.options import "
          "configs_dir; runpy.run_path(os.path.join(configs_dir(), 'tiny_random.py'))"
          "['write_model'](sys.argv[1])", model], env, tmp_path)
    workdir = str(tmp_path / "installed")
    train = [ultrametric, "train", "--config", "tiny_random", f"--config.model.path={model}",
             f"--config.train.steps={STEPS}", "--workdir", workdir]
    out = _run(train, env, tmp_path).stdout
    assert f"trained {STEPS} steps" in out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(STEPS)]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["name"] == "tiny_random"

    # Oracle: the same job from the source checkout, in this process.
    checkout = str(tmp_path / "checkout")
    assert cli.main(["train", "--config", "tiny_random", f"--config.model.path={model}",
                     f"--config.train.steps={STEPS}", "--workdir", checkout]) == 0
    installed, reference = _records(workdir), _records(checkout)
    assert [r["step"] for r in installed] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "balance_loss", "density", "grad_norm"):
        assert [r[key] for r in installed] == [r[key] for r in reference], key

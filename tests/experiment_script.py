"""Loads a script of experiments/ as a module (they are scripts, not a package), or runs one
as a CPU dry run in its own process."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def load_experiment(name: str):
    """experiments/<name>.py, executed as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_toy(script, out, *args):
    """script --toy --out out ... in its own process on the CPU, with triton's interpreter
    (triton reads TRITON_INTERPRET at its first import): (the process, the JSON it wrote or
    None)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), "--toy", "--out", str(out), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = pathlib.Path(out)
    return proc, (json.loads(out.read_text()) if out.exists() else None)

"""experiments/bench_backends.py at toy size (CPU, triton's interpreter, in its own process:
triton reads TRITON_INTERPRET at its first import): every backend checked against the float32
reference, densities against a float64 numpy count of visited blocks, the table's ratios in
closed form, and a wrong backend reported as failed."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiment_script import EXPERIMENTS, load_experiment

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(tmp_path, *args):
    out = tmp_path / "backends.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_backends.py"), "--toy",
                           "--out", str(out), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _block_density(ids, *, window, sink, block):
    """Visited blocks / blocks holding a causal pair, summed over heads, in numpy."""
    seq = ids.shape[-1]
    pos = np.arange(seq)
    causal = pos[None, :] <= pos[:, None]
    nb = -(-seq // block)
    visited = total = 0
    for head in ids.reshape(-1, seq):
        allowed = causal & ((head[:, None] == head[None, :]) | (pos[None, :] < sink)
                            | (pos[:, None] - pos[None, :] < window))
        for i in range(nb):
            for j in range(nb):
                tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
                visited += allowed[tile].any()
                total += causal[tile].any()
    return np.float64(visited) / total


@pytest.mark.slow
def test_toy_run_checks_and_times_each_backend(tmp_path):
    pytest.importorskip("triton")
    proc, result = _run(tmp_path, "--backends", "triton", "triton+dq_atomic",
                        "--densities", "1.0", "0.3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    script = load_experiment("bench_backends")
    shape = script.Shape(toy=True)

    checks = result["correctness"]
    assert {(c["backend"], c["dtype"], c["routes"]) for c in checks} == {
        (b, d, r) for b in ("triton", "triton+dq_atomic")
        for d, r in (("bfloat16", "random"), ("bfloat16", "contiguous"), ("float32", "random"))}
    for c in checks:
        errs = [c[n] for n in ("out", "lse", "dq", "dk", "dv")]
        # bf16 / float32 kernels against the float32 reference: close, not trivially equal
        assert c["ok"] and max(errs) <= c["tol"] and max(errs) > 0, c

    cudnn, *rows = result["rows"]
    assert cudnn["variant"] == "cudnn" and cudnn["density"] == 1.0
    assert [(r["backend"], r["target"]) for r in rows] == [
        (b, t) for t in (1.0, 0.3) for b in ("triton", "triton+dq_atomic")]
    # each row's density is that of the contiguous clusters whose numpy density is nearest
    # its target; the ratios are time / (density x cuDNN's time)
    numpy_density = {
        n: _block_density(np.asarray(script.contiguous_ids(shape, 128, n, seed=n)),
                          window=shape.window, sink=script.SINK, block=shape.block)
        for n in range(1, 7)}
    for r in rows:
        nearest = min(numpy_density.values(), key=lambda d: abs(d - r["target"]))
        np.testing.assert_allclose(r["density"], nearest, rtol=1e-6)
        np.testing.assert_allclose(r["fwd_ratio"], r["fwd_ms"] / (r["density"] * cudnn["fwd_ms"]),
                                   rtol=1e-9)
        np.testing.assert_allclose(r["fwd_bwd_ratio"],
                                   r["fwd_bwd_ms"] / (r["density"] * cudnn["fwd_bwd_ms"]),
                                   rtol=1e-9)
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > r["fwd_ms"] * 0.5
    # at 128 tokens in blocks of 32 the window and sink leave one causal block of ten to skip
    assert rows[0]["density"] == 1.0 and rows[2]["density"] == pytest.approx(0.9)
    assert "ratio = time / (density x cuDNN time)" in proc.stdout


@pytest.mark.slow
def test_a_wrong_backend_fails_the_run(tmp_path):
    """A backend whose scale is a quarter too large: every check fails and the run exits 1."""
    pytest.importorskip("triton")
    wrapper = tmp_path / "wrong_scale.py"
    wrapper.write_text(
        "import dataclasses, runpy, sys\n"
        f"sys.path.insert(0, {str(EXPERIMENTS)!r})\n"
        "import bench_backends\n"
        "right = bench_backends.config\n"
        "def wrong(*a, **kw):\n"
        "    cfg = right(*a, **kw)\n"
        "    return dataclasses.replace(cfg, scale=cfg.scale * 1.25)\n"
        "bench_backends.config = wrong\n"
        "sys.argv[0] = bench_backends.__file__\n"
        "bench_backends.main()\n")
    out = tmp_path / "backends.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(wrapper), "--toy", "--backends", "triton",
                           "--densities", "1.0", "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "CORRECTNESS CHECK FAILED" in proc.stdout
    checks = json.loads(out.read_text())["correctness"]
    assert checks and not any(c["ok"] for c in checks)

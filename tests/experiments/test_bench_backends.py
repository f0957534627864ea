"""experiments/bench_backends.py at toy size (CPU, triton's interpreter, in its own process:
triton reads TRITON_INTERPRET at its first import): every backend checked against the float32
reference, densities against the numpy block oracle (block_oracle.brute_force), the table's
ratios in closed form, and a wrong backend reported as failed."""
import numpy as np
import pytest

from block_oracle import brute_force
from experiment_script import EXPERIMENTS, load_experiment, run_toy


@pytest.mark.slow
def test_toy_run_checks_and_times_each_backend(tmp_path):
    pytest.importorskip("triton")
    proc, result = run_toy(EXPERIMENTS / "bench_backends.py", tmp_path / "backends.json",
                           "--backends", "triton", "triton+dq_atomic", "--densities", "1.0",
                           "0.3", "--tuning", "dkv_tile_q=16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert result["tuning"] == {"dkv_tile_q": 16}
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
    ids = {n: np.asarray(script.contiguous_ids(shape, 128, n, seed=n)) for n in range(1, 7)}
    numpy_density = {n: brute_force(x, x, window=shape.window, sink=script.SINK, q_offset=0,
                                    bq=shape.block, bk=shape.block)[2] for n, x in ids.items()}
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
        "import dataclasses, sys\n"
        f"sys.path.insert(0, {str(EXPERIMENTS)!r})\n"
        "import bench_backends\n"
        "right = bench_backends.config\n"
        "def wrong(*a, **kw):\n"
        "    cfg = right(*a, **kw)\n"
        "    return dataclasses.replace(cfg, scale=cfg.scale * 1.25)\n"
        "bench_backends.config = wrong\n"
        "sys.argv[0] = bench_backends.__file__\n"
        "bench_backends.main()\n")
    proc, result = run_toy(wrapper, tmp_path / "backends.json", "--backends", "triton",
                           "--densities", "1.0")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "CORRECTNESS CHECK FAILED" in proc.stdout
    checks = result["correctness"]
    assert checks and not any(c["ok"] for c in checks)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tuning_changes_land_on_each_rows_own(dtype):
    """--tuning's fields go on top of the row's tuning: dq_atomic kept on its +dq_atomic row,
    the dtype's tiles kept where not changed, and nothing changed without the flag."""
    from pallas_kernels.config import GpuTuning
    script = load_experiment("bench_backends")

    def tuning(name, changes):
        backend, got = script.row_tuning(name, dtype, changes)
        assert backend == "triton"
        return got or GpuTuning.for_dtype(dtype)  # None: make_config takes the dtype's own

    defaults = GpuTuning.for_dtype(dtype)
    assert tuning("triton", None) == defaults
    assert tuning("triton+dq_atomic", None) == GpuTuning.for_dtype(dtype, dq_atomic=1)
    assert tuning("triton", {"dkv_stages": 3}) == GpuTuning.for_dtype(dtype, dkv_stages=3)
    got = tuning("triton+dq_atomic", {"dkv_tile_q": 16, "dkv_stages": 3})
    assert (got.dq_atomic, got.dkv_tile_q, got.dkv_stages) == (1, 16, 3)
    assert (got.fwd_tile_k, got.dq_tile_q) == (defaults.fwd_tile_k, defaults.dq_tile_q)

"""experiments/bench_routed.py at toy size (CPU, triton's interpreter, in its own process:
triton reads TRITON_INTERPRET at its first import): both layouts checked against the float32
reference, each row's visited share against the numpy block oracle (block_oracle.brute_force)
of the sorted and the natural layout, the speed-ups in closed form, and a wrong kernel reported
as failed."""
import numpy as np
import pytest

from block_oracle import brute_force
from experiment_script import EXPERIMENTS, load_experiment, run_toy


def oracle_shares(ids, *, window, sink, block):
    """(sorted layout's visited blocks, natural layout's) over the causal blocks, from the
    explicit token masks: the tree pass is causal attention within each cluster on the ids
    sorted stably (window and sink 0), the band pass the window alone in token order (one sink
    key is the sink pass's, not the band's); the natural layout takes every pair at once."""
    heads, seq = ids.shape[1], ids.shape[2]
    blocks = dict(q_offset=0, bq=block, bk=block)
    in_order = np.sort(ids, axis=-1)  # the ids the sorted layout's tree pass sees
    tree, _, _ = brute_force(in_order, in_order, window=0, sink=0, **blocks)
    positions = np.broadcast_to(np.arange(seq), ids.shape)  # every token its own cluster
    band, _, _ = brute_force(positions, positions, window=window, sink=0, **blocks)
    nq = -(-seq // block)
    causal = heads * nq * (nq + 1) // 2
    natural = brute_force(ids, ids, window=window, sink=sink, **blocks)[2]
    return (tree.sum() + band.sum()) / causal, natural


@pytest.mark.slow
def test_toy_run_checks_and_times_both_layouts(tmp_path):
    pytest.importorskip("triton")
    proc, result = run_toy(EXPERIMENTS / "bench_routed.py", tmp_path / "routed.json",
                           "--backend", "triton", "--tuning", "dq_atomic=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    script = load_experiment("bench_routed")
    toy = script.SHAPES["toy"]
    assert result["tuning"] == {"dq_atomic": 1} and result["backend"] == "triton"
    assert result["shape"]["window"] == toy["window"] and result["shape"]["block"] == toy["block"]

    checks = result["correctness"]
    assert {(c["dtype"], c["layout"]) for c in checks} == {
        (d, lay) for d in ("bfloat16", "float32") for lay in ("sorted", "natural")}
    for c in checks:
        errs = [c[n] for n in ("out", "lse", "dq", "dk", "dv")]
        # bf16 / float32 kernels against the float32 reference: close, not trivially equal
        assert c["ok"] and max(errs) <= c["tol"] and max(errs) > 0, c

    rows = result["rows"]
    assert [(r["seq"], r["clusters"], r["layout"]) for r in rows] == [
        (256, 8, "sorted"), (256, 8, "natural")]
    ids = np.asarray(script.random_routes(256, toy["hq"], 8, seed=256 + 8))
    want_sorted, want_natural = oracle_shares(ids, window=toy["window"], sink=script.SINK,
                                              block=toy["block"])
    assert 0 < want_sorted < 1 < want_natural / want_sorted  # the sort skips blocks here
    for r in rows:
        np.testing.assert_allclose(r["visited_share"],
                                   want_sorted if r["layout"] == "sorted" else want_natural,
                                   rtol=1e-6)
        np.testing.assert_allclose(r["natural_density"], want_natural, rtol=1e-6)
        np.testing.assert_allclose(r["bwd_ms"], r["fwd_bwd_ms"] - r["fwd_ms"], rtol=1e-9)
        np.testing.assert_allclose(r["fwd_speedup"], r["cudnn_fwd_ms"] / r["fwd_ms"], rtol=1e-9)
        np.testing.assert_allclose(r["fwd_bwd_speedup"], r["cudnn_fwd_bwd_ms"] / r["fwd_bwd_ms"],
                                   rtol=1e-9)
        assert r["fwd_ms"] > 0 and r["cudnn_fwd_ms"] > 0
    assert "routed_attention end to end (routing excluded) vs cuDNN causal" in proc.stdout


@pytest.mark.slow
def test_a_wrong_kernel_fails_the_run(tmp_path):
    """routed_attention's output a quarter too large: every output check fails, the run
    exits 1 and says so."""
    pytest.importorskip("triton")
    wrapper = tmp_path / "wrong_output.py"
    wrapper.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(EXPERIMENTS)!r})\n"
        "import bench_routed\n"
        "right = bench_routed.routed_attention\n"
        "def wrong(*a, **kw):\n"
        "    got = right(*a, **kw)\n"
        "    return (got[0] * 1.25, *got[1:]) if isinstance(got, tuple) else got * 1.25\n"
        "bench_routed.routed_attention = wrong\n"
        "sys.argv[0] = bench_routed.__file__\n"
        "bench_routed.main()\n")
    proc, result = run_toy(wrapper, tmp_path / "routed.json", "--quick-check", "--layouts",
                           "sorted")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "CORRECTNESS CHECK FAILED" in proc.stdout
    checks = result["correctness"]
    assert checks and not any(c["ok"] for c in checks)
    assert all(c["out"] > 0.1 for c in checks), checks

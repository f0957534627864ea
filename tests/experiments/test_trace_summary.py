"""experiments/trace_summary.py: a hand-made Chrome trace with known sums, and a real trace on
the CPU backend (no device process: the summary says so)."""
import jax
import jax.numpy as jnp
import pytest

from experiment_script import load_experiment

ts = load_experiment("trace_summary")


def meta(pid, name, tid=None):
    event = {"ph": "M", "pid": pid, "name": "thread_name" if tid else "process_name",
             "args": {"name": name}}
    if tid:
        event["tid"] = tid
    return event


def kernel(pid, tid, name, start, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": start, "dur": dur}


def test_sums_per_kind_and_kernel_and_busy_time():
    trace = {"traceEvents": [
        meta(1, "/host:CPU"), meta(1, "python3", tid=10),
        meta(2, "/device:GPU:0"), meta(2, "Stream #13(Compute)", tid=20),
        meta(2, "Stream #14(Memcpy)", tid=21), meta(2, "XLA Ops", tid=22),
        kernel(1, 10, "PjitFunction(f)", 0, 1000),                        # host: left out
        kernel(2, 22, "fusion.3", 0, 500),                                # derived line: left out
        kernel(2, 20, "cudnn_generated_fort_native_sdpa_sm90", 0, 100),
        kernel(2, 20, "nvjet_sm90_tst_128x128", 100, 50),
        kernel(2, 20, "input_reduce_fusion_209", 150, 30),
        kernel(2, 20, "block_sparse_attention_fwd", 400, 60),
        kernel(2, 20, "block_sparse_attention_fwd", 600, 60),
        kernel(2, 21, "memcpy32_post", 120, 100),                         # overlaps 120..180
        kernel(2, 20, "cub::DeviceRadixSortOnesweepKernel", 700, 20),
        kernel(2, 20, "block_sparse_attention_dkv_sorted_dot", 800, 40),    # ours, by name
    ]}
    s = ts.summarize(trace, calls=2, top=3)
    assert s["kernels_per_call"] == 8 / 2
    # union: [0,220) + [400,460) + [600,660) + [700,720) + [800,840) = 400 us
    assert s["busy_ms_per_call"] == pytest.approx(0.400 / 2)
    assert s["kernel_ms_per_call"] == pytest.approx(0.460 / 2)
    assert s["kinds_ms_per_call"] == pytest.approx({
        "cudnn attention": 0.05, "gemm": 0.025, "xla fusion": 0.015, "custom kernels": 0.08,
        "copy": 0.05, "sort": 0.01})
    assert [k["name"] for k in s["top_kernels"]] == [
        "block_sparse_attention_fwd", "cudnn_generated_fort_native_sdpa_sm90", "memcpy32_post"]
    assert s["top_kernels"][0]["launches_per_call"] == 1.0
    assert s["top_kernels"][0]["ms_per_call"] == pytest.approx(0.06)
    assert "block_sparse_attention_fwd" in ts.format_summary("S=8", s)


def test_without_a_device_process_the_summary_says_so():
    s = ts.summarize({"traceEvents": [meta(1, "/host:CPU"), kernel(1, 10, "x", 0, 5)]}, calls=1)
    assert s["kernels_per_call"] is None and "no device kernel events" in s["note"]
    assert "no device kernel events" in ts.format_summary("S=8", s)


def test_profile_traces_a_real_call():
    f = jax.jit(lambda x: jnp.sort(x @ x.T, axis=-1))
    s = ts.profile(f, jnp.ones((64, 64)), reps=2)
    assert s["calls"] == 2
    if jax.default_backend() == "cpu":         # no device process in a CPU trace
        assert s["kernels_per_call"] is None
    else:                                      # a matmul and a sort per call at least
        assert s["kernels_per_call"] >= 2 and s["busy_ms_per_call"] > 0

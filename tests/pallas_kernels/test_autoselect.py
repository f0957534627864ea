"""backend="auto" on a GPU: the measured choice between the Pallas and Triton kernels, recorded
once per (device kind, shape class) in a JSON file (timers here are stand-ins with known times;
test_triton_backend.py measures the real kernels)."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import autoselect

Q = jax.ShapeDtypeStruct((1, 1000, 8, 64), jnp.bfloat16)
K = jax.ShapeDtypeStruct((1, 1000, 2, 64), jnp.bfloat16)
MASK = dict(window=128, sink_tokens=1, block_q=128, block_k=128)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PALLAS_KERNELS_CACHE_DIR", str(tmp_path))
    return tmp_path / "backend_choice.json"


def fake_timer(times, calls, fail=()):
    def timer(backend, q, k, **kwargs):
        calls.append((backend, q.shape, k.shape, kwargs["window"]))
        if backend in fail:
            raise RuntimeError(f"{backend} out of shared memory")
        return times[backend]
    return timer


def test_faster_backend_is_measured_once_and_recorded(cache):
    calls = []
    timer = fake_timer({"gpu": 0.030, "triton": 0.021}, calls)
    got = autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton"], timer=timer,
                            device_kind="H200")
    assert got == "triton"
    assert [c[0] for c in calls] == ["gpu", "triton"]
    assert calls[0][1:] == ((1, 1000, 8, 64), (1, 1000, 2, 64), 128)
    table = json.loads(cache.read_text())
    (key,) = table
    assert key == "H200 | bfloat16 B1 Hq8 Hkv2 D64 S<=1024 blocks128x128 window1 sink1"
    assert table[key] == {"choice": "triton", "scores": {"gpu": 0.030, "triton": 0.021},
                          "errors": {}, "rule": autoselect.RULE}
    # Same class (1000 and 700 tokens both round up to 1024): read back, nothing measured.
    q700 = jax.ShapeDtypeStruct((1, 700, 8, 64), jnp.bfloat16)
    k700 = jax.ShapeDtypeStruct((1, 700, 2, 64), jnp.bfloat16)
    assert autoselect.choose(q700, k700, **MASK, candidates=["gpu", "triton"], timer=timer,
                             device_kind="H200") == "triton"
    assert len(calls) == 2
    # Another device kind is another entry.
    autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton"], timer=timer,
                      device_kind="A100")
    assert len(calls) == 4 and len(json.loads(cache.read_text())) == 2


def test_one_usable_backend_is_not_measured(cache):
    calls = []
    got = autoselect.choose(Q, K, **MASK, candidates=["gpu"],
                            timer=fake_timer({"gpu": 1.0}, calls), device_kind="H200")
    assert got == "gpu" and calls == [] and not cache.exists()


def test_a_failing_backend_loses_and_the_failure_is_recorded(cache):
    calls = []
    timer = fake_timer({"gpu": 0.05, "triton": 0.01}, calls, fail=("triton",))
    assert autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton"], timer=timer,
                             device_kind="H200") == "gpu"
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["scores"] == {"gpu": 0.05}
    assert entry["errors"] == {"triton": "RuntimeError: triton out of shared memory"}


def test_no_backend_running_says_why(cache):
    timer = fake_timer({}, [], fail=("gpu", "triton"))
    with pytest.raises(RuntimeError, match="no GPU backend ran on H200 .*gpu out of shared"):
        autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton"], timer=timer,
                          device_kind="H200")
    assert not cache.exists()


def test_a_record_without_a_candidate_usable_now_is_measured_again(cache):
    """A record made before triton+dq_atomic existed (or before jax-triton was installed)
    does not hide it: every candidate is measured again and the fastest recorded; after
    that, the record serves the same candidates (and fewer) without measuring."""
    calls = []
    times = {"gpu": 0.03, "triton": 0.02, "triton+dq_atomic": 0.015}
    timer = fake_timer(times, calls)
    assert autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton"], timer=timer,
                             device_kind="H200") == "triton"
    everything = ["gpu", "triton", "triton+dq_atomic"]
    assert autoselect.choose(Q, K, **MASK, candidates=everything, timer=timer,
                             device_kind="H200") == "triton+dq_atomic"
    assert [c[0] for c in calls] == ["gpu", "triton", *everything]
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["scores"] == times
    for candidates in (everything, ["gpu", "triton+dq_atomic"]):
        assert autoselect.choose(Q, K, **MASK, candidates=candidates, timer=timer,
                                 device_kind="H200") == "triton+dq_atomic"
    assert len(calls) == 5


def test_a_record_scored_by_another_rule_is_measured_again(cache):
    """A record of full-density seconds alone (made before the sparse measurement) is not
    served: the candidates are measured again under RULE."""
    key = "H200 | bfloat16 B1 Hq8 Hkv2 D64 S<=1024 blocks128x128 window1 sink1"
    cache.write_text(json.dumps({key: {"choice": "gpu", "seconds": {"gpu": 0.01, "triton": 0.02},
                                       "errors": {}}}))
    calls = []
    assert autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton"],
                             timer=fake_timer({"gpu": 0.03, "triton": 0.02}, calls),
                             device_kind="H200") == "triton"
    assert [c[0] for c in calls] == ["gpu", "triton"]
    assert json.loads(cache.read_text())[key]["rule"] == autoselect.RULE


def test_measure_scores_full_and_sparse_density(monkeypatch):
    """measure's score in closed form: the seconds at one cluster plus the seconds at
    SPARSE_CLUSTERS contiguous clusters over that schedule's block density, which matches the
    numpy block oracle."""
    import numpy as np
    from block_oracle import brute_force
    seen = []

    def seconds(f, args, reps):
        qc = np.asarray(args[4])
        seen.append(len(np.unique(qc[0, 0])))
        return {1: 0.5, autoselect.SPARSE_CLUSTERS: 0.125}[seen[-1]]

    monkeypatch.setattr(autoselect, "_seconds", seconds)
    q = jax.ShapeDtypeStruct((1, 96, 2, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 96, 1, 16), jnp.float32)
    score = autoselect.measure("gpu", q, k, window=4, sink_tokens=1, block_q=16, block_k=16,
                               interpret=True, reps=1)
    assert seen == [1, autoselect.SPARSE_CLUSTERS]
    ids = np.broadcast_to(np.arange(96) * autoselect.SPARSE_CLUSTERS // 96, (1, 2, 96))
    visited, _, density = brute_force(ids, ids, window=4, sink=1, q_offset=0, bq=16, bk=16)
    # of 21 causal blocks per head: the diagonal, its neighbours, the sink column
    assert visited[0, 0].sum() == 15 and density == pytest.approx(15 / 21)
    np.testing.assert_allclose(score, 0.5 / 1.0 + 0.125 / density, rtol=1e-6)


def test_contiguous_clusters_run_over_the_whole_sequence():
    got = autoselect.contiguous_clusters(2, 3, 6, 4, offset=2)
    assert got.shape == (2, 3, 6) and got.dtype == jnp.int32
    # positions 2..7 of 8, in 4 runs of 2
    assert got[1, 2].tolist() == [1, 1, 2, 2, 3, 3]


def test_a_damaged_cache_file_is_measured_over(cache):
    cache.write_text("{not json")
    calls = []
    assert autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton"],
                             timer=fake_timer({"gpu": 0.01, "triton": 0.02}, calls),
                             device_kind="H200") == "gpu"
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 1



def test_candidates_hold_mosaic_only_where_it_can_run(monkeypatch):
    """Mosaic joins the measurement only for calls it can run: 2-byte inputs, its blocks and
    a Hopper GPU (here a stand-in for the device check)."""
    from pallas_kernels import mosaic_gpu, triton_backend
    monkeypatch.setattr(triton_backend, "unavailable", lambda interpret: "no triton here")
    if jax.default_backend() != "gpu":  # the real device check refuses a host without a GPU
        assert autoselect.usable_candidates(Q, block_q=128, block_k=128) == ["gpu"]
    monkeypatch.setattr(mosaic_gpu.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mosaic_gpu.jax, "devices", lambda: [type(
        "Hopper", (), dict(device_kind="H200", compute_capability="9.0"))()])
    assert autoselect.usable_candidates(Q, block_q=128, block_k=128) == ["gpu", "mosaic"]
    assert autoselect.usable_candidates(Q, block_q=64, block_k=64) == ["gpu"]
    f32 = jax.ShapeDtypeStruct(Q.shape, jnp.float32)
    assert autoselect.usable_candidates(f32, block_q=128, block_k=128) == ["gpu"]


def test_candidates_hold_the_atomic_dq_backward_where_triton_runs(monkeypatch):
    """With jax-triton usable, each backend whose backward is Triton's is measured twice: as
    it is and with dq added by atomics (GpuTuning.dq_atomic)."""
    from pallas_kernels import mosaic_gpu, triton_backend
    monkeypatch.setattr(triton_backend, "unavailable", lambda interpret: None)
    monkeypatch.setattr(mosaic_gpu, "unavailable", lambda cfg, dtype: None)
    assert autoselect.usable_candidates(Q, block_q=128, block_k=128) == [
        "gpu", "triton", "triton+dq_atomic", "mosaic", "mosaic+dq_atomic"]
    assert set(autoselect.usable_candidates(Q, block_q=128, block_k=128)) == set(
        autoselect.CANDIDATES)
    monkeypatch.setattr(mosaic_gpu, "unavailable", lambda cfg, dtype: "not Hopper")
    assert autoselect.usable_candidates(Q, block_q=128, block_k=128) == [
        "gpu", "triton", "triton+dq_atomic"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_candidate_names_split_into_backend_and_tuning(dtype):
    from pallas_kernels.config import GpuTuning
    assert autoselect.split_candidate("triton", dtype) == ("triton", None)
    assert autoselect.split_candidate("gpu", dtype) == ("gpu", None)
    backend, tuning = autoselect.split_candidate("mosaic+dq_atomic", dtype)
    assert backend == "mosaic"
    assert vars(tuning) == {**vars(GpuTuning.for_dtype(dtype)), "dq_atomic": 1}
    assert [autoselect.candidate_backend(c) for c in autoselect.CANDIDATES] == [
        "gpu", "triton", "triton", "mosaic", "mosaic"]
    for bad in ("cuda", "triton+fast", "triton+", "gpu+dq_atomic"):
        with pytest.raises(ValueError, match=re.escape(f"unknown candidate '{bad}'")):
            autoselect.split_candidate(bad, dtype)


def test_recorded_tuned_choice_reaches_the_config(cache, monkeypatch):
    """A recorded "triton+dq_atomic" makes backend="auto" run the Triton kernels with
    dq_atomic on: pick_backend hands make_config that tuning."""
    from pallas_kernels import ops
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    timer = fake_timer({"gpu": 0.03, "triton": 0.02, "triton+dq_atomic": 0.015}, [])
    autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton", "triton+dq_atomic"],
                      timer=timer, device_kind=jax.devices()[0].device_kind)
    monkeypatch.setattr(autoselect, "usable_candidates",
                        lambda q, **kw: ["gpu", "triton", "triton+dq_atomic"])
    backend, tuning = ops.pick_backend("auto", Q, K, window=128, sink_tokens=1, block_q=128,
                                       block_k=128)
    assert backend == "triton" and tuning.dq_atomic == 1
    assert ops.pick_backend("triton", Q, K, window=128, sink_tokens=1, block_q=128,
                            block_k=128) == ("triton", None)


def test_a_given_gpu_tuning_wins_over_the_recorded_one(cache, monkeypatch):
    """pick_backend with gpu_tuning: backend="auto" still picks the backend, the caller's
    tuning replaces the recorded one; anything but a GpuTuning is refused by name."""
    from pallas_kernels import GpuTuning, ops
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(autoselect, "usable_candidates",
                        lambda q, **kw: ["gpu", "triton", "triton+dq_atomic"])
    autoselect.choose(Q, K, **MASK, candidates=["gpu", "triton", "triton+dq_atomic"],
                      timer=fake_timer({"gpu": 0.03, "triton": 0.02, "triton+dq_atomic": 0.015},
                                       []), device_kind=jax.devices()[0].device_kind)
    mine = GpuTuning(fwd_tile_k=32)
    assert ops.pick_backend("auto", Q, K, **MASK, gpu_tuning=mine) == ("triton", mine)
    assert ops.pick_backend("gpu", Q, K, **MASK, gpu_tuning=mine) == ("gpu", mine)
    with pytest.raises(TypeError, match="gpu_tuning must be a pallas_kernels.GpuTuning or "
                       "None, got dict"):
        ops.pick_backend("triton", Q, K, **MASK, gpu_tuning={"dq_atomic": 1})


def test_measurement_under_jit_runs_outside_the_trace(cache):
    """Called while jax.jit traces (q a tracer), the timer runs as at top level: its own jit
    stages every primitive, one without inputs (what a kernel's program_id is) included,
    instead of evaluating it eagerly, and returns concrete values."""
    seen = []

    def timer(backend, q, k, **kwargs):
        staged = []

        def f(x):
            ramp = jax.lax.iota(jnp.float32, 2)  # no inputs
            staged.append(isinstance(ramp, jax.core.Tracer))
            return x * 2.0 + ramp

        value = jax.jit(f)(jnp.full((2,), 3.0))
        seen.append((backend, staged, isinstance(value, jax.core.Tracer), value.tolist()))
        return {"gpu": 0.02, "triton": 0.01}[backend]

    q = jnp.ones((1, 1000, 8, 64), jnp.bfloat16)
    k = jnp.ones((1, 1000, 2, 64), jnp.bfloat16)
    chosen = []
    jax.jit(lambda q, k: chosen.append(autoselect.choose(
        q, k, **MASK, candidates=["gpu", "triton"], timer=timer, device_kind="H200")) or q)(q, k)
    assert chosen == ["triton"]
    assert seen == [("gpu", [True], False, [6.0, 7.0]), ("triton", [True], False, [6.0, 7.0])]

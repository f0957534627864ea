"""experiments/route_precision.py at toy size (CPU, Pallas interpret mode): its JSON against
numpy recomputations from the saved logits and cluster ids, float32 kernels against the float32
masked dense path, and restore_run's dtype override."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiment_script import load_experiment


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_run_dir):
    script = load_experiment("route_precision")
    workdir = toy_run_dir
    out = tmp_path_factory.mktemp("out") / "toy.json"
    result = script.main([workdir, "--toy", "--seq-len", "16", "--out", str(out)])
    return workdir, result, json.loads(out.read_text()), np.load(out.with_suffix(".npz"))


def numpy_compare(ref_logits, ref_ids, logits, ids):
    def log_probs(x):
        x = x.astype(np.float64)
        return x - x.max(-1, keepdims=True) - np.log(
            np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    p = np.exp(log_probs(ref_logits))
    kl = np.mean(np.sum(p * (log_probs(ref_logits) - log_probs(logits)), axis=-1))
    rel = np.max(np.abs(logits - ref_logits)) / max(1.0, np.max(np.abs(ref_logits)))
    moved = [np.mean(a != b) for a, b in zip(ids, ref_ids)]
    return rel, kl, float(np.mean(ids != ref_ids)), moved


@pytest.mark.slow
def test_numbers_match_a_recomputation_from_the_saved_arrays(toy):
    _, result, saved, arrays = toy
    assert saved == json.loads(json.dumps(result))
    assert set(saved["paths"]) == {"float32 kernel", "bfloat16 dense", "bfloat16 kernel",
                                   "bfloat16 kernel vs bfloat16 dense"}
    pairs = {"float32 kernel": ("float32_dense", "float32_kernel"),
             "bfloat16 dense": ("float32_dense", "bfloat16_dense"),
             "bfloat16 kernel": ("float32_dense", "bfloat16_kernel"),
             "bfloat16 kernel vs bfloat16 dense": ("bfloat16_dense", "bfloat16_kernel")}
    for name, (ref, other) in pairs.items():
        rel, kl, moved, per_layer = numpy_compare(
            arrays[f"{ref}_logits"], arrays[f"{ref}_clusters"], arrays[f"{other}_logits"],
            arrays[f"{other}_clusters"])
        r = saved["paths"][name]
        assert r["logits_rel_diff"] == pytest.approx(rel, rel=1e-9, abs=1e-12)
        assert r["kl_nats"] == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert r["ids_differ"] == pytest.approx(moved)
        assert r["ids_differ_per_layer"] == pytest.approx(per_layer)
    assert arrays["float32_dense_clusters"].shape == (2, 4, 16)     # layers, heads, tokens
    assert len(np.unique(arrays["float32_dense_clusters"])) > 1      # the routes split


@pytest.mark.slow
def test_float32_kernels_equal_the_reference_and_bfloat16_differs(toy):
    _, _, saved, arrays = toy
    f32 = saved["paths"]["float32 kernel"]
    assert f32["logits_rel_diff"] < 1e-5 and f32["ids_differ"] == 0.0
    # the Pallas kernels ran (interpreted), not XLA's masked attention, which is the reference
    # itself and would agree to the last bit
    assert saved["backend"] == "gpu" and f32["logits_rel_diff"] > 0
    # the override took effect: bfloat16 arithmetic moves the logits
    assert saved["paths"]["bfloat16 dense"]["logits_rel_diff"] > 1e-4
    assert arrays["bfloat16_dense_logits"].dtype == np.float64


@pytest.mark.slow
def test_restore_run_takes_a_compute_dtype(toy):
    workdir, _, _, _ = toy
    from ultrametric_jax.run.export import ExportError
    from ultrametric_jax.run.pipeline import restore_run
    bench = load_experiment("bench_model_routes")
    directory = bench.checkpoints_of(workdir)
    assert restore_run(directory, dtype="bfloat16").model.dtype == jnp.bfloat16
    assert restore_run(directory).model.dtype == jnp.float32
    with pytest.raises(ExportError, match=r"dtype='int8' is not a compute dtype"):
        restore_run(directory, dtype="int8")


@pytest.mark.slow
def test_auto_backend_without_a_gpu_is_refused(toy, tmp_path):
    workdir, _, _, _ = toy
    script = load_experiment("route_precision")
    with pytest.raises(SystemExit, match=r"--backend auto without a GPU runs XLA's masked "
                       r"attention, the reference itself"):
        script.main([workdir, "--toy", "--backend", "auto", "--out", str(tmp_path / "x.json")])

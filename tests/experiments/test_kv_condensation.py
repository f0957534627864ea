"""experiments/kv_condensation.py at toy size (CPU): its perplexities against a layer-by-layer
recomputation with the float64 numpy reference attention, its dense replies against the
project's own greedy decoding, and its figure."""
import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from condense_reference import reference

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROWS = 2               # rows recomputed here (the reference loops over every query)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_run_dir):
    spec = importlib.util.spec_from_file_location(
        "kv_condensation", ROOT / "experiments" / "kv_condensation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from bench_model_routes import checkpoints_of, perturb_routers
    from ultrametric_jax.run.pipeline import restore_run
    workdir = toy_run_dir
    out = tmp_path_factory.mktemp("out")
    module.main(["--toy", "--run-dir", workdir, "--out", str(out)])
    result = json.loads((out / "toy.json").read_text())
    restored = restore_run(checkpoints_of(workdir))
    perturb_routers(restored.model)              # the same scattered routes as the script's
    return result, restored, out


def recompute_nll(restored, rows, eval_len, **cache):
    """Per-row mean NLL of the last eval_len tokens, every attention layer computed by the
    float64 numpy reference (projections, routers and MLPs: the model's own modules)."""
    from ultrametric_jax.model import llama
    from ultrametric_jax.surgery import tree as um
    from ultrametric_jax.surgery.inject import surgical_layers
    model, surgery = restored.model, restored.surgery
    tokens = jnp.asarray(rows)
    positions = llama.default_positions(tokens)
    x = model.model.embed_tokens(tokens)
    for layer, attn in zip(model.model.layers, surgical_layers(model)):
        h = layer.input_layernorm(x)
        q, k, v = llama.project_qkv(model.config, attn.q_proj, attn.k_proj, attn.v_proj, h,
                                    positions)
        clusters = um.cluster_ids(um.hard_digits(attn.router(h)), surgery.arity,
                                  surgery.cut_level)
        out, _ = reference(*(np.asarray(a, np.float64) for a in (q, k, v)),
                           np.asarray(clusters), surgery.arity ** surgery.cut_level,
                           sink=surgery.sink_tokens, keep="largest", medoid="closest", **cache)
        x = x + attn.o_proj(jnp.asarray(out.reshape(*out.shape[:2], -1), jnp.float32))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return nll_of(model.logits(model.model.norm(x)), rows, eval_len)


def nll_of(logits, rows, eval_len):
    logits = np.asarray(logits, np.float64)[:, -eval_len - 1:-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    target = np.asarray(rows)[:, -eval_len:]
    return -np.take_along_axis(logp, target[..., None], -1)[..., 0].mean(axis=1)


def test_perplexities_match_a_reference_recomputation(toy):
    result, restored, _ = toy
    cfg = result["config"]
    rows = np.array(result["rows"])
    window, caches = result["window"], result["caches"]
    assert window == restored.surgery.window and result["num_clusters"] == 4
    c = 2                                        # binds: fewer slots than clusters
    gamma = cfg["gamma"]
    cases = {"dense": dict(window=rows.shape[1] + 1, capacity=0, own=False, gamma=gamma),
             f"window+{c}": dict(window=window + c, capacity=0, own=False, gamma=gamma),
             f"condensed_all@{c}": dict(window=window, capacity=c, own=False, gamma=gamma),
             f"condensed_own@{c}": dict(window=window, capacity=c, own=True, gamma=gamma)}
    nll = {}
    for name, cache in cases.items():
        nll[name] = recompute_nll(restored, rows[:ROWS], cfg["eval_len"], **cache)
        got = np.array(caches[name]["nll_per_sequence"][:ROWS])
        np.testing.assert_allclose(got, nll[name], rtol=2e-4, err_msg=name)
    # the caches differ from one another (the comparison is not vacuous)
    assert len({round(float(v.mean()), 4) for v in nll.values()}) == len(nll)
    # the surgical mask: the model's own forward
    surgical = nll_of(restored.model(jnp.asarray(rows[:ROWS])), rows[:ROWS], cfg["eval_len"])
    np.testing.assert_allclose(caches["surgical"]["nll_per_sequence"][:ROWS], surgical,
                               rtol=2e-4)
    for entry in caches.values():               # ppl = exp(mean NLL over all scored tokens)
        assert entry["ppl"] == pytest.approx(np.exp(np.mean(entry["nll_per_sequence"])))


def test_needle_replies_and_the_figure(toy):
    from ultrametric_jax.run.generate import generate
    from ultrametric_jax.run.tasks.retrieval import is_correct
    from ultrametric_jax.surgery.inject import base_model_mode
    result, restored, out = toy
    prompts = result["needle_prompts"]
    assert len(prompts) == 2 and all(p["key_distance"] > result["window"] + 4 for p in prompts)
    with base_model_mode(restored.model):
        want = generate(restored.model, [p["ids"] for p in prompts],
                        result["config"]["needle"]["max_new_tokens"], cache="dense")
    dense = result["caches"]["dense"]["needle"]
    for got, row in zip(dense["reply_ids"], want):
        assert got == row[:len(got)].tolist()
    for entry in result["caches"].values():
        n = entry["needle"]
        assert n["correct"] == [is_correct(r, p["key"]) for r, p in zip(n["replies"], prompts)]
        assert n["accuracy"] == pytest.approx(np.mean(n["correct"]))
    png = out / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

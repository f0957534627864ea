"""The key selector of a surgical layer: a float64 numpy construction of its mask (per query,
the keys whose probability under the projected score estimate passes the threshold,
the row's most probable key and its own, beside the sink + window, within the tree's pairs),
identity
at initialisation, cached decoding against full recomputation, the reported density against
a count, the fit (the score estimate's closed form from training rows, the threshold by
bisection) and its errors."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_selector import np_bilinear
from test_surgery import np_qkv, perturb_routers, random_ids, run_layer, tiny_model
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.model import llama
from ultrametric_jax.run import key_selection
from ultrametric_jax.run.evaluate import evaluate_surgical
from ultrametric_jax.surgery import inject as surgery
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.key_selector import SELECT_ALL, bilinear_factors, visited_blocks


def random_projections(rng, heads=4, dim=8, rank=3):
    """(query_proj, key_proj), [H, D, rank] each."""
    return tuple(rng.normal(size=(heads, dim, rank)) for _ in range(2))


def set_selector(attn, projections, log_t):
    attn.selector.query_proj[...] = jnp.asarray(projections[0], jnp.float32)
    attn.selector.key_proj[...] = jnp.asarray(projections[1], jnp.float32)
    attn.selector.log_threshold[...] = jnp.float32(log_t)


def np_selector_attention(attn, x, valid, clusters, window, sink, projections, log_t):
    """float64 oracle of one surgical layer with a key selector: the output and the allowed
    pairs [B, H, S, S]."""
    batch, seq = x.shape[:2]
    q, k, v = np_qkv(attn, x)
    heads, groups, dim = q.shape[2], k.shape[2], q.shape[3]
    out = np.zeros_like(q)
    allowed = np.zeros((batch, heads, seq, seq), bool)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            w_q, w_k = (np.asarray(p[h], np.float32).astype(np.float64) for p in projections)
            estimate = (q[b, :, h] / np.sqrt(dim)) @ w_q @ (k[b, :, g] @ w_k).T
            for i in range(seq):
                causal = (np.arange(seq) <= i) & valid[b]
                if not causal.any():
                    continue
                e = np.where(causal, estimate[i], -np.inf)
                logp = e - e.max() - np.log(np.exp(e - e.max()).sum())
                chosen = causal & ((logp >= log_t) | (e == e.max()) | (np.arange(seq) == i))
                local = (np.arange(seq) < sink) | (i - np.arange(seq) < window)
                tree = clusters[b, h, i] == clusters[b, h]
                keep = causal & (tree | local) & (chosen | local)
                allowed[b, h, i] = keep
                if not keep.any():                   # a padding row with no real key
                    continue
                s = np.where(keep, q[b, i, h] @ k[b, :, g].T / np.sqrt(dim), -np.inf)
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, :, g]
    kernel = np.asarray(attn.o_proj.kernel[...], np.float64)
    return out.reshape(batch, seq, -1) @ kernel, allowed


def selector_model(rank=3, window=2, sink=1, perturbed=True, **config):
    cfg = SurgeryConfig(arity=2, levels=3, d_max=1, window=window, sink_tokens=sink,
                        key_rank=rank, **config)
    model = surgery.inject_topology(tiny_model(qk_gain=6.0), cfg, nnx.Rngs(0))
    if perturbed:
        perturb_routers(model, seed=3)
    model.eval()
    return model, cfg


@pytest.mark.parametrize("window,sink,log_t,perturbed", [(0, 0, -1.0, True), (3, 2, -2.5, False)])
def test_selector_layer_matches_a_float64_construction(window, sink, log_t, perturbed):
    model, _ = selector_model(window=window, sink=sink, perturbed=perturbed)
    rng = np.random.default_rng()
    attn = model.model.layers[0].self_attn
    projections = random_projections(rng)
    set_selector(attn, projections, log_t)
    batch, seq = 2, 12
    x = rng.normal(size=(batch, seq, 32)).astype(np.float32)
    valid = np.arange(seq)[None] < np.array([[seq], [8]])
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    got, clusters = run_layer(attn, jnp.asarray(x), positions, jnp.asarray(valid))
    want, allowed = np_selector_attention(attn, x, valid, np.asarray(clusters), window, sink,
                                          projections, log_t)
    # the selector narrows the mask: some causal pairs outside the sink + window dropped,
    # some kept
    causal = np.tril(np.ones((seq, seq), bool), -max(window, 1))[None, None] & valid[:, None,
                                                                                      None]
    assert (allowed & causal).any() and (~allowed & causal).any()
    rows = valid[..., None].repeat(got.shape[-1], -1)
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=0,
                               atol=2e-6 * np.abs(want).max())


def test_an_unfitted_selector_is_the_identity_and_cached_decoding_equals_a_full_forward():
    model, cfg = selector_model()
    plain = surgery.inject_topology(tiny_model(qk_gain=6.0), SurgeryConfig(
        arity=2, levels=3, d_max=1, window=2, sink_tokens=1), nnx.Rngs(0))
    perturb_routers(plain, seed=3)
    plain.eval()
    ids = random_ids(2, 12)
    forward = nnx.jit(lambda m, i: m(i))
    assert model.model.layers[0].self_attn.selector.log_threshold[...] == np.float32(SELECT_ALL)
    # the same mask (the same density, the same logits up to the compiled graph's rounding)
    np.testing.assert_allclose(np.asarray(forward(model, ids)), np.asarray(forward(plain, ids)),
                               rtol=0, atol=1e-6)
    with_aux = nnx.jit(lambda m, i: surgery.forward_with_aux(m, i)[1]["density_per_layer"])
    np.testing.assert_array_equal(np.asarray(with_aux(model, ids)),
                                  np.asarray(with_aux(plain, ids)))
    # fitted: the selection reads q_i and the keys j <= i only, so a cache selects the same
    rng = np.random.default_rng(5)
    for attn in surgery.surgical_layers(model):
        set_selector(attn, random_projections(rng), -1.2)
    full = np.asarray(forward(model, ids))
    assert np.abs(full - np.asarray(forward(plain, ids))).max() > 1e-3      # it selects
    decode = nnx.jit(lambda m, i, c: m(i, cache=c))
    logits, cache = decode(model, ids[:, :5], model.init_cache(2, 16))
    steps = [np.asarray(logits)]
    for t in range(5, 12):
        logits, cache = decode(model, ids[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0,
                               atol=1e-5 * np.abs(full).max())


def test_reported_density_counts_the_selected_pairs():
    model, cfg = selector_model()
    rng = np.random.default_rng()
    drawn = []
    for attn in surgery.surgical_layers(model):
        drawn.append(random_projections(rng))
        set_selector(attn, drawn[-1], -1.5)
    ids = np.asarray(random_ids(2, 12, seed=4))
    mask = np.arange(12)[None] < np.array([[12], [9]])
    result = evaluate_surgical(model, [{"input_ids": ids, "attention_mask": mask}], cfg)
    # the layers' inputs, from a forward that records them
    routes = surgery.extract_routes(model, jnp.asarray(ids), jnp.asarray(mask))
    x = np.asarray(model.model.embed_tokens(jnp.asarray(ids)))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    want = []
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = np.asarray(layer.input_layernorm(jnp.asarray(x)))
        _, allowed = np_selector_attention(attn, h, mask, np.asarray(routes.cluster_ids[index]),
                                           2, 1, drawn[index], -1.5)
        real = mask[:, None, :, None] & mask[:, None, None, :] & np.tril(np.ones((12, 12), bool))
        want.append((allowed & real).sum() / (real.sum() * 4))         # 4 heads
        x = np.asarray(layer(jnp.asarray(x), positions, jnp.asarray(mask)))
    np.testing.assert_allclose(result["density_per_layer"], want, rtol=1e-6)
    assert all(0 < d < 1 for d in want)
    # 12 tokens make one 64 x 64 tile per (row, head), and it holds an allowed pair
    np.testing.assert_array_equal(result["block_density_per_layer"], [1.0, 1.0])


def test_visited_blocks_count_the_tiles_a_block_sparse_kernel_visits():
    rng = np.random.default_rng()
    b, h, sq, sk, block = 2, 3, 23, 29, 4                 # partial last tiles both ways
    allowed = rng.random((b, h, sq, sk)) < 0.03
    causal = (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + 6)[None, None] & (
        rng.random((b, 1, 1, sk)) < 0.8)
    got = visited_blocks(jnp.asarray(allowed), jnp.asarray(causal), block)
    tiles = lambda m: sum(m[i, j, a:a + block, c:c + block].any()
                          for i in range(b) for j in range(h)
                          for a in range(0, sq, block) for c in range(0, sk, block))
    full = np.broadcast_to(causal, allowed.shape)
    assert float(got[0]) == tiles(allowed & full) and float(got[1]) == tiles(full)
    assert 0 < float(got[0]) < float(got[1])


def test_bilinear_factors_closed_forms():
    rng = np.random.default_rng()
    x, y = rng.normal(size=(2, 3, 40, 6)) * np.array([4.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    cq, ck = np.einsum("hsd,hse->hde", x, x) / 40, np.einsum("hsd,hse->hde", y, y) / 40
    for rank in (1, 3, 5):
        w_q, w_k = bilinear_factors(jnp.asarray(cq, jnp.float32), jnp.asarray(ck, jnp.float32),
                                    rank)
        got = np.asarray(w_q @ jnp.swapaxes(w_k, -1, -2), np.float64)
        for h in range(3):
            want = np_bilinear(cq[h], ck[h], rank)
            np.testing.assert_allclose(got[h], want, atol=2e-3 * np.abs(want).max())
            assert np.linalg.matrix_rank(got[h], tol=1e-4 * np.abs(got[h]).max()) == rank
    # full rank: the estimate is the scores themselves (A = I)
    w_q, w_k = bilinear_factors(jnp.asarray(cq, jnp.float32), jnp.asarray(ck, jnp.float32), 6)
    np.testing.assert_allclose(np.asarray(w_q @ jnp.swapaxes(w_k, -1, -2)),
                               np.broadcast_to(np.eye(6), (3, 6, 6)), atol=2e-3)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 6\] \(the head dimension\), "
                                         r"got 7"):
        bilinear_factors(jnp.asarray(cq), jnp.asarray(ck), 7)


def test_fitting_sets_the_least_squares_score_estimate_and_meets_the_target_density():
    model, cfg = selector_model(perturbed=False)
    train = [{"input_ids": np.asarray(random_ids(2, 16, seed=s)),
              "attention_mask": np.ones((2, 16), bool)} for s in (7, 8)]
    calibration = [{"input_ids": np.asarray(random_ids(2, 16, seed=9)),
                    "attention_mask": np.ones((2, 16), bool)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a reachable target: no floor warning
        fitted = key_selection.fit_key_selectors(model, train, calibration, target=0.6,
                                                 steps=12)
    # the estimate: per query head, np_bilinear of the float64 second moment of the scaled
    # queries and covariance of the keys on the training rows (a layer's input is the base
    # model's hidden state: the selectors play no part in fitting)
    plain = tiny_model(qk_gain=6.0)
    qs, ks = [[], []], [[], []]
    for batch in train:
        x = plain.model.embed_tokens(jnp.asarray(batch["input_ids"]))
        positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
        for index, layer in enumerate(plain.model.layers):
            q, k, _ = llama.project_qkv(plain.config, layer.self_attn.q_proj,
                                        layer.self_attn.k_proj, layer.self_attn.v_proj,
                                        layer.input_layernorm(x), positions)
            qs[index].append(np.asarray(q, np.float64).reshape(-1, 4, 8) / np.sqrt(8))
            ks[index].append(np.asarray(k, np.float64).reshape(-1, 2, 8))
            x = layer(x, positions)
    for index, attn in enumerate(surgery.surgical_layers(model)):
        q, k = np.concatenate(qs[index]), np.concatenate(ks[index])
        got = np.asarray(attn.selector.query_proj[...] @ jnp.swapaxes(
            attn.selector.key_proj[...], -1, -2), np.float64)
        for h in range(4):
            kv = k[:, h // 2] - k[:, h // 2].mean(0)
            want = np_bilinear(q[:, h].T @ q[:, h] / len(q), kv.T @ kv / len(kv), 3)
            np.testing.assert_allclose(got[h], want, atol=2e-3 * np.abs(want).max())
    # the threshold: the strictest found whose density meets the target; one resolution step
    # stricter falls below it
    assert fitted["density"] >= 0.6 and fitted["fit_rows"] == 4
    at = evaluate_surgical(model, calibration, cfg)["density"]
    assert at == pytest.approx(fitted["density"], abs=1e-9)
    step = -key_selection.LOWEST_LOG_THRESHOLD / 2 ** 12
    key_selection.set_threshold(model, fitted["log_threshold"] + step)
    assert evaluate_surgical(model, calibration, cfg)["density"] < 0.6 <= at
    # below the floor (sink, window, own and most probable key: what even p >= 1 keeps) the
    # calibration says so, and keeps a density at or above that floor
    key_selection.set_threshold(model, 0.0)
    floor = evaluate_surgical(model, calibration, cfg)["density"]
    with pytest.warns(RuntimeWarning, match=r"the target density 0.01 lies below what the sink, "
                      r"the window and each query's own and most probable key keep \(0\.\d{4}\)"):
        low = key_selection.calibrate_threshold(model, calibration, 0.01, steps=4,
                                                progress=False)
    assert 0.01 < floor <= low["density"]
    assert low["log_threshold"] == pytest.approx(-2.5)     # every bisection step met 0.01


def test_selector_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"SurgeryConfig.key_rank=-1: must be an integer >= 0"):
        SurgeryConfig(key_rank=-1)
    with pytest.raises(ConfigError, match=r"key_rank=9: must lie in \[0, 8\] \(the model's "
                                          r"head dimension\)"):
        surgery.inject_topology(tiny_model(), SurgeryConfig(key_rank=9), nnx.Rngs(0))
    plain = surgery.inject_topology(tiny_model(), SurgeryConfig(), nnx.Rngs(0))
    with pytest.raises(ValueError, match="key_rank=0: no key selector to fit"):
        key_selection.fit_projections(plain, [])
    with pytest.raises(ValueError, match="carries no surgical topology"):
        key_selection.set_threshold(tiny_model(), -1.0)
    model, _ = selector_model()
    batch = [{"input_ids": np.asarray(random_ids(1, 8)), "attention_mask": np.ones((1, 8), bool)}]
    with pytest.raises(ValueError, match=r"target density must lie in \(0, 1\], got 1.5"):
        key_selection.calibrate_threshold(model, batch, 1.5)
    with pytest.raises(ValueError, match="no training rows"):
        key_selection.fit_projections(model, [])
    # a selector file that does not fit the model is refused by what is wrong with it
    from ultrametric_jax.run.export import ExportError, load_selectors, save_selectors
    path = save_selectors(model, str(tmp_path / "selectors.safetensors"), {"step": 3})
    narrower, _ = selector_model(rank=2)
    with pytest.raises(ExportError, match=r"key-selector tensor model\.layers\.0\.self_attn\."
                                          r"selector\.query_proj has shape \(4, 8, 3\), expected "
                                          r"\(4, 8, 2\) \(heads, head dimension, key_rank = 2\)"):
        load_selectors(narrower, path)
    with pytest.raises(ExportError, match="missing key selectors: .* does not exist"):
        load_selectors(narrower, str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ExportError, match="the model has no key selectors"):
        load_selectors(plain, path)
    surgery.set_attention_impl(model, "kernel", interpret=True)
    with pytest.raises(NotImplementedError, match="runs in the masked dense evaluation path"):
        model(random_ids(1, 8))

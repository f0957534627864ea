"""Topology injection: collapse equivalence, the surgical attention against a float64 oracle,
gradient flow through the straight-through bridge, aux values, KV cache, trainable state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import jit_forward
from ultrametric_jax.surgery import inject as surgery
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.model import llama
from ultrametric_jax.model.llama import LlamaForCausalLM
from ultrametric_jax.surgery.router import RouterParam
from ultrametric_jax.surgery.attention import SurgicalAttention, capture_aux


def tiny_model(heads=4, kv=2, layers=2, tie=False, seed=0, qk_gain=1.0, dtype=jnp.float32):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=8, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
    for layer in model.model.layers:  # sharper attention than the 0.02 init gives
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.kernel[...] = proj.kernel[...] * qk_gain
    return model


def perturb_routers(model, seed, scale=1.0):
    """Moves every router away from collapse: random fc2 kernel, zero fc2 bias."""
    rng = np.random.default_rng(seed)
    for attn in surgery.surgical_layers(model):
        fc2 = attn.router.fc2
        fc2.kernel[...] = jnp.asarray(rng.normal(size=fc2.kernel.shape) * scale, jnp.float32)
        fc2.bias[...] = jnp.zeros(fc2.bias.shape, jnp.float32)


def random_ids(batch, seq, seed=1, vocab=96):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)


@nnx.jit
def aux_of(model, ids, mask=None):
    """forward_with_aux, compiled."""
    return surgery.forward_with_aux(model, ids, mask)


def lm_loss(logits, ids):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def np_qkv(attn, x):
    """float64 q [B,S,H,D], k, v [B,S,G,D] of a layer's projections (RoPE at positions 0..S-1)."""
    batch, seq = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    return tuple(np.asarray(a, np.float64) for a in llama.project_qkv(
        attn.config, attn.q_proj, attn.k_proj, attn.v_proj, jnp.asarray(x), positions))


def np_surgical_attention(attn, x, valid, clusters, window, sink):
    """float64 oracle of one surgical attention layer given its routes (cluster ids)."""
    batch, seq = x.shape[:2]
    q, k, v = np_qkv(attn, x)
    heads, groups, dim = q.shape[2], k.shape[2], q.shape[3]
    clusters = np.asarray(clusters)
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            for i in range(seq):
                keys = [j for j in range(seq) if j <= i and valid[b, j] and (
                    clusters[b, h, i] == clusters[b, h, j] or j < sink or i - j < window)]
                if not keys:
                    continue
                s = np.array([q[b, i, h] @ k[b, j, g] for j in keys]) / np.sqrt(dim)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, i, h] = p @ v[b, keys, g]
    kernel = np.asarray(attn.o_proj.kernel[...], np.float64)
    return out.reshape(batch, seq, -1) @ kernel


# ---------------------------------------------------------------- configuration

def test_surgery_config_validation():
    assert SurgeryConfig(arity=5, max_len=125).num_levels == 3
    cfg = SurgeryConfig()
    assert (cfg.num_levels, cfg.max_distance, cfg.cut_level) == (13, 6, 7)
    cases = [(dict(arity=1), "SurgeryConfig.arity=1"), (dict(d_max=5, levels=4), "d_max=5"),
             (dict(window=-1), "window=-1"), (dict(sink_tokens=-2), "sink_tokens=-2"),
             (dict(depth_op="cumsum"), "depth_op='cumsum'"), (dict(ste="soft"), "ste='soft'"),
             (dict(mask_temperature=0.0), "mask_temperature"),
             (dict(tau_start=0.1, tau_end=0.5), "tau_end"), (dict(levels=0), "levels=0"),
             (dict(init_margin=0.0), "init_margin")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            SurgeryConfig(**kwargs)


# ---------------------------------------------------------------- injection

def variable_paths(model):
    return {tuple(map(str, path)) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable)}


def test_injection_reuses_base_modules_and_paths():
    model = tiny_model()
    before = {i: (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.o_proj)
              for i, l in enumerate(model.model.layers)}
    base_paths = variable_paths(model)
    with pytest.raises(ValueError, match="call inject_topology first"):
        surgery.forward_with_aux(model, random_ids(1, 4))
    surgery.inject_topology(model, SurgeryConfig(max_len=16), nnx.Rngs(0))
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert isinstance(attn, SurgicalAttention)
        for new, old in zip((attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj), before[i]):
            assert new is old
    # Every base parameter keeps its HF-mirroring path; the router adds its own.
    paths = variable_paths(model)
    assert base_paths <= paths
    assert ("model", "layers", "1", "self_attn", "router", "fc2", "bias") in paths
    with pytest.raises(ValueError, match="already carries an ultrametric topology"):
        surgery.inject_topology(model, SurgeryConfig(max_len=16), nnx.Rngs(0))
    with pytest.raises(TypeError, match="must be a SurgeryConfig"):
        surgery.inject_topology(tiny_model(), {"arity": 2}, nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        surgery.set_attention_impl(model, "flash")


def test_mode_switch():
    model = surgery.inject_topology(tiny_model(), SurgeryConfig(max_len=16), nnx.Rngs(0))
    layers = surgery.surgical_layers(model)
    assert all(a.deterministic for a in layers)          # evaluation after injection
    model.train()
    assert not any(a.deterministic for a in layers)
    model.eval()
    assert all(a.deterministic for a in layers)
    view = nnx.view(model, deterministic=False)
    assert not any(a.deterministic for a in surgery.surgical_layers(view))
    surgery.set_tau(model, 0.25)
    assert all(float(a.tau[...]) == 0.25 for a in layers)


# ---------------------------------------------------------------- collapse equivalence

@pytest.mark.parametrize("heads,kv,tie,window,sink,padded,dtype", [
    (4, 4, False, 0, 0, False, jnp.float32), (4, 2, True, 0, 0, True, jnp.float32),
    (6, 2, False, 3, 1, True, jnp.float32), (4, 1, True, 128, 1, False, jnp.bfloat16)])
def test_collapse_eval_is_bit_identical(heads, kv, tie, window, sink, padded, dtype):
    model = tiny_model(heads, kv, tie=tie, qk_gain=10.0, dtype=dtype)
    ids = random_ids(2, 11)
    mask = jnp.arange(11)[None] < jnp.array([[11], [7]]) if padded else None
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    jitted = nnx.jit(lambda m, i, p: m(i, positions=p, attention_mask=mask))
    jitted_default = nnx.jit(lambda m, i: m(i, attention_mask=mask))
    once = heads == 4 and kv == 4            # the slow checks: eager, default positions
    base = model(ids, attention_mask=mask) if once else None
    base_jit = jitted(model, ids, positions)
    base_jit_default = jitted_default(model, ids) if once else None
    surgery.inject_topology(model, SurgeryConfig(max_len=64, window=window, sink_tokens=sink),
                            nnx.Rngs(3))
    np.testing.assert_array_equal(np.asarray(jitted(model, ids, positions)), np.asarray(base_jit))
    if not once:
        return
    np.testing.assert_array_equal(np.asarray(model(ids, attention_mask=mask)), np.asarray(base))
    # With positions created inside jit, XLA folds the base model's causal mask into a
    # constant and compiles a differently fused softmax, which no data-dependent mask can
    # reproduce; the two programs then agree to rounding.
    got = np.asarray(jitted_default(model, ids))
    ref = np.asarray(base_jit_default)
    assert np.abs(got - ref).max() <= 4 * np.finfo(np.float32).eps * np.abs(ref).max()


def test_collapse_training_mode_over_100_seeds():
    model = tiny_model(4, 2, qk_gain=10.0)
    ids = random_ids(2, 16)
    base = np.asarray(model(ids))
    # No window and no sink: only the tree keeps pairs, so the tree mask itself is checked.
    surgery.inject_topology(model, SurgeryConfig(max_len=256, window=0, sink_tokens=0),
                            nnx.Rngs(0))
    model.train()
    step = nnx.jit(lambda m, i: surgery.forward_with_aux(m, i))
    for seed in range(100):
        nnx.reseed(model, gumbel=seed)
        logits, aux = step(model, ids)
        np.testing.assert_array_equal(np.asarray(aux["tree_density_per_layer"]), 1.0)
        np.testing.assert_array_equal(np.asarray(aux["density_per_layer"]), 1.0)
        assert np.abs(np.asarray(logits) - base).max() <= 1e-5


# ---------------------------------------------------------------- attention oracle

@nnx.jit
def run_layer(attn, x, positions, valid):
    """One surgical attention call: (output, the cluster ids it used)."""
    out, records = capture_aux(lambda a: a(x, positions, attention_mask=valid), attn, [attn])
    return out, records[0]["clusters"]


@pytest.mark.parametrize("mode,ste,heads,kv,window,sink", [
    ("train", "gate", 4, 2, 0, 0), ("train", "renorm", 4, 2, 2, 1), ("train", "gate", 4, 4, 0, 3),
    ("train", "renorm", 6, 3, 3, 0), ("eval", "gate", 4, 2, 2, 1), ("eval", "gate", 4, 4, 0, 0)])
def test_surgical_attention_matches_float64_oracle(mode, ste, heads, kv, window, sink):
    model = tiny_model(heads, kv, qk_gain=6.0)
    cfg = SurgeryConfig(arity=2, levels=3, d_max=1, window=window, sink_tokens=sink, ste=ste)
    surgery.inject_topology(model, cfg, nnx.Rngs(1))
    perturb_routers(model, seed=heads + window)
    model.train() if mode == "train" else model.eval()
    attn = model.model.layers[0].self_attn
    batch, seq = 2, 10
    x = np.random.default_rng(window).normal(size=(batch, seq, 32)).astype(np.float32)
    valid = np.arange(seq)[None] < np.array([[seq], [7]])
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    got, clusters = run_layer(attn, jnp.asarray(x), positions, jnp.asarray(valid))
    got = np.asarray(got)
    ref = np_surgical_attention(attn, x, valid, clusters, window, sink)
    # The mask must be non-trivial: some causal tree pairs kept, some dropped.
    c = np.asarray(clusters)
    same = (c[..., :, None] == c[..., None, :]) & np.tril(np.ones((seq, seq), bool), -1)
    assert same.any() and (~same & np.tril(np.ones((seq, seq), bool), -1)).any()
    rows = valid[..., None].repeat(got.shape[-1], -1)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got[rows], ref[rows], rtol=0, atol=2e-6 * scale)


# ---------------------------------------------------------------- gradient flow

@nnx.jit
def router_grads_of(model, ids):
    """Gradient of the LM loss w.r.t. the router parameters, and the routes it used."""
    def loss(m):
        logits, records = capture_aux(lambda model: model(ids), m, surgery.surgical_layers(m))
        return lm_loss(logits, ids), jnp.stack([r["clusters"] for r in records])
    return nnx.grad(loss, argnums=nnx.DiffState(0, RouterParam), has_aux=True)(model)


def router_grads(model, ids):
    return jax.tree.leaves(router_grads_of(model, ids)[0])


@pytest.mark.parametrize("ste", ["gate", "renorm"])
def test_router_gradients_finite_and_nonzero(ste):
    model = tiny_model(4, 2, qk_gain=6.0)
    surgery.inject_topology(model, SurgeryConfig(arity=2, levels=3, d_max=1, window=2,
                                                 ste=ste), nnx.Rngs(0))
    ids = random_ids(2, 12)
    model.train()
    leaves = router_grads(model, ids)        # at collapse: finite
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    perturb_routers(model, seed=2)
    leaves = router_grads(model, ids)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.sum(g * g)) for g in leaves) > 0


def test_gate_reaches_masked_pairs_and_renorm_does_not():
    # Window 1, no sink, d_max 0 with 2^12 leaves: every off-diagonal pair is a tree pair, and
    # with distinct routes every one of them is masked. The router then receives gradient only
    # through masked pairs: non-zero with "gate", exactly zero with "renorm". A small margin
    # bounds the Gumbel noise tightly, so the sampled routes stay as distinct as the argmax.
    ids = jnp.arange(8)[None] * 11 + 3        # distinct tokens
    grads = {}
    for ste in ("gate", "renorm"):
        model = tiny_model(4, 2, qk_gain=6.0)
        cfg = SurgeryConfig(arity=2, levels=12, d_max=0, window=1, sink_tokens=0, ste=ste,
                            init_margin=0.01)
        surgery.inject_topology(model, cfg, nnx.Rngs(0))
        perturb_routers(model, seed=5, scale=3.0)
        model.train()
        g, clusters = router_grads_of(model, ids)
        for c in np.asarray(clusters):
            assert (np.sort(c, -1)[..., 1:] != np.sort(c, -1)[..., :-1]).all(), "routes collide"
        grads[ste] = jax.tree.leaves(g)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads["gate"])
    assert sum(float(jnp.sum(g * g)) for g in grads["gate"]) > 0
    assert all((np.asarray(g) == 0).all() for g in grads["renorm"])


# ---------------------------------------------------------------- aux values

@pytest.mark.parametrize("arity", [2, 3])
def test_balance_loss_at_collapse_closed_form(arity):
    margin = 5.0
    model = surgery.inject_topology(tiny_model(), SurgeryConfig(arity=arity, max_len=32,
                                                                init_margin=margin), nnx.Rngs(0))
    _, aux = aux_of(model, random_ids(2, 9))
    p0 = np.exp(margin) / (np.exp(margin) + (arity - 1) * np.exp(-margin))
    np.testing.assert_allclose(np.asarray(aux["balance_loss_per_layer"]), arity * p0, rtol=1e-6)
    assert float(aux["density"]) == 1.0 and float(aux["tree_density"]) == 1.0


def test_balance_loss_ignores_right_padding():
    model = surgery.inject_topology(tiny_model(), SurgeryConfig(arity=2, levels=4, d_max=2),
                                    nnx.Rngs(0))
    perturb_routers(model, seed=8)
    ids = random_ids(1, 12)
    _, short = aux_of(model, ids[:, :7])
    _, padded = aux_of(model, ids, jnp.arange(12)[None] < 7)
    _, unpadded = aux_of(model, ids)
    np.testing.assert_allclose(padded["balance_loss"], short["balance_loss"], rtol=1e-6)
    np.testing.assert_allclose(padded["density"], short["density"], rtol=1e-6)
    assert abs(float(unpadded["balance_loss"]) - float(short["balance_loss"])) > 1e-4


def np_density(clusters, valid, window, sink):
    """(total, tree) fraction of causal pairs between real tokens, from cluster ids."""
    b, h, s = clusters.shape
    kept = tree = total = 0
    for bi in range(b):
        for hi in range(h):
            for i in range(s):
                for j in range(i + 1):
                    if not (valid[bi, i] and valid[bi, j]):
                        continue
                    same = clusters[bi, hi, i] == clusters[bi, hi, j]
                    total += 1
                    tree += same
                    kept += same or j < sink or i - j < window
    return kept / total, tree / total


def test_extract_routes_matches_oracle_and_restores_mode():
    cfg = SurgeryConfig(arity=2, levels=4, d_max=2, window=2, sink_tokens=1)
    model = surgery.inject_topology(tiny_model(), cfg, nnx.Rngs(0))
    ids = random_ids(2, 10)
    routes = surgery.extract_routes(model, ids)
    assert routes.cluster_ids.shape == (2, 2, 4, 10) and routes.cluster_ids.dtype == jnp.int32
    assert (np.asarray(routes.cluster_ids) == 0).all() and float(routes.density) == 1.0
    perturb_routers(model, seed=1)
    model.train()
    valid = np.arange(10)[None] < np.array([[10], [6]])
    routes = surgery.extract_routes(model, ids, jnp.asarray(valid))
    assert not any(a.deterministic for a in surgery.surgical_layers(model))
    again = surgery.extract_routes(model, ids, jnp.asarray(valid))    # noise-free routes
    np.testing.assert_array_equal(routes.cluster_ids, again.cluster_ids)
    for layer in range(2):
        total, tree = np_density(np.asarray(routes.cluster_ids[layer]), valid, 2, 1)
        np.testing.assert_allclose(routes.density_per_layer[layer], total, rtol=1e-6)
        np.testing.assert_allclose(routes.tree_density_per_layer[layer], tree, rtol=1e-6)
        assert tree < 1.0
    # Eval routes are argmax of the router logits, packed to the cut level.
    attn = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    digits = np.argmax(np.asarray(attn.router(hidden)), -1)[..., :cfg.cut_level]
    np.testing.assert_array_equal(routes.cluster_ids[0], digits[..., 0] * 2 + digits[..., 1])


# ---------------------------------------------------------------- decoding and training state

def test_kv_cache_decoding_equals_full_recomputation():
    cfg = SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1)
    model = surgery.inject_topology(tiny_model(qk_gain=6.0), cfg, nnx.Rngs(0))
    perturb_routers(model, seed=3)
    ids = random_ids(2, 12)
    full = np.asarray(nnx.jit(lambda m, i: m(i))(model, ids))
    cache = model.init_cache(2, 16)
    decode = nnx.jit(lambda m, i, c: m(i, cache=c))
    logits, cache = decode(model, ids[:, :5], cache)
    steps = [np.asarray(logits)]
    for t in range(5, 12):
        logits, cache = decode(model, ids[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0,
                               atol=1e-5 * np.abs(full).max())
    # The cached key cluster ids are the routes: not collapsed, so the tree mask was exercised.
    for layer_cache in cache:
        c = np.asarray(layer_cache["clusters"][:, :, :12])
        assert (c != c[..., :1]).any()
    model.train()
    with pytest.raises(NotImplementedError, match="only supported in evaluation mode"):
        model(ids[:, :2], cache=model.init_cache(2, 4))


def snapshot(state):
    """Every array of an nnx state as numpy (PRNG keys as their key data)."""
    out = []
    for x in jax.tree.leaves(state):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.array(x))
    return out


def assert_bitwise_equal(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_only_router_params_are_trainable():
    model = surgery.inject_topology(tiny_model(), SurgeryConfig(max_len=16, window=1),
                                    nnx.Rngs(0))
    perturb_routers(model, seed=0)
    model.train()
    ids = random_ids(2, 8)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=surgery.trainable_filter())
    base = snapshot(nnx.state(model, nnx.All(nnx.Param, nnx.Not(RouterParam))))
    assert len(base) == 2 * 9 + 3        # 2 layers x (4 attention, 3 mlp, 2 norms) + 3

    def loss(m):
        logits, aux = surgery.forward_with_aux(m, ids)
        return lm_loss(logits, ids) + aux["balance_loss"]
    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, RouterParam)))(model)
    # The training forward advances the Gumbel counters; the optimiser step itself changes
    # nothing but router parameters, bit for bit.
    others = snapshot(nnx.state(model, nnx.Not(RouterParam)))
    routers = snapshot(surgery.router_state(model))
    optimizer.update(model, grads)
    assert_bitwise_equal(others, snapshot(nnx.state(model, nnx.Not(RouterParam))))
    assert_bitwise_equal(base, snapshot(nnx.state(model, nnx.All(nnx.Param,
                                                                  nnx.Not(RouterParam)))))
    new_routers = snapshot(surgery.router_state(model))
    assert all(not np.array_equal(a, b) for a, b in zip(routers, new_routers))


def test_gumbel_stream_advances_under_jit():
    model = surgery.inject_topology(tiny_model(), SurgeryConfig(arity=2, levels=3, d_max=0),
                                    nnx.Rngs(params=0, gumbel=11))
    perturb_routers(model, seed=4, scale=0.05)   # near the decision boundaries
    model.train()
    ids = random_ids(1, 10)
    step = nnx.jit(lambda m, i: surgery.forward_with_aux(m, i)[1]["tree_density_per_layer"])
    draws = {tuple(np.asarray(step(model, ids)).round(6)) for _ in range(6)}
    assert len(draws) > 1


# ---------------------------------------------------------------- the real model

@pytest.mark.slow
def test_collapse_on_smollm2(smollm2_jax, smollm2_tokenizer, shakespeare_text):
    """SmolLM2-135M (30 layers, 9 heads over 3 kv heads): after injection the evaluation logits
    are the base model's bit for bit; in training mode the Gumbel routes of a few seeds keep
    every pair and the logits match to float32 rounding."""
    ids = jnp.asarray(smollm2_tokenizer.encode(shakespeare_text[5000:8000]).ids[:64])[None]
    assert ids.shape == (1, 64)
    base = np.asarray(smollm2_jax(ids))
    model = nnx.clone(smollm2_jax)            # the shared fixture model stays untouched
    surgery.inject_topology(model, SurgeryConfig(max_len=2048, window=0, sink_tokens=0),
                            nnx.Rngs(0))
    assert not isinstance(smollm2_jax.model.layers[0].self_attn, SurgicalAttention)
    np.testing.assert_array_equal(np.asarray(model(ids)), base)
    model.train()
    # compiled once for the seeds (eager, each training-mode forward of 30 layers took ~10 s)
    step = nnx.jit(lambda m, i: surgery.forward_with_aux(m, i))
    for seed in range(3):
        nnx.reseed(model, gumbel=seed)
        logits, aux = step(model, ids)
        np.testing.assert_array_equal(np.asarray(aux["tree_density_per_layer"]), 1.0)
        assert np.abs(np.asarray(logits) - base).max() <= 1e-5 * np.abs(base).max()


@pytest.mark.parametrize("options", [
    {}, {"backend": "gpu", "interpret": True},
    {"backend": "gpu", "interpret": True, "layout": "sorted", "block_q": 16, "block_k": 16},
    {"backend": "tpu", "interpret": True, "layout": "natural", "block_q": 16, "block_k": 16}])
def test_kernel_backend_matches_dense_evaluation(options, highest_precision):
    """The routed kernels (auto, sorted and natural layouts) give the dense path's logits."""
    cfg = SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1)
    model = surgery.inject_topology(tiny_model(4, 2, qk_gain=6.0), cfg, nnx.Rngs(0))
    perturb_routers(model, seed=6)
    ids = random_ids(2, 24)
    forward = nnx.jit(lambda m, i, mask: m(i, attention_mask=mask))
    dense = np.asarray(forward(model, ids, None))
    padded = np.asarray(forward(model, ids, jnp.arange(24)[None] < 20))
    surgery.set_attention_impl(model, "kernel", **options)
    got = np.asarray(forward(model, ids, None))
    np.testing.assert_allclose(got, dense, rtol=0, atol=1e-5 * np.abs(dense).max())
    # Padded calls fall back to the dense path.
    np.testing.assert_array_equal(np.asarray(forward(model, ids, jnp.arange(24)[None] < 20)),
                                  padded)


def test_generate_with_left_padding_matches_full_recomputation():
    from ultrametric_jax.run.generate import generate
    cfg = SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1)
    model = surgery.inject_topology(tiny_model(qk_gain=6.0), cfg, nnx.Rngs(0))
    perturb_routers(model, seed=3)
    prompts = [[5, 17, 33, 2, 71, 8, 40], [9, 60, 12]]          # the second is left-padded
    tokens, logits = generate(model, prompts, 5, return_logits=True)
    forward = jit_forward(model)                 # eager dispatch is slow on CPU
    for row, prompt in enumerate(prompts):
        full = forward([prompt + list(tokens[row, :-1])])[0, len(prompt) - 1:]
        np.testing.assert_allclose(logits[row], full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_kernel_mode_with_explicit_positions_equals_dense(highest_precision):
    """The kernel takes token i to sit at position i; explicit positions (here 10..33, which
    put no key among the sink tokens) must give the dense path's answer."""
    cfg = SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1)
    model = surgery.inject_topology(tiny_model(4, 2, qk_gain=6.0), cfg, nnx.Rngs(0))
    perturb_routers(model, seed=6)
    ids = random_ids(2, 24)
    positions = jnp.broadcast_to(jnp.arange(24) + 10, (2, 24))
    forward = nnx.jit(lambda m, i, p: m(i, positions=p))
    dense = np.asarray(forward(model, ids, positions))
    surgery.set_attention_impl(model, "kernel", backend="gpu", interpret=True)
    np.testing.assert_array_equal(np.asarray(forward(model, ids, positions)), dense)


def test_kernel_mode_aux_densities_from_cluster_ids(highest_precision):
    """On the kernel path the densities are counted from the cluster ids, not from a mask."""
    cfg = SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1)
    model = surgery.inject_topology(tiny_model(4, 2, qk_gain=6.0), cfg, nnx.Rngs(0))
    perturb_routers(model, seed=6)
    ids = random_ids(2, 24)
    surgery.set_attention_impl(model, "kernel")
    _, aux = aux_of(model, ids)
    for layer in range(2):
        total, tree = np_density(np.asarray(aux["clusters"][layer]), np.ones((2, 24), bool), 2, 1)
        np.testing.assert_allclose(aux["density_per_layer"][layer], total, rtol=1e-6)
        np.testing.assert_allclose(aux["tree_density_per_layer"][layer], tree, rtol=1e-6)
        assert tree < total < 1.0


def test_evaluate_surgical_matches_oracle_and_restores_the_mode():
    from scipy.special import log_softmax

    from ultrametric_jax.run.evaluate import evaluate_surgical
    cfg = SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1)
    model = surgery.inject_topology(tiny_model(qk_gain=6.0), cfg, nnx.Rngs(0))
    perturb_routers(model, seed=3)
    ids = np.asarray(random_ids(2, 10))
    mask = np.arange(10)[None] < np.array([[10], [6]])             # right padding
    model.train()
    result = evaluate_surgical(model, [{"input_ids": ids, "attention_mask": mask}], cfg)
    assert not any(a.deterministic for a in surgery.surgical_layers(model))
    model.eval()
    logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), np.float64)
    logp = log_softmax(logits, axis=-1)
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    weights = mask[:, 1:]
    np.testing.assert_allclose(result["loss"], (nll * weights).sum() / weights.sum(), rtol=1e-6)
    assert result["tokens"] == weights.sum()
    routes = surgery.extract_routes(model, jnp.asarray(ids), jnp.asarray(mask))
    totals = [np_density(np.asarray(routes.cluster_ids[layer]), mask, 2, 1)[0]
              for layer in range(2)]
    np.testing.assert_allclose(result["density_per_layer"], totals, rtol=1e-6)

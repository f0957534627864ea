"""The distillation signals of a surgical model in training mode: the attention recall and the
soft density each layer reports, the base-model teacher, and training memory that does not
grow with the tree depth. Oracles: float64 numpy recomputations from the layer's own q, k and
routes, and the model before injection."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultrametric_jax.model import llama
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.model.llama import LlamaForCausalLM
from ultrametric_jax.surgery import inject as surgery
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.router import RouterParam

pytestmark = pytest.mark.usefixtures("highest_precision")


def tiny_model(layers=2, seed=0):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))
    for layer in model.model.layers:  # sharper attention than the 0.02 init gives
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.kernel[...] = proj.kernel[...] * 6.0
    return model


def perturb_routers(model, seed):
    rng = np.random.default_rng(seed)
    for attn in surgery.surgical_layers(model):
        fc2 = attn.router.fc2
        fc2.kernel[...] = jnp.asarray(rng.normal(size=fc2.kernel.shape), jnp.float32)
        fc2.bias[...] = jnp.zeros(fc2.bias.shape, jnp.float32)


def np_layer_signals(attn, x, valid, clusters, window, sink):
    """(recall loss, hard density) of one layer in float64 from its q, k and hard routes."""
    batch, seq = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    q, k, _ = (np.asarray(a, np.float64) for a in llama.project_qkv(
        attn.config, attn.q_proj, attn.k_proj, attn.v_proj, jnp.asarray(x), positions))
    heads, groups, dim = q.shape[2], k.shape[2], q.shape[3]
    c = np.asarray(clusters)
    losses, kept, pairs = [], 0, 0
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            for i in range(seq):
                if not valid[b, i]:
                    continue
                keys = [j for j in range(i + 1) if valid[b, j]]
                s = np.array([q[b, i, h] @ k[b, j, g] for j in keys]) / np.sqrt(dim)
                p = np.exp(s - s.max())
                p /= p.sum()
                allowed = np.array([c[b, h, i] == c[b, h, j] or j < sink or i - j < window
                                    for j in keys])
                losses.append(-np.log(max(p[allowed].sum(), 1e-6)))
                kept += allowed.sum()
                pairs += len(keys)
    return float(np.mean(losses)), kept / pairs


@nnx.jit
def training_aux(model, ids, mask):
    return surgery.forward_with_aux(model, ids, mask, extras=("recall",))[1]


def test_training_reports_recall_and_soft_density_against_float64_oracle():
    window, sink = 2, 1
    model = tiny_model()
    surgery.inject_topology(model, SurgeryConfig(arity=2, levels=3, d_max=1, window=window,
                                                 sink_tokens=sink), nnx.Rngs(1))
    perturb_routers(model, seed=3)
    model.train()
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, 96)
    valid = np.arange(10)[None] < np.array([[10], [7]])
    aux = training_aux(model, ids, jnp.asarray(valid))
    x = model.model.embed_tokens(ids)
    attn = model.model.layers[0]
    want_recall, want_density = np_layer_signals(
        attn.self_attn, np.asarray(attn.input_layernorm(x)), valid, aux["clusters"][0], window,
        sink)
    assert 0.05 < want_recall < 5 and want_density < 0.95     # a non-trivial topology
    np.testing.assert_allclose(float(aux["recall_per_layer"][0]), want_recall, rtol=1e-5)
    # The soft density's forward value is the hard density, and the pair counter agrees.
    np.testing.assert_allclose(float(aux["soft_density_per_layer"][0]), want_density,
                               rtol=1e-6)
    np.testing.assert_allclose(float(aux["density_per_layer"][0]), want_density, rtol=1e-6)


def test_recall_and_budget_gradients_reach_the_router_not_the_attention():
    """The teacher probabilities are constants: layer 0's recall and density move its router
    and never its q/k/v/o projections (the base model is frozen; only routers train)."""
    model = tiny_model()
    surgery.inject_topology(model, SurgeryConfig(arity=2, levels=3, d_max=1, window=1,
                                                 sink_tokens=0), nnx.Rngs(1))
    perturb_routers(model, seed=5)
    model.train()
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, 96)

    @nnx.jit
    def grads(model):
        def loss(m):
            _, aux = surgery.forward_with_aux(m, ids, extras=("recall",))
            return aux["recall_per_layer"][0] + aux["soft_density_per_layer"][0]
        return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)

    g = grads(model).model.layers[0].self_attn
    router = jax.tree.leaves(nnx.state(g.router))
    assert sum(float(jnp.abs(a).sum()) for a in router) > 0
    for proj in (g.q_proj, g.k_proj, g.v_proj, g.o_proj):
        assert float(jnp.abs(proj.kernel[...]).max()) == 0.0


def test_base_model_mode_is_the_base_model_bit_for_bit():
    model = tiny_model()
    ids = jax.random.randint(jax.random.key(4), (2, 9), 0, 96)
    mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [6]]))
    before = np.asarray(nnx.jit(lambda m: m(ids, attention_mask=mask))(model))
    surgery.inject_topology(model, SurgeryConfig(arity=2, levels=3, d_max=1, window=1,
                                                 sink_tokens=0), nnx.Rngs(1))
    perturb_routers(model, seed=7)
    model.train()

    @nnx.jit
    def teacher(model):
        with surgery.base_model_mode(model):
            return model(ids, attention_mask=mask)

    np.testing.assert_array_equal(np.asarray(teacher(model)), before)
    # Outside the context the surgical topology is back.
    assert not any(a.as_base for a in surgery.surgical_layers(model))


def _training_memory(levels, seq=128):
    model = tiny_model(layers=1)
    surgery.inject_topology(model, SurgeryConfig(arity=2, levels=levels, d_max=1, window=4,
                                                 sink_tokens=1), nnx.Rngs(1))
    perturb_routers(model, seed=levels)
    model.train()
    graphdef, params, rest = nnx.split(model, RouterParam, ...)
    ids = jnp.zeros((1, seq), jnp.int32) + 3

    def loss(params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        logits, aux = surgery.forward_with_aux(m, ids, extras=("recall",))
        return jnp.mean(logits) + aux["recall"] + aux["soft_density"]

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_tree_depth():
    seq = 128
    square = 4 * seq * seq * 4          # one [B=1, H=4, S, S] float32 array
    small, deep = _training_memory(3, seq), _training_memory(12, seq)
    # Nine more levels would keep about 2 x 9 more S x S arrays per head with the level-by-level
    # products; the recomputing mask keeps their number fixed.
    assert deep - small < 2 * square, (small / square, deep / square)


def test_attention_backends_are_named_and_the_dense_one_takes_no_options():
    from ultrametric_jax.surgery.attention import KernelAttention, attention_fn
    assert attention_fn("dense") is None
    kernel = attention_fn("kernel", layout="sorted", interpret=True)
    assert kernel == KernelAttention((("interpret", True), ("layout", "sorted")), None)
    with pytest.raises(ValueError, match="the dense attention takes no kernel options, got "
                                         r"\['layout'\]"):
        attention_fn("dense", layout="sorted")
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        attention_fn("flash")

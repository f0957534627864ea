"""The route cache of a surgical model: cached decoding equals full recomputation, chunked
prefill equals one shot, a decode step reads only the attended keys and builds no S x S array."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rel_err
from pallas_kernels.decode import decode_read_plan
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.model.llama import LlamaForCausalLM
from ultrametric_jax.run.generate import cache_kind, generate, prefill_chunks
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.inject import (base_model_mode, extract_routes, inject_topology,
                                            surgical_layers)
from ultrametric_jax.surgery.route_cache import (LayerRouteCache, init_route_caches, read_pages,
                                                 with_read_pages)

pytestmark = pytest.mark.usefixtures("highest_precision")

SURGERY = SurgeryConfig(arity=2, levels=4, d_max=1, window=4, sink_tokens=1)   # 8 clusters


def surgical_model(seed=0, context=128, surgery=SURGERY):
    """A tiny random Llama with weights large enough for decisive greedy choices, and random
    (non-collapsed) routers that scatter tokens over the clusters."""
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=context)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        scale = 1.0 if value.ndim == 1 else value.shape[0] ** -0.5
        var.set_value(jnp.asarray(rng.normal(size=value.shape) * scale, value.dtype)
                      + (1.0 if value.ndim == 1 else 0.0))       # norm weights around 1
    inject_topology(model, surgery, nnx.Rngs(seed + 1))
    for attn in surgical_layers(model):
        for lin in (attn.router.fc1, attn.router.fc2):
            lin.kernel[...] = jnp.asarray(rng.normal(size=lin.kernel.shape) * 2.0, jnp.float32)
            lin.bias[...] = jnp.zeros(lin.bias.shape, jnp.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def model():
    with jax.default_matmul_precision("highest"):
        yield surgical_model()


def full_forward(model):
    """Logits of the whole sequence without a cache (the masked dense path), jitted."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: np.asarray(fn(state, jnp.asarray(ids)))


def cached_call(model):
    """A jitted `model(ids, cache=caches)` (eager dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids, caches: nnx.merge(graphdef, state)(ids, cache=caches))
    return lambda ids, caches: fn(state, jnp.asarray(ids), caches)


def naive_greedy(forward, prompt, steps):
    """Greedy decoding recomputing the whole sequence each step (right padding is causal)."""
    seq, chosen = list(prompt), []
    width = len(prompt) + steps
    for _ in range(steps):
        logits = forward(np.asarray([seq + [0] * (width - len(seq))]))[0, len(seq) - 1]
        chosen.append(logits)
        seq.append(int(np.argmax(logits)))
    return np.asarray(seq[len(prompt):]), np.stack(chosen)


def prompt_of(length, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(1, 96, length)]


def test_routes_are_scattered(model):
    """The fixture's routes use several clusters per head (no collapse), none with most keys."""
    ids = extract_routes(model, jnp.asarray([prompt_of(48, 5)])).cluster_ids
    ids = np.asarray(ids)                                         # [layers, B, H, S]
    for layer, b, h in np.ndindex(*ids.shape[:3]):
        sizes = np.bincount(ids[layer, b, h], minlength=8)
        assert (sizes > 0).sum() >= 4 and sizes.max() <= 0.6 * ids.shape[-1]


@pytest.mark.parametrize("length, chunk", [(37, 8), (9, 256), (64, 16)])
def test_cached_greedy_equals_full_recomputation(model, length, chunk):
    """Prompt longer than the window, several clusters: each token and its logits equal those
    of recomputing the whole sequence without a cache, and those of the dense cache."""
    prompt = prompt_of(length, length)
    steps = 12
    assert cache_kind(model, 128) == "route"
    tokens, logits = generate(model, [prompt], steps, return_logits=True, prefill_chunk=chunk)
    ref_tokens, ref_logits = naive_greedy(full_forward(model), prompt, steps)
    np.testing.assert_array_equal(tokens[0], ref_tokens)
    assert rel_err(logits[0], ref_logits) <= 1e-5
    assert len(set(ref_tokens.tolist())) > 3                      # a non-degenerate sequence
    dense_tokens, dense_logits = generate(model, [prompt], steps, return_logits=True,
                                          cache="dense")
    np.testing.assert_array_equal(dense_tokens[0], ref_tokens)
    assert rel_err(dense_logits[0], ref_logits) <= 1e-5


def test_prompts_of_different_lengths_decode_as_alone(model):
    """No padding in a route cache: each prompt length is its own batch, each row exact."""
    prompts = [prompt_of(30, 1), prompt_of(7, 2), prompt_of(30, 3), prompt_of(19, 4)]
    tokens, logits = generate(model, prompts, 6, return_logits=True, prefill_chunk=8)
    forward = full_forward(model)
    for row, prompt in enumerate(prompts):
        ref_tokens, ref_logits = naive_greedy(forward, prompt, 6)
        np.testing.assert_array_equal(tokens[row], ref_tokens)
        assert rel_err(logits[row], ref_logits) <= 1e-5


def test_sampling_matches_the_dense_cache(model):
    """The same seed samples the same tokens through either cache (same keys, same logits)."""
    prompt = prompt_of(21, 9)
    route = generate(model, [prompt], 10, temperature=1.0, seed=4)
    dense = generate(model, [prompt], 10, temperature=1.0, seed=4, cache="dense")
    np.testing.assert_array_equal(route, dense)


def position_lists(route):
    """{(b, h, cluster): the positions its pages list, in order} of a RouteCache."""
    pages, table, counts = (np.asarray(x) for x in (route.pages, route.table, route.counts))
    page = pages.shape[-1]
    return {(b, h, c): pages[b, h, table[b, h, c, :-(-counts[b, h, c] // page)]]
            .reshape(-1)[:counts[b, h, c]].tolist()
            for b, h, c in np.ndindex(*counts.shape)}


@pytest.mark.parametrize("sizes", [(5, 1, 13, 8, 2), (1,) * 6 + (23,)])
def test_chunked_prefill_equals_one_shot(model, sizes):
    """Any chunking leaves the same keys and values (to rounding), cluster ids and cluster
    position lists, the
    prompt's logits equal the cache-free forward, and the next decode step agrees."""
    ids = jnp.asarray([prompt_of(29, 7), prompt_of(29, 8)])
    want = full_forward(model)(ids)
    call = cached_call(model)
    one_logits, one = call(ids, init_route_caches(model, 2, 64, page_size=4))
    caches, start, chunks = init_route_caches(model, 2, 64, page_size=4), 0, []
    for size in sizes:
        caches = with_read_pages(caches, read_pages(caches, size))
        out, caches = call(ids[:, start:start + size], caches)
        chunks.append(np.asarray(out))
        start += size
    chunked_logits = np.concatenate(chunks, axis=1)
    assert rel_err(one_logits, want) <= 1e-5
    assert rel_err(chunked_logits, want) <= 1e-5
    for a, b in zip(one, caches):
        assert int(a.length) == int(b.length) == 29
        for name in ("k", "v"):         # later layers' keys: other matmul shapes round apart
            assert rel_err(getattr(b.route, name), np.asarray(getattr(a.route, name))) <= 1e-5
        for name in ("ids", "counts"):
            np.testing.assert_array_equal(np.asarray(getattr(a.route, name)),
                                          np.asarray(getattr(b.route, name)))
        assert position_lists(a.route) == position_lists(b.route)
    token = jnp.asarray([[11], [12]])
    full = full_forward(model)(jnp.concatenate([ids, token], axis=1))[:, -1]
    for caches in (one, caches):
        step, _ = call(token, with_read_pages(caches, read_pages(caches)))
        assert rel_err(step[:, 0], full) <= 1e-5


def allowed_set(clusters, i, window, sink):
    """numpy oracle: bool [..., i + 1], the keys query i may attend."""
    j = np.arange(i + 1)
    return (clusters[..., :i + 1] == clusters[..., i:i + 1]) | (j < sink) | (i - j < window)


def test_decode_steps_read_only_the_attended_keys(model):
    """Every decode step's read plan (what decode_attention gathers) holds exactly the keys
    the hard mask allows, by the routes of the cache-free forward; padding slots point at
    allowed keys too; and the plan is much shorter than the history."""
    prompt, steps, page = prompt_of(40, 11), 16, 4
    seq = prompt + prompt_of(steps, 12)                        # teacher-forced continuation
    clusters = np.asarray(extract_routes(model, jnp.asarray([seq])).cluster_ids)
    call = cached_call(model)
    _, caches = call([prompt], init_route_caches(model, 1, 64, page_size=page))
    for i in range(len(prompt), len(seq)):
        pages = read_pages(caches)
        _, caches = call([[seq[i]]], with_read_pages(caches, pages))
        for layer, cache in enumerate(caches):
            positions, valid = (np.asarray(x) for x in decode_read_plan(
                cache.route, window=SURGERY.window, sink_tokens=SURGERY.sink_tokens,
                max_pages=pages))
            allowed = allowed_set(clusters[layer], i, SURGERY.window, SURGERY.sink_tokens)
            for b, h in np.ndindex(*positions.shape[:2]):
                assert allowed[b, h, positions[b, h]].all(), f"step {i} reads outside its set"
                read = positions[b, h][valid[b, h]]
                assert len(read) == len(set(read.tolist()))
                np.testing.assert_array_equal(np.sort(read), np.flatnonzero(allowed[b, h]))
        # pages cover the largest cluster (a power of two of pages): fewer than the history
        assert positions.shape[-1] == pages * page + SURGERY.sink_tokens + SURGERY.window
    assert positions.shape[-1] < len(seq)


def intermediates(jaxpr):
    """Shapes of every value an (inner) equation of the jaxpr produces."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from intermediates(inner)


def largest_square(jaxpr, s_max):
    """Shapes with two dims >= s_max (an S x S array or more)."""
    return [s for s in intermediates(jaxpr.jaxpr) if sum(d >= s_max for d in s) >= 2]


def test_a_decode_step_builds_no_s_by_s_array():
    s_max = 256
    model = surgical_model(context=s_max)
    graphdef, state = nnx.split(model)
    caches = init_route_caches(model, 1, s_max, page_size=16)
    _, caches = cached_call(model)([prompt_of(200, 3)], caches)
    caches = with_read_pages(caches, read_pages(caches))
    step = jax.make_jaxpr(lambda state, token, caches: nnx.merge(graphdef, state)(
        token, cache=caches))(state, jnp.asarray([[5]]), caches)
    assert largest_square(step, s_max) == []
    largest = max(int(np.prod(s)) for s in intermediates(step.jaxpr))
    assert largest < s_max ** 2 // 8
    # The checker sees the S x S scores of the cache-free forward over s_max tokens.
    full = jax.make_jaxpr(lambda state, ids: nnx.merge(graphdef, state)(ids))(
        state, jnp.zeros((1, s_max), jnp.int32))
    assert (1, 4, s_max, s_max) in largest_square(full, s_max)


def test_prefill_chunks_cover_any_length():
    assert prefill_chunks(37, 8) == [8, 8, 8, 8, 4, 1]
    assert prefill_chunks(5, 256) == [4, 1]
    assert prefill_chunks(512, 256) == [256, 256]
    for length in range(1, 70):
        sizes = prefill_chunks(length, 16)
        assert sum(sizes) == length and set(sizes) <= {16, 8, 4, 2, 1}


def test_what_the_route_cache_refuses(model):
    caches = init_route_caches(model, 1, 16)
    ids = jnp.asarray([[1, 2, 3]])
    with pytest.raises(ValueError, match="a route cache holds real tokens only: no "
                                         "attention_mask"):
        model(ids, attention_mask=jnp.ones((1, 3), bool), cache=caches)
    with pytest.raises(ValueError, match="a route cache places token i at position i"):
        model(ids, positions=jnp.asarray([[0, 1, 2]]), cache=caches)
    with base_model_mode(model):
        with pytest.raises(ValueError, match="a route cache serves the surgical topology"):
            model(ids, cache=caches)
        with pytest.raises(ValueError, match=r"no route cache: the surgical layers run as the "
                                             r"base model"):
            init_route_caches(model, 1, 16)
        # generate() falls back to the dense cache for the base attention
        assert cache_kind(model, 64) == "dense"
    with pytest.raises(ConfigError, match=r"unknown cache 'paged'; expected one of "
                                          r"\('auto', 'route', 'dense'\)"):
        generate(model, [[1, 2]], 2, cache="paged")
    with pytest.raises(ConfigError, match="prefill_chunk must be a whole number >= 1, got 0"):
        generate(model, [[1, 2]], 2, prefill_chunk=0)
    many = surgical_model(surgery=SurgeryConfig(arity=2, levels=7, d_max=0, window=4))
    with pytest.raises(ConfigError, match=r"cache='route' cannot serve this model: the topology "
                                          r"has 128 clusters .*, more than the 32 tokens"):
        generate(many, [[1, 2]], 2, cache="route")
    assert isinstance(caches[0], LayerRouteCache) and cache_kind(many, 64) == "dense"


def test_base_model_uses_the_dense_cache():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    assert cache_kind(base, 64) == "dense"
    with pytest.raises(ConfigError, match="cache='route' cannot serve this model: the model "
                                          "carries no ultrametric topology"):
        generate(base, [[1, 2]], 2, cache="route")


def test_a_model_that_is_not_a_llama_uses_the_dense_cache():
    """A module wrapping a Llama (no model.layers of its own) decodes with the dense cache, and
    asking it for a route cache names why not."""
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)

    class Wrapped(nnx.Module):
        def __init__(self):
            self.inner = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))

    assert cache_kind(Wrapped(), 64) == "dense"
    with pytest.raises(ConfigError, match="cache='route' cannot serve this model: the model is "
                                          r"not a Llama with decoder layers"):
        cache_kind(Wrapped(), 64, "route")

"""DynamicTopologyRouter against a float64 numpy oracle; collapse initialisation; metadata."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from ultrametric_jax.surgery.router import (DynamicTopologyRouter, RouterLinear, RouterParam,
                                           bf16_pieces, collapse_bias, router_matmul)


def np_router(x, w1, b1, w2, b2, heads, levels, arity):
    """float64: gelu_exact(x W1 + b1) W2 + b2 -> [B, H, S, L, p]."""
    h = x @ w1 + b1
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    out = h @ w2 + b2
    b, s = x.shape[:2]
    return out.reshape(b, s, heads, levels, arity).transpose(0, 2, 1, 3, 4)


def randomise(router, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    for lin in (router.fc1, router.fc2):
        lin.kernel[...] = jnp.asarray(rng.normal(size=lin.kernel.shape) * scale, jnp.float32)
        lin.bias[...] = jnp.asarray(rng.normal(size=lin.bias.shape) * scale, jnp.float32)


def as64(v):
    return np.asarray(v[...], np.float64)


@pytest.mark.parametrize("heads,levels,arity", [(3, 4, 2), (2, 3, 5)])
def test_router_matches_float64_oracle(heads, levels, arity):
    d = 16
    router = DynamicTopologyRouter(d, heads, levels, arity, 5.0, rngs=nnx.Rngs(0))
    randomise(router, seed=heads)
    x = np.random.default_rng(1).normal(size=(2, 7, d)).astype(np.float32)
    got = router(jnp.asarray(x))
    assert got.shape == (2, heads, 7, levels, arity) and got.dtype == jnp.float32
    ref = np_router(x.astype(np.float64), as64(router.fc1.kernel), as64(router.fc1.bias),
                    as64(router.fc2.kernel), as64(router.fc2.bias), heads, levels, arity)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_router_math_is_float32_for_bfloat16_input():
    d = 16
    router = DynamicTopologyRouter(d, 2, 3, 2, 5.0, rngs=nnx.Rngs(0))
    randomise(router, seed=3)
    x = jax.random.normal(jax.random.key(0), (1, 5, d), jnp.bfloat16)
    got = router(x)
    assert got.dtype == jnp.float32
    # Oracle on the same (bf16-representable) input in float64: float32 accuracy, not bf16's.
    ref = np_router(np.asarray(x, np.float64), as64(router.fc1.kernel), as64(router.fc1.bias),
                    as64(router.fc2.kernel), as64(router.fc2.bias), 2, 3, 2)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    for lin in (router.fc1, router.fc2):
        assert lin.kernel.dtype == jnp.float32 and lin.bias.dtype == jnp.float32


def test_collapse_initialisation_is_deterministic():
    d, heads, levels, arity, margin = 12, 3, 4, 3, 5.0
    a = DynamicTopologyRouter(d, heads, levels, arity, margin, rngs=nnx.Rngs(0))
    b = DynamicTopologyRouter(d, heads, levels, arity, margin, rngs=nnx.Rngs(7))
    for r in (a, b):
        assert (np.asarray(r.fc2.kernel[...]) == 0).all()
        expected = np.tile([margin] + [-margin] * (arity - 1), heads * levels)
        np.testing.assert_array_equal(np.asarray(r.fc2.bias[...]), expected)
    x = jax.random.normal(jax.random.key(3), (2, 9, d)) * 10
    for r in (a, b):
        logits = np.asarray(r(x))
        # Every token, head and level: exactly +margin on child 0, -margin elsewhere.
        np.testing.assert_array_equal(logits[..., 0], margin)
        np.testing.assert_array_equal(logits[..., 1:], -margin)


def test_output_layout_is_head_then_level_then_child():
    d, heads, levels, arity = 4, 2, 3, 2
    r = DynamicTopologyRouter(d, heads, levels, arity, 1.0, rngs=nnx.Rngs(0))
    r.fc2.bias[...] = jnp.arange(heads * levels * arity, dtype=jnp.float32)
    logits = np.asarray(r(jnp.zeros((1, 2, d))))
    for h in range(heads):
        for l in range(levels):
            for c in range(arity):
                assert logits[0, h, 1, l, c] == h * levels * arity + l * arity + c


def test_params_are_router_params_with_logical_axes():
    r = DynamicTopologyRouter(8, 2, 3, 2, 5.0, rngs=nnx.Rngs(0))
    state = nnx.state(r, RouterParam)
    assert len(jax.tree.leaves(state)) == 4
    assert issubclass(RouterParam, nnx.Param)
    assert r.fc1.kernel.get_metadata()["out_sharding"] == ("embed", "router_hidden")
    assert r.fc1.bias.get_metadata()["out_sharding"] == ("router_hidden",)
    assert r.fc2.kernel.get_metadata()["out_sharding"] == ("router_hidden", "router_out")
    assert r.fc2.bias.get_metadata()["out_sharding"] == ("router_out",)
    assert r.fc1.kernel.shape == (8, 8) and r.fc2.kernel.shape == (8, 2 * 3 * 2)


def test_router_errors():
    with pytest.raises(ValueError, match="init_margin=0"):
        DynamicTopologyRouter(8, 2, 3, 2, 0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="arity=1"):
        DynamicTopologyRouter(8, 2, 3, 1, 5.0, rngs=nnx.Rngs(0))
    r = DynamicTopologyRouter(8, 2, 3, 2, 5.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="router input has width 6, expected 8"):
        r(jnp.zeros((1, 2, 6)))


def test_collapse_bias_values():
    np.testing.assert_array_equal(collapse_bias(1, 2, 3, 2.5), [2.5, -2.5, -2.5] * 2)


def test_router_shape_errors():
    with pytest.raises(ValueError, match="invalid router shape: hidden_size=8, num_heads=0"):
        DynamicTopologyRouter(8, 0, 3, 2, 5.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="levels=0"):
        DynamicTopologyRouter(8, 2, 0, 2, 5.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"router kernel \(4, 3\) / bias \(3,\) do not match "
                                         r"\(4, 5\)"):
        RouterLinear(4, 5, jnp.zeros((4, 3)), jnp.zeros((3,)), ("embed", "router_hidden"))
    with pytest.raises(ValueError, match=r"bias \(4,\) do not match \(4, 5\)"):
        RouterLinear(4, 5, jnp.zeros((4, 5)), jnp.zeros((4,)), ("embed", "router_hidden"))


# ----------------------------------------------------------------------------- router_matmul

@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_split_matmul_is_a_float32_matmul(x_dtype):
    # Against float64: the split form keeps float32's accuracy (TF32 would be ~1e-3 off, one
    # bfloat16 pass ~1e-2), for float32 inputs (three pieces) and bfloat16 ones (one piece).
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 70, 96)), x_dtype)
    w = jnp.asarray(rng.normal(size=(96, 45)) * np.exp(rng.normal(size=(96, 45))), jnp.float32)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w, np.float64)
    got = np.asarray(jax.jit(lambda x, w: router_matmul(x, w, True))(x, w), np.float64)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 1e-6
    one_pass = np.asarray(jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                  preferred_element_type=jnp.float32), np.float64)
    assert np.abs(one_pass - want).max() / scale > 1e-4        # the oracle can tell them apart


def test_bf16_pieces_sum_to_the_float32_exactly():
    rng = np.random.default_rng(4)
    scale = 10.0 ** rng.integers(-30, 30, size=(64, 33))
    w = (rng.normal(size=(64, 33)) * scale).astype(np.float32)
    pieces = bf16_pieces(jnp.asarray(w))
    assert [p.dtype for p in pieces] == [jnp.bfloat16] * 3
    np.testing.assert_array_equal(sum(np.asarray(p, np.float64) for p in pieces),
                                  w.astype(np.float64))


@pytest.mark.parametrize("split", [True, False])
def test_router_matmul_gradients_against_float64(split):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 24, 40)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(40, 12)) * 0.2, jnp.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.sin(router_matmul(x, w, split))),
                      argnums=(0, 1))(x, w)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    g = np.cos(x64 @ w64)
    np.testing.assert_allclose(dx, g @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bsi,bso->io", x64, g), rtol=1e-5, atol=1e-4)


def test_router_matmul_splits_on_cuda_only():
    # The platform decides: a CUDA lowering holds the bfloat16 matmul, a CPU one the float32.
    x, w = jnp.ones((2, 8, 16)), jnp.ones((16, 4))
    traced = jax.jit(lambda x, w: router_matmul(x, w)).trace(x, w)
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "bf16" in cuda and "bf16" not in cpu
    np.testing.assert_allclose(router_matmul(x, w), np.full((2, 8, 4), 16.0))

"""The PyTorch surgical Llama against an independent float64 numpy model of the same math."""
import inspect
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import torch_clusters  # noqa: E402
from ultrametric_jax.surgery.config import SurgeryConfig  # noqa: E402
from ultrametric_jax.pytorch import surgical_llama as ts  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def random_router_state(config, surgery, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    d = config.hidden_size
    out = config.num_attention_heads * surgery.num_levels * surgery.arity
    shapes = {"fc1.weight": (d, d), "fc1.bias": (d,), "fc2.weight": (out, d), "fc2.bias": (out,)}
    def scale_of(name, shape):
        return scale / math.sqrt(shape[-1]) if name.endswith("weight") else 0.1
    return {ts.router_param_name(i, n): torch.randn(s, generator=g) * scale_of(n, s)
            for i in range(config.num_hidden_layers) for n, s in shapes.items()}


def surgical(seed=0, surgery=None, router_seed=1, **overrides):
    surgery = surgery or SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1)
    base = tiny_llama(seed, **overrides)
    model = tiny_llama(seed, **overrides)
    router = random_router_state(model.config, surgery, router_seed, scale=3.0)
    return base, ts.attach_surgery(model, surgery, router).eval(), surgery, router


# ---------------------------------------------------------------- float64 numpy oracle
_erf = np.vectorize(math.erf)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[..., None].astype(np.float64) * inv                      # [B,S,D/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def oracle_clusters(xn, w, i, cfg, surgery):
    """Cluster ids [B,H,S] from the layer's normed input, in float64."""
    pre = f"model.layers.{i}.self_attn.router."
    h = xn @ w[pre + "fc1.weight"].T + w[pre + "fc1.bias"]
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    logits = h @ w[pre + "fc2.weight"].T + w[pre + "fc2.bias"]
    b, s = xn.shape[:2]
    L, p = surgery.num_levels, surgery.arity
    digits = logits.reshape(b, s, cfg.num_attention_heads, L, p).argmax(-1)   # [B,S,H,L]
    k = surgery.cut_level
    ids = np.zeros(digits.shape[:-1], np.int64)
    for level in range(k):                       # digit 0 most significant
        ids = ids * p + digits[..., level]
    return np.transpose(ids, (0, 2, 1)), logits


def oracle_forward(w, cfg, surgery, ids, positions=None, pad=None):
    """Logits [B,S,V] (float64) and per-layer cluster ids of the surgical model."""
    b, s = ids.shape
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    pos = np.broadcast_to(np.arange(s), (b, s)) if positions is None else positions
    pad = np.ones((b, s), bool) if pad is None else pad
    x = w["model.embed_tokens.weight"][ids]
    all_clusters = []
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        xn = _rms(x, w[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (xn @ w[pre + "self_attn.q_proj.weight"].T).reshape(b, s, H, D)
        k = (xn @ w[pre + "self_attn.k_proj.weight"].T).reshape(b, s, G, D)
        v = (xn @ w[pre + "self_attn.v_proj.weight"].T).reshape(b, s, G, D)
        q, k = _rope(q, pos, TINY["rope_theta"]), _rope(k, pos, TINY["rope_theta"])
        cl, _ = oracle_clusters(xn, w, i, cfg, surgery)
        all_clusters.append(cl)
        out = np.zeros((b, s, H, D))
        for bb in range(b):
            for h in range(H):
                g = h // (H // G)
                for qi in range(s):
                    allowed = np.array([
                        pad[bb, kj] and kj <= qi and pos[bb, kj] <= pos[bb, qi] and (
                            cl[bb, h, qi] == cl[bb, h, kj] or pos[bb, kj] < surgery.sink_tokens
                            or pos[bb, qi] - pos[bb, kj] < surgery.window)
                        for kj in range(s)])
                    if not allowed.any():
                        continue
                    sc = k[bb, :, g] @ q[bb, qi, h] / math.sqrt(D)
                    sc = np.where(allowed, sc, -np.inf)
                    pr = np.exp(sc - sc.max())
                    out[bb, qi, h] = (pr / pr.sum()) @ v[bb, :, g]
        x = x + out.reshape(b, s, H * D) @ w[pre + "self_attn.o_proj.weight"].T
        xn = _rms(x, w[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = xn @ w[pre + "mlp.gate_proj.weight"].T
        up = xn @ w[pre + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[pre + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T, all_clusters


def weights64(model, router):
    w = {k: v.detach().double().numpy() for k, v in model.state_dict().items()
         if "router" not in k}
    w.update({k: v.double().numpy() for k, v in router.items()})
    return w


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("surgery", [
    SurgeryConfig(arity=2, levels=3, d_max=1, window=2, sink_tokens=1),
    SurgeryConfig(arity=3, levels=3, d_max=1, window=1, sink_tokens=2),
    SurgeryConfig(arity=2, levels=4, d_max=0, window=0, sink_tokens=0),
])
def test_logits_match_float64_oracle(surgery):
    base, model, surgery, router = surgical(surgery=surgery)
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 14))
    want, want_clusters = oracle_forward(weights64(model, router), model.config, surgery, ids)
    got_clusters = torch_clusters(model, ids)
    for got_c, want_c in zip(got_clusters, want_clusters):
        np.testing.assert_array_equal(got_c, want_c)
    with torch.no_grad():
        got = model(torch.as_tensor(ids)).logits.numpy()
        plain = base(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The mask is doing something: the routes split tokens, and logits move off the base model's.
    assert any(len(np.unique(c)) > 1 for c in want_clusters)
    assert np.abs(got - plain).max() > 1e-2


def test_left_padding_matches_oracle():
    _, model, surgery, router = surgical()
    ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(2, 10))
    pad = np.ones_like(ids, dtype=bool)
    pad[0, :3] = False                                          # row 0 is left-padded by 3
    pos = np.clip(np.cumsum(pad, -1) - 1, 0, None)
    want, _ = oracle_forward(weights64(model, router), model.config, surgery, ids, pos, pad)
    with torch.no_grad():
        got = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(pad).long(),
                    position_ids=torch.as_tensor(pos)).logits.numpy()
    np.testing.assert_allclose(got[pad], want[pad], atol=1e-4, rtol=0)


def test_collapsed_router_equals_base_model():
    surgery = SurgeryConfig(arity=2, levels=3, d_max=1, window=1, sink_tokens=0)
    base = tiny_llama(3)
    model = tiny_llama(3)
    state = random_router_state(model.config, surgery)
    for i in range(model.config.num_hidden_layers):   # W2 = 0, b2 = +margin for child 0
        state[ts.router_param_name(i, "fc2.weight")].zero_()
        heads = model.config.num_attention_heads
        bias = torch.full((heads, surgery.num_levels, surgery.arity), -5.0)
        bias[..., 0] = 5.0
        state[ts.router_param_name(i, "fc2.bias")] = bias.reshape(-1)
    ts.attach_surgery(model, surgery, state)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), base(ids).logits.numpy(),
                                   atol=1e-5, rtol=0)


def greedy_without_cache(model, ids, steps):
    ids = torch.as_tensor(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], -1)
    return ids


def test_generate_with_cache_equals_full_recompute_and_oracle():
    _, model, surgery, router = surgical(vocab_size=64)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    model.generation_config.eos_token_id = None    # no early stop: compare every token
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                             do_sample=False, pad_token_id=0)
    ref = greedy_without_cache(model, prompt, 12)
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    # Every step's prediction is the oracle's argmax on the whole prefix.
    want, _ = oracle_forward(weights64(model, router), model.config, surgery, out.numpy()[:, :-1])
    np.testing.assert_array_equal(want[:, 4:].argmax(-1), out.numpy()[:, 5:])


def cache_kwarg(model, cache) -> dict:
    """The cache keyword of this transformers version's forward (`cache` or `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_cache(output):
    return getattr(output, "cache", None) or output.past_key_values


def test_cached_decode_logits_match_full_forward():
    _, model, _, _ = surgical()
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        cache, steps = returned_cache(first), [first.logits]
        for t in range(6, 11):
            out = model(ids[:, t:t + 1], use_cache=True, **cache_kwarg(model, cache))
            steps.append(out.logits)
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), full.numpy(), atol=1e-5, rtol=0)


def test_beam_search_reorders_cached_routes():
    _, model, _, _ = surgical()
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(5))
    model.generation_config.eos_token_id = None
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, num_beams=3,
              do_sample=False, pad_token_id=0, early_stopping=False)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    np.testing.assert_array_equal(cached.numpy(), uncached.numpy())


def test_foreign_cache_is_refused():
    base, model, _, _ = surgical()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = base(ids[:, :5], use_cache=True)
        cache = returned_cache(out)
        with pytest.raises(RuntimeError, match="cluster ids of only 0 are known"):
            model(ids[:, 5:], use_cache=True, **cache_kwarg(model, cache))


def test_bad_router_state_names_the_tensor():
    surgery = SurgeryConfig(arity=2, levels=3, d_max=1)
    model = tiny_llama()
    state = random_router_state(model.config, surgery)
    del state[ts.router_param_name(1, "fc2.bias")]
    with pytest.raises(ValueError, match=r"lack 1 of 8 tensors, "
                       r"e\.g\. model\.layers\.1\.self_attn\.router\.fc2\.bias"):
        ts.attach_surgery(model, surgery, state)
    state = random_router_state(model.config, surgery)
    state["model.layers.2.self_attn.router.fc1.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match=r"unexpected router weights: \['model\.layers\.2\."):
        ts.attach_surgery(tiny_llama(), surgery, state)
    state = random_router_state(model.config, SurgeryConfig(arity=3, levels=3, d_max=1))
    with pytest.raises(ValueError, match=r"fc2\.weight has shape \(36, 32\), expected \(24, 32\)"):
        ts.attach_surgery(tiny_llama(), surgery, state)


def test_sliding_window_cache_is_refused():
    """A cache returning fewer keys than the routed tokens (a sliding window) is named."""
    routes = ts._PastKeyRoutes()
    clusters, positions = torch.zeros(1, 4, 6, dtype=torch.long), torch.arange(6)[None]
    with pytest.raises(RuntimeError, match="layer 0's cache returned 4 keys for 6 routed tokens; "
                       "sliding-window caches are not supported"):
        routes.extend(0, 0, clusters, positions, key_len=4)


def test_non_4d_attention_mask_is_refused():
    _, model, _, _ = surgical()
    hidden = torch.randn(1, 5, 32)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(5)[None])
    with torch.no_grad(), pytest.raises(TypeError, match="needs a 4-D tensor attention mask, got "
                                        "Tensor; load the model with attn_implementation='eager'"):
        model.model.layers[0].self_attn(hidden, position_embeddings=position_embeddings,
                                        attention_mask=torch.ones(1, 5))


def test_bfloat16_model_runs():
    _, model, _, _ = surgical()
    model.to(torch.bfloat16)           # casts the routers too; their math still runs in float32
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits.float()).all()


def test_modules_outside_pytorch_import_without_torch():
    """Every ultrametric_jax module outside ultrametric_jax.pytorch imports with torch blocked."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError("No module named 'torch' (blocked)", name=name)
                return None
        sys.meta_path.insert(0, BlockTorch())
        import ultrametric_jax
        names = [m.name for m in
                 pkgutil.walk_packages(ultrametric_jax.__path__, "ultrametric_jax.")]
        for name in names:
            if not name.startswith("ultrametric_jax.pytorch"):
                importlib.import_module(name)
        assert "torch" not in sys.modules
        print(" ".join(names))
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    imported = set(res.stdout.split())
    for name in ("ultrametric_jax.run.export", "ultrametric_jax.cli.export",
                 "ultrametric_jax.model.llama", "ultrametric_jax.surgery.inject", "ultrametric_jax.run.trainer"):
        assert name in imported

"""LlamaAttention with an injected ultrametric topology.

The module holds the base layer's own q/k/v/o projections (the same objects, so parameter
paths and values are the base model's) plus a DynamicTopologyRouter. Per query head h, the
router sends every token down a p-ary tree; key j is visible to query i iff j <= i and (i and j
share the first L - d_max digits of head h's routes, or j < sink_tokens, or i - j < window).

Evaluation (`deterministic=True`, the default; `model.eval()`): hard routes from argmax, the
boolean mask (ultrametric.allowed_mask, i.e. pallas_kernels.masking.allowed_pairs) handed to
llama.masked_attention, no straight-through arithmetic, so a collapse initialised model is
bit-identical to the base; after set_attention_impl("kernel"), calls with the default positions,
no padding mask and no cache run pallas_kernels.block_sparse_attention instead. Training
(`model.train()`): Gumbel hard routes at temperature `tau` (a GumbelTemperature variable the
trainer sets every step), the straight-through bridge of ultrametric.bridged_softmax (ste
"gate" or "renorm").

Auxiliary values (balance loss, densities, cluster ids) are produced only inside
`collect_aux()`; forward_with_aux and extract_routes (surgery.py) use it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from pallas_kernels import block_sparse_attention, sharded_block_sparse_attention

from ultrametric_jax.model import llama
from ultrametric_jax.surgery import tree as um
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.router import DynamicTopologyRouter

ATTENTION_IMPLS = ("dense", "kernel")


class GumbelTemperature(nnx.Variable):
    """tau of the Gumbel-softmax relaxation: set by the trainer each step, never trained."""


# Stack of active aux collectors; each is a list receiving one dict per attention call.
_AUX_COLLECTORS: list[list] = []


@contextlib.contextmanager
def collect_aux():
    """Within this context every surgical attention call appends its aux dict to the yielded
    list: balance_loss (scalar), density / tree_density (scalars; fractions of the causal
    pairs between real tokens allowed in total / by the tree alone; on the kernel path counted
    from the cluster ids without an S x S mask), clusters [B, H, S].
    The values are traced arrays of the enclosing computation (use them inside it)."""
    records: list = []
    _AUX_COLLECTORS.append(records)
    try:
        yield records
    finally:
        _AUX_COLLECTORS.pop()


def _masked_density(kept, causal, q_valid):
    """Fraction of the causal pairs between real tokens (q_valid [B, Sq]) that `kept` keeps,
    over every head; kept [B, H, Sq, Sk] and causal [B, 1, Sq, Sk] bool, causal excluding
    padded keys."""
    pairs = causal & q_valid[:, None, :, None]
    total = jnp.sum(jnp.broadcast_to(pairs, kept.shape), dtype=jnp.float32)
    return jnp.sum(kept & pairs, dtype=jnp.float32) / jnp.maximum(total, 1.0)


class SurgicalAttention(llama.LlamaAttention):
    """Drop-in replacement of a LlamaAttention (same call signature and parameter paths)."""

    def __init__(self, base: llama.LlamaAttention, surgery_config: SurgeryConfig, *,
                 rngs: nnx.Rngs, attention_impl: str = "dense"):
        c = base.config
        self.config = c
        self.layer_idx = base.layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            base.q_proj, base.k_proj, base.v_proj, base.o_proj)
        self.scale = base.scale
        self.surgery_config = surgery_config
        self.set_attention_impl(attention_impl)
        self.deterministic = True
        s = surgery_config
        self.router = DynamicTopologyRouter(c.hidden_size, c.num_attention_heads, s.num_levels,
                                            s.arity, s.init_margin, rngs=rngs)
        self.tau = GumbelTemperature(jnp.asarray(s.tau_start, jnp.float32))
        # rngs["gumbel"] (falling back to the default stream); rngs.gumbel would be the
        # Gumbel sampler method of nnx.Rngs when no such stream exists.
        self.rngs = nnx.Rngs(gumbel=rngs["gumbel"]())

    def set_attention_impl(self, impl: str, **kernel_options) -> None:
        """Evaluation backend "dense" or "kernel"; kernel_options are extra keyword arguments
        of pallas_kernels.block_sparse_attention (backend, interpret, block sizes) or mesh=."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {impl!r}; expected one of "
                             f"{ATTENTION_IMPLS}")
        self.attention_impl = impl
        # A hashable tuple of (name, value) pairs.
        self.kernel_options = tuple(sorted(kernel_options.items()))

    def set_view(self, deterministic: Optional[bool] = None):
        """Used by nnx.view: deterministic=True selects the evaluation path."""
        if deterministic is not None:
            self.deterministic = deterministic

    # ------------------------------------------------------------------ routes

    def _routes(self, x):
        """(assign [B,H,S,L,p] float32, digits [B,H,S,L], router probabilities)."""
        logits = self.router(x)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.deterministic:
            assign = um.hard_assignment(logits)
        else:
            # Noise bounded by the collapse margin: a collapsed router samples the collapsed
            # routes for every seed (see ultrametric.gumbel_softmax).
            assign = um.gumbel_softmax(logits, self.tau[...], self.rngs["gumbel"](), hard=True,
                                       noise_bound=self.surgery_config.init_margin)
        return assign, um.hard_digits(assign), probs

    # ------------------------------------------------------------------ forward

    def __call__(self, x, positions, attention_mask=None, cache=None):
        s = self.surgery_config
        # The kernel takes token i to sit at position i and every token to be real: it serves
        # only calls with the default positions, no padding mask and no cache.
        use_kernel = (self.attention_impl == "kernel" and self.deterministic
                      and positions is None and attention_mask is None and cache is None)
        if positions is None:
            positions = llama.default_positions(x, cache)
        q, k, v = self.project(x, positions)
        assign, digits, probs = self._routes(x)
        clusters = um.cluster_ids(digits, s.arity, s.cut_level)            # [B,H,S]
        if cache is None:
            k_pos, k_valid, k_clusters = positions, attention_mask, clusters
        else:
            if not self.deterministic:
                raise NotImplementedError(
                    "a KV cache is only supported in evaluation mode (model.eval()); training "
                    "runs full sequences without a cache")
            cache, k, v, k_pos, k_valid, k_clusters = self._append(cache, k, v, positions,
                                                                   attention_mask, clusters)

        def pair_mask(window, sink_tokens):                            # [B,H,Sq,Sk]
            return um.allowed_mask(positions, k_pos, clusters, k_clusters, window, sink_tokens,
                                   k_valid)

        if use_kernel:
            out = self._kernel_attention(q, k, v, clusters)
        else:
            allowed = pair_mask(s.window, s.sink_tokens)
            if self.deterministic:
                out = llama.masked_attention(q, k, v, allowed, self.scale)
            else:
                out = self._training_attention(q, k, v, assign, allowed, positions, k_valid)
        if _AUX_COLLECTORS:
            if use_kernel:
                tree, kept, causal = um.causal_pair_counts(clusters, s.window, s.sink_tokens)
                density = jnp.sum(kept) / jnp.sum(causal)
                tree_density = jnp.sum(tree) / jnp.sum(causal)
            else:
                causal = llama.causal_mask(positions, k_pos, k_valid)     # [B,1,Sq,Sk]
                q_valid = (jnp.ones(positions.shape, bool) if attention_mask is None
                           else attention_mask.astype(bool))
                density = _masked_density(allowed, causal, q_valid)
                # The tree alone: allowed pairs without sink and window.
                tree_density = _masked_density(pair_mask(0, 0), causal, q_valid)
            valid = None if attention_mask is None else attention_mask.astype(bool)[:, None]
            _AUX_COLLECTORS[-1].append({
                "balance_loss": um.load_balance_loss(probs, assign, s.arity, valid),
                "density": density, "tree_density": tree_density, "clusters": clusters})
        out = self.o_proj(out.reshape(*out.shape[:2], -1))
        return out if cache is None else (out, cache)

    def _append(self, cache, k, v, positions, attention_mask, clusters):
        """Writes k, v and the new tokens' cluster ids (they are the future keys' ids)."""
        start = cache["length"]
        batch, heads, _ = clusters.shape
        cached = cache.get("clusters")
        if cached is None:
            cached = jnp.zeros((batch, heads, cache["k"].shape[1]), jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        cached = jax.lax.dynamic_update_slice(cached, clusters, (zero, zero, start))
        cache = dict(cache, clusters=cached)
        cache, k_all, v_all, k_pos, k_valid = llama.append_to_cache(cache, k, v, positions,
                                                                    attention_mask)
        return cache, k_all, v_all, k_pos, k_valid, cached

    def _kernel_attention(self, q, k, v, clusters):
        s = self.surgery_config
        options = dict(self.kernel_options)
        mesh = options.pop("mesh", None)
        kwargs = dict(window=s.window, sink_tokens=s.sink_tokens, scale=self.scale, **options)
        if mesh is not None:
            return sharded_block_sparse_attention(mesh, q, k, v, clusters, clusters, **kwargs)
        return block_sparse_attention(q, k, v, clusters, clusters, **kwargs)

    def _training_attention(self, q, k, v, assign, allowed, positions, k_valid):
        s = self.surgery_config
        distance = um.ultrametric_distance(assign, s.depth_op)            # [B,H,S,S]
        soft = um.soft_tree_mask(distance, s.max_distance, s.mask_temperature)
        causal = llama.causal_mask(positions, positions, k_valid)         # [B,1,S,S]
        # Sink and window pairs: the pairs allowed under cluster ids that never agree.
        never = jnp.zeros(positions.shape, jnp.int32)[:, None]            # [B,1,S]
        bypass = um.allowed_mask(positions, positions, never, never + 1, s.window,
                                 s.sink_tokens, k_valid)
        m = um.straight_through_mask(allowed, soft, causal & ~bypass)
        groups = k.shape[2]
        qg = rearrange(q, "b q (g r) d -> b q g r d", g=groups)
        scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32)
        scores = rearrange(scores * jnp.float32(self.scale), "b g r q k -> b (g r) q k")
        probs = um.bridged_softmax(scores, m, allowed, s.ste)
        probs = rearrange(probs, "b (g r) q k -> b g r q k", g=groups)
        out = jnp.einsum("bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v)
        return rearrange(out, "b q g r d -> b q (g r) d")

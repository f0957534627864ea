"""LlamaAttention with an injected ultrametric topology.

The module holds the base layer's own q/k/v/o projections (the same objects, so parameter
paths and values are the base model's) plus a DynamicTopologyRouter. Per query head h, the
router sends every token down a p-ary tree; key j is visible to query i iff j <= i and (i and j
share the first L - d_max digits of head h's routes, or j < sink_tokens, or i - j < window).

Evaluation (`deterministic=True`, the default; `model.eval()`): hard routes from argmax, the
boolean mask handed to llama.masked_attention, no straight-through arithmetic, so a collapse
initialised model is bit-identical to the base. Training (`model.train()`): Gumbel hard routes
at temperature `tau` (a GumbelTemperature variable the trainer sets every step), the
straight-through bridge of ultrametric.bridged_softmax (ste "gate" or "renorm").

Auxiliary values (balance loss, densities, cluster ids) are produced only inside
`collect_aux()`; forward_with_aux and extract_routes (surgery.py) use it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ultrametric_jax import llama
from ultrametric_jax import ultrametric as um
from ultrametric_jax.config import SurgeryConfig
from ultrametric_jax.router import DynamicTopologyRouter

ATTENTION_IMPLS = ("dense", "kernel")


class GumbelTemperature(nnx.Variable):
    """tau of the Gumbel-softmax relaxation: set by the trainer each step, never trained."""


# Stack of active aux collectors; each is a list receiving one dict per attention call.
_AUX_COLLECTORS: list[list] = []


@contextlib.contextmanager
def collect_aux():
    """Within this context every surgical attention call appends its aux dict to the yielded
    list: balance_loss (scalar), density / tree_density (scalars; fractions of the causal
    pairs between real tokens allowed in total / by the tree alone), clusters [B, H, S].
    The values are traced arrays of the enclosing computation (use them inside it)."""
    records: list = []
    _AUX_COLLECTORS.append(records)
    try:
        yield records
    finally:
        _AUX_COLLECTORS.pop()


def _causal_density(allowed, causal, q_valid):
    """Fraction of causal pairs between real tokens that `allowed` keeps (mean over heads)."""
    pairs = causal & q_valid[:, None, :, None]
    kept = jnp.sum(allowed & pairs, dtype=jnp.float32)
    total = jnp.sum(jnp.broadcast_to(pairs, allowed.shape), dtype=jnp.float32)
    return kept / jnp.maximum(total, 1.0)


class SurgicalAttention(llama.LlamaAttention):
    """Drop-in replacement of a LlamaAttention (same call signature and parameter paths)."""

    def __init__(self, base: llama.LlamaAttention, surgery_config: SurgeryConfig, *,
                 rngs: nnx.Rngs, attention_impl: str = "dense"):
        if isinstance(base, SurgicalAttention):
            raise ValueError(f"layer {base.layer_idx} already carries an ultrametric topology")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {attention_impl!r}; expected one of "
                             f"{ATTENTION_IMPLS}")
        c = base.config
        self.config = c
        self.layer_idx = base.layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            base.q_proj, base.k_proj, base.v_proj, base.o_proj)
        self.scale = base.scale
        self.surgery_config = surgery_config
        self.attention_impl = attention_impl
        # Extra keyword arguments of pallas_kernels.block_sparse_attention (backend, interpret,
        # block sizes), as a hashable tuple of (name, value) pairs.
        self.kernel_options: tuple = ()
        self.deterministic = True
        s = surgery_config
        self.router = DynamicTopologyRouter(c.hidden_size, c.num_attention_heads, s.num_levels,
                                            s.arity, s.init_margin, rngs=rngs)
        self.tau = GumbelTemperature(jnp.asarray(s.tau_start, jnp.float32))
        # rngs["gumbel"] (falling back to the default stream); rngs.gumbel would be the
        # Gumbel sampler method of nnx.Rngs when no such stream exists.
        self.rngs = nnx.Rngs(gumbel=rngs["gumbel"]())

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
        digits = jnp.argmax(jax.lax.stop_gradient(assign), axis=-1).astype(jnp.int32)
        return assign, digits, probs

    # ------------------------------------------------------------------ forward

    def __call__(self, x, positions, attention_mask=None, cache=None):
        s = self.surgery_config
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
        causal = llama.causal_mask(positions, k_pos, k_valid)              # [B,1,Sq,Sk]
        _, fixed = um.positional_pairs(positions, k_pos, s.window, s.sink_tokens)
        fixed = fixed[:, None]                                             # [B,1,Sq,Sk]
        tree = clusters[..., :, None] == k_clusters[..., None, :]          # [B,H,Sq,Sk]
        allowed = causal & (tree | fixed)

        if self.deterministic:
            out = self._evaluation_attention(q, k, v, allowed, clusters, k_clusters, positions,
                                             attention_mask, cache)
        else:
            out = self._training_attention(q, k, v, assign, tree, fixed, causal, allowed)
        if _AUX_COLLECTORS:
            _AUX_COLLECTORS[-1].append(self._aux(assign, probs, clusters, tree, allowed, causal,
                                                 positions, attention_mask, k_pos))
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

    def _evaluation_attention(self, q, k, v, allowed, clusters, k_clusters, positions,
                              attention_mask, cache):
        s = self.surgery_config
        if self.attention_impl == "kernel" and cache is None and attention_mask is None:
            # The kernel takes no padding mask and indexes tokens by their place in the
            # sequence, which is their position for the default positions 0..S-1; padded and
            # cached calls take the dense path.
            options = dict(self.kernel_options)
            mesh = options.pop("mesh", None)
            kwargs = dict(window=s.window, sink_tokens=s.sink_tokens, scale=self.scale,
                          **options)
            if mesh is not None:
                # A Pallas call is opaque to the SPMD partitioner: on a mesh each device runs
                # the kernel on its own batch and head slice under shard_map.
                from ultrametric_jax.sharding import sharded_block_sparse_attention
                return sharded_block_sparse_attention(mesh, q, k, v, clusters, k_clusters,
                                                      **kwargs)
            from pallas_kernels import block_sparse_attention  # optional, imported on use
            return block_sparse_attention(q, k, v, clusters, k_clusters, **kwargs)
        return llama.masked_attention(q, k, v, allowed, self.scale)

    def _training_attention(self, q, k, v, assign, tree, fixed, causal, allowed):
        s = self.surgery_config
        distance = um.ultrametric_distance(assign, s.depth_op)            # [B,H,S,S]
        soft = um.soft_tree_mask(distance, s.max_distance, s.mask_temperature)
        m = um.straight_through_mask(tree, soft, fixed, causal)
        batch, sq, heads, dim = q.shape
        groups = k.shape[2]
        qg = q.reshape(batch, sq, groups, heads // groups, dim)
        scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32)
        scores = (scores * jnp.float32(self.scale)).reshape(batch, heads, sq, k.shape[1])
        probs = um.bridged_softmax(scores, m, allowed, s.ste)
        probs = probs.reshape(batch, groups, heads // groups, sq, k.shape[1])
        out = jnp.einsum("bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v)
        return out.reshape(batch, sq, heads, dim)

    def _aux(self, assign, probs, clusters, tree, allowed, causal, positions, attention_mask,
             k_pos):
        batch, seq = positions.shape
        q_valid = (jnp.ones((batch, seq), bool) if attention_mask is None
                   else attention_mask.astype(bool))
        balance = um.load_balance_loss(probs, assign, self.surgery_config.arity,
                                       q_valid[:, None, :])
        return {
            "balance_loss": balance,
            "density": _causal_density(allowed, causal, q_valid),
            "tree_density": _causal_density(tree & causal, causal, q_valid),
            "clusters": clusters,
        }

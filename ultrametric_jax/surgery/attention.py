"""A Llama attention layer with an injected ultrametric topology.

SurgicalAttention is built by composition: it holds the base layer's own q/k/v/o projection
modules (the same objects, so parameter paths and values are the base model's), a
DynamicTopologyRouter and the attention function that runs the hard topology. Per query head
h the router sends every token down a p-ary tree; key j is visible to query i iff j <= i and
(i and j share the first L - d_max digits of head h's routes, or j < sink_tokens, or
i - j < window).

Three paths, chosen by the call, each a method of its own:
- evaluation (`deterministic`, the default; `model.eval()`): hard routes from argmax and the
  boolean mask through llama.masked_attention, so a collapse initialised model is bit-identical
  to the base;
- evaluation through a kernel: when an attention function is set (`set_attention_impl`) and the
  call has the default positions, no padding mask and no cache, the hard topology runs in that
  function (pallas_kernels), from cluster ids alone;
- training (`model.train()`): Gumbel hard routes at temperature `tau` (a GumbelTemperature
  variable the trainer sets every step) and the straight-through bridge of tree.bridged_softmax.

A layer may also hold a key selector (SurgeryConfig.key_rank > 0; surgery/key_selector.py): in
evaluation it narrows the hard topology's pairs to the keys each query selects (and the sink +
window). It is fitted after the routers train (run/key_selection.py), so training runs the tree
alone.

With a cache the evaluation path takes one of two forms, chosen by the cache's kind: the dense
cache of llama.init_cache (the new tokens' mask over every stored key; any positions and
padding) or the route cache of route_cache.init_route_caches (`_route_cached_attention`: a
decode step reads only its cluster's pages, the window and the sink).

Auxiliary values (balance loss, densities, cluster ids) are sown as SurgeryAux variables, only
while `capture_aux` runs them (forward_with_aux and extract_routes in inject.py use it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pallas_kernels import routed_attention, sharded_routed_attention
from pallas_kernels import decode
from ultrametric_jax.model import llama
from ultrametric_jax.surgery import tree as um
from ultrametric_jax.surgery.budget import route_density, soft_density
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.key_selector import KeySelector, visited_blocks
from ultrametric_jax.surgery.objectives import attention_recall_loss
from ultrametric_jax.surgery.route_cache import LayerRouteCache
from ultrametric_jax.surgery.router import DynamicTopologyRouter
from ultrametric_jax.surgery.soft_distance import bridged_tree_mask

ATTENTION_IMPLS = ("dense", "kernel")
AttentionFn = Callable[..., jax.Array]


class GumbelTemperature(nnx.Variable):
    """tau of the Gumbel-softmax relaxation: set by the trainer each step, never trained."""


class SurgeryAux(nnx.Intermediate):
    """What one surgical attention call reports: a dict of traced arrays (see `capture_aux`)."""


@dataclasses.dataclass(frozen=True)
class KernelAttention:
    """The hard topology through pallas_kernels.routed_attention: the kernels in token order or
    on the cluster-sorted layout (layout="auto" picks per call from a bound on the natural
    schedule's block density), or on a mesh its shard_map form (a Pallas call is opaque to the SPMD
    partitioner, so each device runs the kernels on its own batch and head slice). Hashable,
    so a compiled model can key on it."""
    options: tuple = ()                 # (name, value) pairs for routed_attention
    mesh: Optional[Mesh] = None

    def __call__(self, q, k, v, clusters, *, window, sink_tokens, scale, num_clusters=None):
        kwargs = dict(window=window, sink_tokens=sink_tokens, scale=scale,
                      num_clusters=num_clusters, **dict(self.options))
        if self.mesh is not None:
            return sharded_routed_attention(self.mesh, q, k, v, clusters, **kwargs)
        return routed_attention(q, k, v, clusters, **kwargs)


def noise_scale(config: SurgeryConfig, tau):
    """The Gumbel noise's scale at temperature tau: gumbel_scale * (tau / tau_start) **
    gumbel_anneal (constant for gumbel_anneal = 0)."""
    if config.gumbel_anneal == 0:
        return config.gumbel_scale
    return config.gumbel_scale * (tau / config.tau_start) ** config.gumbel_anneal


def attention_fn(impl: str, **kernel_options) -> Optional[AttentionFn]:
    """The attention function of an evaluation backend: None for "dense" (the masked dense
    path), a KernelAttention for "kernel" (kernel_options: layout "auto" | "natural" |
    "sorted", backend, interpret, block sizes of routed_attention, and mesh=)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    if impl == "dense":
        if kernel_options:
            raise ValueError(f"the dense attention takes no kernel options, got "
                             f"{sorted(kernel_options)}")
        return None
    mesh = kernel_options.pop("mesh", None)
    return KernelAttention(tuple(sorted(kernel_options.items())), mesh)


class SurgicalAttention(nnx.Module):
    """Replaces a LlamaAttention in its decoder layer: same call signature, same parameter
    paths for the base projections, plus `router`."""

    def __init__(self, base: llama.LlamaAttention, surgery_config: SurgeryConfig, *,
                 rngs: nnx.Rngs, attention: Optional[AttentionFn] = None):
        c = base.config
        self.config = c
        self.layer_idx = base.layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            base.q_proj, base.k_proj, base.v_proj, base.o_proj)
        self.scale = base.scale
        self.surgery_config = surgery_config
        self.attention = attention
        self.deterministic = True
        # What a call sows (None: nothing; see capture_aux) and whether it runs as the base
        # layer (plain causal attention: the frozen teacher of distillation).
        self.reporting: Optional[frozenset] = None
        self.as_base = False
        s = surgery_config
        self.router = DynamicTopologyRouter(c.hidden_size, c.num_attention_heads, s.num_levels,
                                            s.arity, s.init_margin, rngs=rngs)
        self.tau = GumbelTemperature(jnp.asarray(s.tau_start, jnp.float32))
        # rngs["gumbel"] (falling back to the default stream); rngs.gumbel would be the
        # Gumbel sampler method of nnx.Rngs when no such stream exists.
        self.rngs = nnx.Rngs(gumbel=rngs["gumbel"]())
        if s.key_rank > c.head_dim:
            raise ConfigError(f"invalid SurgeryConfig.key_rank={s.key_rank}: must lie in "
                              f"[0, {c.head_dim}] (the model's head dimension)")
        # data either way, so that the module's pytree structure is the same kind of node
        self.selector = nnx.data(KeySelector(c.num_attention_heads, c.head_dim, s.key_rank)
                                 if s.key_rank else None)

    def set_view(self, deterministic: Optional[bool] = None):
        """Used by nnx.view: deterministic=True selects the evaluation path."""
        if deterministic is not None:
            self.deterministic = deterministic

    # ------------------------------------------------------------------ routes

    def _routes(self, x):
        """(router logits [B,H,S,L,p], assign [B,H,S,L,p] float32, router probabilities,
        cluster ids [B,H,S] int32)."""
        s = self.surgery_config
        logits = self.router(x)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.deterministic:
            assign = um.hard_assignment(logits)
        else:
            # Noise bounded by the collapse margin: a collapsed router samples the collapsed
            # routes for every seed (see tree.gumbel_softmax).
            tau = self.tau[...]
            assign = um.gumbel_softmax(logits, tau, self.rngs["gumbel"](), hard=True,
                                       noise_bound=s.init_margin,
                                       noise_scale=noise_scale(s, tau))
        return logits, assign, probs, um.cluster_ids(um.hard_digits(assign), s.arity,
                                                     s.cut_level)

    # ------------------------------------------------------------------ forward

    def __call__(self, x, positions, attention_mask=None, cache=None):
        # A kernel takes token i to sit at position i and every token to be real: it serves
        # only calls with the default positions, no padding mask and no cache.
        use_kernel = (self.attention is not None and self.deterministic and positions is None
                      and attention_mask is None and cache is None)
        routed = isinstance(cache, LayerRouteCache)
        if routed:
            self._check_route_call(positions, attention_mask)
            positions = llama.default_positions(x, {"length": cache.length})
        elif positions is None:
            positions = llama.default_positions(x, cache)
        q, k, v = llama.project_qkv(self.config, self.q_proj, self.k_proj, self.v_proj, x,
                                    positions)
        if self.as_base:           # the base layer: no routing, no noise drawn, no report
            return self._base_attention(q, k, v, positions, attention_mask, cache)
        logits, assign, probs, clusters = self._routes(x)
        if routed:
            return self._route_cached_attention(q, k, v, clusters, cache)
        if cache is not None:
            if not self.deterministic:
                raise NotImplementedError(
                    "a KV cache is only supported in evaluation mode (model.eval()); training "
                    "runs full sequences without a cache")
            cache, k, v, k_pos, k_valid, k_clusters = self._append(cache, k, v, positions,
                                                                   attention_mask, clusters)
        else:
            k_pos, k_valid, k_clusters = positions, attention_mask, clusters

        extras = {}
        if self.selector is not None and use_kernel:
            raise NotImplementedError(
                "a key selector (surgery.key_rank > 0) runs in the masked dense evaluation "
                "path: set_attention_impl(model, 'dense')")
        if use_kernel:
            out = self._kernel_attention(q, k, v, clusters)
        elif self.deterministic:
            out, extras = self._masked_attention(q, k, v, positions, k_pos, clusters,
                                                 k_clusters, k_valid, attention_mask)
        else:
            out, extras = self._training_attention(q, k, v, logits, assign, positions,
                                                   clusters, attention_mask)
        if self.reporting is not None:
            self._report(assign, probs, clusters, attention_mask, extras)
        out = self.o_proj(out.reshape(*out.shape[:2], -1))
        return out if cache is None else (out, cache)

    def _base_attention(self, q, k, v, positions, attention_mask, cache):
        """Exactly the base LlamaAttention (plain causal softmax), with or without a cache."""
        if cache is None:
            k_pos, k_valid = positions, attention_mask
        else:
            cache, k, v, k_pos, k_valid = llama.append_to_cache(cache, k, v, positions,
                                                                attention_mask)
        out = llama.masked_attention(q, k, v, llama.causal_mask(positions, k_pos, k_valid),
                                     self.scale)
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

    def _check_route_call(self, positions, attention_mask):
        """A route cache holds token i at slot i and real tokens only."""
        if self.as_base:
            raise ValueError("a route cache serves the surgical topology; the base model "
                             "(base_model_mode) decodes with the dense cache of init_cache")
        if not self.deterministic:
            raise NotImplementedError(
                "a KV cache is only supported in evaluation mode (model.eval()); training "
                "runs full sequences without a cache")
        if attention_mask is not None:
            raise ValueError("a route cache holds real tokens only: no attention_mask (left "
                             "padding); decode prompts of different lengths separately, or "
                             "use the dense cache of init_cache")
        if positions is not None:
            raise ValueError("a route cache places token i at position i: call it with "
                             "positions=None")

    def _route_cached_attention(self, q, k, v, clusters, cache):
        """(out, cache) through the route cache: the new tokens are appended to their clusters'
        pages; one token attends through decode_attention (its cluster's pages, the window and
        the sink), a prefill chunk through the exact mask over the stored keys."""
        s = self.surgery_config
        route = decode.append(cache.route, k, v, clusters)
        batch, steps = q.shape[:2]
        if self.selector is not None:
            raise NotImplementedError("a key selector (surgery.key_rank > 0) decodes with the "
                                      "dense cache of init_cache, not a route cache")
        if steps == 1:
            out = decode.decode_attention(route, q, window=s.window, sink_tokens=s.sink_tokens,
                                          max_pages=cache.read_pages, scale=self.scale)
        else:
            slots = jnp.broadcast_to(jnp.arange(route.k.shape[1], dtype=jnp.int32),
                                     (batch, route.k.shape[1]))
            new = jnp.broadcast_to(route.length - steps + jnp.arange(steps, dtype=jnp.int32),
                                   (batch, steps))
            out, _ = self._masked_attention(q, route.k, route.v, new, slots, clusters,
                                            route.ids, slots < route.length)
        out = self.o_proj(out.reshape(batch, steps, -1))
        return out, dataclasses.replace(cache, route=route)

    def _allowed(self, positions, k_pos, clusters, k_clusters, k_valid):
        s = self.surgery_config
        return um.allowed_mask(positions, k_pos, clusters, k_clusters, s.window, s.sink_tokens,
                               k_valid)

    def _kernel_attention(self, q, k, v, clusters):
        s = self.surgery_config
        # the ids are tree nodes at the cut: p ** cut of them, which lets the kernels count
        return self.attention(q, k, v, clusters, window=s.window, sink_tokens=s.sink_tokens,
                              scale=self.scale, num_clusters=s.arity ** s.cut_level)

    def _masked_attention(self, q, k, v, positions, k_pos, clusters, k_clusters, k_valid,
                          q_valid=None):
        """(output, extras): the hard topology's mask, narrowed by the key selector if the
        layer has one (extras then holds allowed_pairs, the allowed pairs of real queries, and
        visited_blocks / causal_blocks, key_selector.visited_blocks of the mask)."""
        allowed = self._allowed(positions, k_pos, clusters, k_clusters, k_valid)
        if self.selector is None:
            return llama.masked_attention(q, k, v, allowed, self.scale), {}
        causal = llama.causal_mask(positions, k_pos, k_valid)
        # a query always keeps its own key: with the tree's cluster it keeps one pair at least
        own = positions[:, None, :, None] == k_pos[:, None, None, :]
        allowed = allowed & (self.selector(q, k, causal, self.scale)
                             | self._local_pairs(positions, k_pos, k_valid) | own)
        extras = {}
        if self.reporting is not None:        # the counts only a report reads
            real = (jnp.ones(positions.shape, bool) if q_valid is None
                    else q_valid.astype(bool))[:, None, :, None]
            visited, tiles = visited_blocks(allowed & real, causal & real)
            extras = {"allowed_pairs": jnp.sum(allowed & real, dtype=jnp.float32),
                      "visited_blocks": visited, "causal_blocks": tiles}
        return llama.masked_attention(q, k, v, allowed, self.scale), extras

    def _local_pairs(self, positions, k_pos, k_valid):
        """bool [B, 1, Sq, Sk]: the sink + window pairs, those allowed under cluster ids that
        never agree."""
        s = self.surgery_config
        never = jnp.zeros(positions.shape, jnp.int32)[:, None]
        return um.allowed_mask(positions, k_pos, never,
                               jnp.ones(k_pos.shape, jnp.int32)[:, None], s.window,
                               s.sink_tokens, k_valid)

    def _training_attention(self, q, k, v, logits, assign, positions, clusters, q_valid):
        """(output, extras): the straight-through bridge over the Gumbel routes. extras holds
        the soft density of this layer (forward: the Gumbel routes' hard density), the density
        of the argmax routes evaluation runs and, when reported, route_density (that density,
        differentiable: budget.route_density) and the attention recall of the dense
        probabilities of the same q and k."""
        s = self.surgery_config
        allowed = self._allowed(positions, positions, clusters, clusters, q_valid)
        causal = llama.causal_mask(positions, positions, q_valid)         # [B,1,S,S]
        bypass = self._local_pairs(positions, positions, q_valid)
        # O(S^2) memory per layer whatever L: the level products are recomputed backward.
        m = bridged_tree_mask(assign, allowed, causal & ~bypass, s.max_distance,
                              s.mask_temperature, s.depth_op)
        valid = None if q_valid is None else q_valid.astype(bool)[:, None]
        argmax = um.cluster_ids(um.hard_digits(logits), s.arity, s.cut_level)
        _, kept, pairs = um.pair_counts(argmax, s.window, s.sink_tokens, valid)
        extras = {"soft_density": soft_density(m, causal, q_valid),
                  "argmax_density": jnp.sum(kept) / jnp.sum(pairs)}
        if self.reporting is not None and "route_density" in self.reporting:
            extras["route_density"] = route_density(
                logits, 1.0, s.cut_level, causal & ~bypass, causal, q_valid,
                extras["argmax_density"])
        want_recall = self.reporting is not None and "recall" in self.reporting

        def probabilities(scores):
            if want_recall:
                extras["recall"] = attention_recall_loss(scores, m, causal, q_valid)
            return um.bridged_softmax(scores, m, allowed, s.ste)

        return llama.grouped_attention(q, k, v, self.scale, probabilities), extras

    def _report(self, assign, probs, clusters, attention_mask, extras):
        """Sows this call's aux dict: balance_loss (scalar), density / tree_density (fractions
        of the causal pairs between real tokens allowed in total / by the tree alone, counted
        from the cluster ids), clusters [B, H, S], and in training soft_density (the density
        the sampled-routes budget differentiates; its value is the Gumbel routes' hard
        density), argmax_density (the density of the noise-free routes evaluation runs) and,
        when asked for, route_density, recall and digits (the hard route digits [B, H, S, L])."""
        s = self.surgery_config
        valid = None if attention_mask is None else attention_mask.astype(bool)[:, None]
        tree, kept, causal = um.pair_counts(clusters, s.window, s.sink_tokens, valid)
        causal = jnp.sum(causal)
        kept = extras.get("allowed_pairs", kept)     # the key selector narrows the tree's pairs
        if "digits" in self.reporting:      # the whole hard route, not only its cut prefix
            extras = {**extras, "digits": um.hard_digits(assign)}
        self.sow(SurgeryAux, "aux", {
            "balance_loss": um.load_balance_loss(probs, assign, s.arity, valid),
            "density": jnp.sum(kept) / causal, "tree_density": jnp.sum(tree) / causal,
            "clusters": clusters, **extras})


def capture_aux(fn: Callable, root: nnx.Module, layers, *args, extras=(), **kwargs):
    """(fn(root, *args, **kwargs), aux dicts): runs fn with the given surgical layers (inside
    `root`) reporting, and returns, per layer in the order of their paths in `root` (layer
    order), the aux dict of its single call. extras: optional values to add ("recall", in
    training). Uses flax's nnx.capture, so nothing stays sown on the modules and a compiled
    model keeps its structure. The values are traced arrays of the enclosing computation (use
    them inside it)."""
    layers = list(layers)
    for layer in layers:
        layer.reporting = frozenset(extras)
    try:
        result, sown = nnx.capture(fn, SurgeryAux)(root, *args, **kwargs)
    finally:
        for layer in layers:
            layer.reporting = None
    records = [variable.get_value()[-1]
               for _, variable in sorted(nnx.to_flat_state(sown), key=lambda item: item[0])]
    if len(records) != len(layers):
        raise RuntimeError(f"{len(layers)} surgical layers were asked to report, "
                           f"{len(records)} did")
    return result, records

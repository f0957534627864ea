"""The route-aware KV cache of a surgical model: one pallas_kernels.decode.RouteCache per layer.

    caches = init_route_caches(model, batch, max_len)          # model in evaluation mode
    logits, caches = model(prompt_chunk, cache=caches)          # prefill, any chunk sizes
    caches = with_read_pages(caches, read_pages(caches))        # bound for the next token
    logits, caches = model(token[:, None], cache=caches)        # reads its cluster's pages only

Each layer's RouteCache keeps the keys in position order plus, per (batch, query head,
cluster), a block table of the positions routed there. A one-token call appends the token
and runs decode_attention: it gathers the token's own cluster's pages, the window and the
sink, never the whole cache. A call of several tokens (a prefill chunk) appends them and runs
the exact masked attention of the chunk against the stored keys ([T, S_max] per head).

Token i of a route cache sits at slot i: there is no padding mask (prompts of different
lengths decode as separate batches, see run/generate.py), and positions default to the slots.
`read_pages` is the static number of pages a decode step gathers per (batch, head); it must
cover the largest cluster after the append, which `read_pages(caches)` bounds from the
stored counts (bucketed to a power of two, so it changes, and recompiles, O(log S) times).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.common import cdiv
from pallas_kernels.decode import RouteCache, init_route_cache

DEFAULT_PAGE_SIZE = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerRouteCache:
    """One surgical layer's route cache and the pages its next decode step reads (static)."""
    route: RouteCache
    read_pages: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def length(self):
        return self.route.length


def num_clusters(surgery_config) -> int:
    """Cluster ids of the hard topology: arity ** (L - d_max)."""
    return surgery_config.arity ** surgery_config.cut_level


def route_cache_problem(model, max_len: int) -> Optional[str]:
    """Why `model` cannot decode with a route cache of max_len tokens, or None when it can."""
    from ultrametric_jax.surgery.inject import surgical_layers  # inject imports attention
    if getattr(getattr(model, "model", None), "layers", None) is None:
        return "the model is not a Llama with decoder layers (it uses the dense cache)"
    layers = surgical_layers(model)
    if not layers or len(layers) != len(model.model.layers):
        return "the model carries no ultrametric topology (a base model uses the dense cache)"
    if any(attn.as_base for attn in layers):
        return "the surgical layers run as the base model (base_model_mode)"
    if not all(attn.deterministic for attn in layers):
        return "a KV cache is only supported in evaluation mode (model.eval())"
    if any(attn.selector is not None for attn in layers):
        return ("the layers hold key selectors (key_rank > 0): a query reads keys beyond its "
                "cluster's pages, so they decode with the dense cache")
    clusters = num_clusters(layers[0].surgery_config)
    # One block table row per cluster: beyond max_len clusters the index outgrows the keys.
    if clusters > max_len:
        return (f"the topology has {clusters} clusters (arity**(L - d_max)), more than the "
                f"{max_len} tokens of the cache: its page tables would outgrow the keys")
    return None


def init_route_caches(model, batch: int, max_len: int, *, page_size: int = DEFAULT_PAGE_SIZE,
                      dtype=None) -> list[LayerRouteCache]:
    """An empty route cache per layer of a surgical model in evaluation mode (ValueError
    naming the reason otherwise). dtype: of the stored keys and values (the model's)."""
    problem = route_cache_problem(model, max_len)
    if problem:
        raise ValueError(f"no route cache: {problem}")
    c = model.config
    clusters = num_clusters(model.model.layers[0].self_attn.surgery_config)
    page_size = min(page_size, 1 << (max_len - 1).bit_length())   # a tiny cache: one page
    dtype = dtype or model.dtype
    return [LayerRouteCache(init_route_cache(batch, max_len, c.num_key_value_heads, c.head_dim,
                                             c.num_attention_heads, clusters,
                                             page_size=page_size, dtype=dtype))
            for _ in range(c.num_hidden_layers)]


def largest_cluster(caches) -> jax.Array:
    """int32 scalar: tokens in the largest cluster of any layer, batch row and head."""
    return jnp.max(jnp.stack([jnp.max(c.route.counts) for c in caches]))


def pages_for(tokens: int, caches) -> int:
    """Pages (a power of two, at most a whole table) holding `tokens` keys of one cluster."""
    route = caches[0].route
    pages = max(cdiv(int(tokens), route.page_size), 1)
    return min(1 << (pages - 1).bit_length(), route.table.shape[-1])


def read_pages(caches, new_tokens: int = 1) -> int:
    """A read_pages that serves the next call of new_tokens tokens: the largest cluster
    can grow by new_tokens at most (one host sync)."""
    return pages_for(int(largest_cluster(caches)) + new_tokens, caches)


def with_read_pages(caches, pages: int) -> list[LayerRouteCache]:
    """The caches with every layer's decode step reading `pages` pages per (batch, head)."""
    return [dataclasses.replace(c, read_pages=int(pages)) for c in caches]

"""The base model with every attention layer's row probabilities replaced: the forward that
mask baselines and oracles share (the sink + window mask of window_baseline.py; the masks of
experiments/mask_oracles.py, built here: the per-row top fraction, the most-attended keys, one
probability threshold, clusters of a head's own attention, one key set per group of queries,
one set of key blocks per query block, the key set a query block takes from the block before
it, and scores estimated at low rank). The routers of a surgical model are not used.

`probabilities(layer, scores, causal)` gets layer's scaled float32 scores [B, H, S, S] and the
causal mask of real keys [B, 1, S, S], and returns the row probabilities (masked_softmax of
some mask, usually); with `with_qk`, also the layer's queries, scaled so that q . k is the
score, [B, S, H, D], and keys [B, S, G, D] (RoPE applied to both).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ultrametric_jax.model import llama
from ultrametric_jax.surgery.key_selector import key_gram

# (layer, scores, causal[, q, k]) -> row probabilities
Probabilities = Callable[..., jax.Array]


def restricted_logits(model, input_ids, attention_mask, probabilities: Probabilities,
                      with_qk: bool = False):
    """float32 logits [B, S, V] of `model`'s base parameters (plain or surgical Llama) with the
    attention rows of layer l given by probabilities(l, scores, causal), or with with_qk by
    probabilities(l, scores, causal, q * scale, k)."""
    config = model.config
    positions = llama.default_positions(input_ids)
    causal = llama.causal_mask(positions, positions, attention_mask)
    x = model.model.embed_tokens(input_ids)
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, v = llama.project_qkv(config, attn.q_proj, attn.k_proj, attn.v_proj,
                                    layer.input_layernorm(x), positions)
        extra = (q.astype(jnp.float32) * attn.scale, k.astype(jnp.float32)) if with_qk else ()
        out = llama.grouped_attention(
            q, k, v, attn.scale,
            lambda scores, index=index, extra=extra: probabilities(index, scores, causal, *extra))
        x = x + attn.o_proj(out.reshape(*out.shape[:2], -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.logits(model.model.norm(x))


def top_fraction_mask(scores, causal, fraction: float, iterations: int = 24):
    """bool [B, H, S, S]: per query row i, the ceil(fraction * n_i) causal keys with the highest
    scores (n_i the row's causal keys), ties at the threshold kept. The threshold is found by
    bisection on the score range (iterations halvings of it), so no S x S sort is needed; rows
    keep at least their quota."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    causal = jnp.broadcast_to(causal, scores.shape)
    quota = jnp.ceil(fraction * jnp.sum(causal, -1, keepdims=True, dtype=jnp.float32))
    lo = jnp.min(jnp.where(causal, scores, jnp.inf), -1, keepdims=True)
    hi = jnp.max(jnp.where(causal, scores, -jnp.inf), -1, keepdims=True)
    kept = lambda t: jnp.sum(causal & (scores >= t), -1, keepdims=True, dtype=jnp.float32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        enough = kept(mid) >= quota
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
    return causal & (scores >= lo)


def top_keys_mask(scores, causal, local, density=None, pairs=None):
    """bool [B, H, S, S]: `local` (a mask every query keeps, e.g. sink + window) plus, for every
    later query, the keys that receive the most dense attention mass (the column sums of the
    causal softmax), taken in that order while the allowed pairs stay within density times the
    causal pairs of the row, or within `pairs` (float [B, H], a count per row and head; give
    one of the two). The keys every query may read, chosen by an oracle."""
    if (density is None) == (pairs is None):
        raise ValueError("top_keys_mask: give either density or pairs")
    causal = jnp.broadcast_to(causal, scores.shape)
    local = causal & jnp.broadcast_to(local, scores.shape)
    received = jnp.sum(llama.masked_softmax(scores, causal) * causal, axis=-2)      # [B, H, S]
    extra = jnp.sum(causal & ~local, axis=-2).astype(jnp.float32)   # pairs a key would add
    if pairs is None:
        pairs = density * jnp.sum(causal, (-2, -1), dtype=jnp.float32)
    budget = pairs - jnp.sum(local, (-2, -1), dtype=jnp.float32)                    # [B, H]
    order = jnp.argsort(-received, axis=-1, stable=True)
    fits = jnp.cumsum(jnp.take_along_axis(extra, order, -1), -1) <= budget[..., None]
    chosen = jnp.take_along_axis(fits, jnp.argsort(order, axis=-1), -1)            # key order
    return local | (causal & chosen[..., None, :])


def threshold_mask(scores, causal, log_threshold):
    """bool [B, H, S, S]: the causal pairs whose dense attention probability (softmax of the
    scores over the causal keys) is at least exp(log_threshold), and every causal diagonal pair
    (a row never goes empty). log_threshold may be traced."""
    causal = jnp.broadcast_to(causal, scores.shape)
    logp = jax.nn.log_softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
    diagonal = jnp.eye(scores.shape[-2], scores.shape[-1], dtype=bool)
    return causal & ((logp >= log_threshold) | diagonal)


def spectral_clusters(weights, clusters: int, key, power_steps: int = 40,
                      kmeans_steps: int = 20, active=None):
    """int32 [..., S]: the S tokens split into `clusters` groups by spectral clustering of the
    symmetric non-negative affinities weights [..., S, S]. The embedding is the top
    min(clusters, S) eigenvectors of D^-1/2 W D^-1/2 (power_steps of subspace iteration from a
    random start drawn from key), rows scaled to unit length; then k-means on the sphere
    (cosine assignment), its centres seeded farthest-first from token 0.

    active: int [...] (traced), or None for `clusters` everywhere: each matrix's own cluster
    count, in [1, clusters]; that matrix embeds on its top `active` eigenvectors and assigns
    only to its first `active` centres (one compiled shape for every count)."""
    if clusters < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    weights = weights.astype(jnp.float32)
    degree = jnp.sum(weights, -1) + 1e-12
    normalised = weights / jnp.sqrt(degree[..., :, None] * degree[..., None, :])
    dims = min(clusters, weights.shape[-1])      # an S-token embedding has at most S dimensions
    start = jax.random.normal(key, (*weights.shape[:-1], dims), jnp.float32)

    def power(basis, _):
        basis, _ = jnp.linalg.qr(normalised @ basis)
        return basis, None

    basis, _ = jax.lax.scan(power, start, None, length=power_steps)
    if active is None:
        active = jnp.full(weights.shape[:-2], clusters, jnp.int32)
    active = jnp.asarray(active, jnp.int32)[..., None]                             # [..., 1]
    # subspace iteration orders its columns by |eigenvalue|: the first `active` are the top ones
    basis = jnp.where(jnp.arange(dims) < active[..., None], basis, 0.0)
    embedding = basis / (jnp.linalg.norm(basis, axis=-1, keepdims=True) + 1e-12)   # [..., S, C]
    in_use = jnp.arange(clusters) < active                                         # [..., K]

    def seed(k, centres):
        # the token least similar to every centre chosen so far becomes centre k
        chosen = (jnp.arange(clusters) < k) & in_use[..., None, :]
        similarity = jnp.einsum("...sc,...kc->...sk", embedding, centres)
        closest = jnp.max(jnp.where(chosen, similarity, -jnp.inf), -1)               # [..., S]
        far = jnp.argmin(closest, -1)                                                 # [...]
        pick = jnp.take_along_axis(embedding, far[..., None, None], -2)[..., 0, :]
        return centres.at[..., k, :].set(pick)

    centres = jnp.zeros((*weights.shape[:-2], clusters, dims), jnp.float32)
    centres = centres.at[..., 0, :].set(embedding[..., 0, :])
    centres = jax.lax.fori_loop(1, clusters, seed, centres)

    def assign(centres):
        similarity = jnp.einsum("...sc,...kc->...sk", embedding, centres)
        return jnp.argmax(jnp.where(in_use[..., None, :], similarity, -jnp.inf), -1)

    def update(centres, _):
        members = jax.nn.one_hot(assign(centres), clusters, dtype=jnp.float32)        # [..., S, K]
        total = jnp.einsum("...sk,...sc->...kc", members, embedding)
        norm = jnp.linalg.norm(total, axis=-1, keepdims=True)
        # an emptied centre keeps its place rather than becoming a zero vector
        return jnp.where(norm > 0, total / jnp.maximum(norm, 1e-12), centres), None

    centres, _ = jax.lax.scan(update, centres, None, length=kmeans_steps)
    return assign(centres).astype(jnp.int32)


def shared_key_affinity(probabilities, outside):
    """float32 [..., S, S]: how much two queries' dense attention outside the sink + window
    (`outside`, bool, broadcast to probabilities' shape) goes to the same keys, sum_j p_aj p_bj:
    the affinity of queries that would share one key set."""
    far = jnp.where(outside, probabilities, 0.0)
    return far @ jnp.swapaxes(far, -1, -2)


def cluster_keys_mask(scores, causal, local, ids, clusters: int, log_threshold,
                      centroid: bool = False, samples: int | None = None):
    """bool [B, H, S, S]: `local` (kept by every query) plus, for the queries of each cluster c
    (ids int [B, H, S] in [0, clusters)), the one key set of c: the keys j whose cluster
    probability passes exp(log_threshold) (traced), each query keeping the causal ones.

    The cluster probability of (c, j) is the mean of p_ij, the dense attention probability
    (softmax over the causal keys), over c's queries that may read j outside `local` (an
    oracle: a pair `local` keeps anyway does not ask for its key); with `samples` = m, over m
    of them only: the last query of each of m equal bins of c's queries in position order
    (what m computed rows per cluster estimate; the last query of c is always one, so every
    earlier key can be chosen). With centroid, the softmax over j of the
    cluster's mean score (1/|c|) sum_i s_ij = q_c . k_j, q_c the mean of c's queries, over the
    keys some member may read: what a key set chosen from the cluster's centre, not from its
    members' probabilities, keeps. With one cluster per query (ids = arange(S)), no centroid
    and no samples, it is threshold_mask without the diagonal, joined with `local`."""
    causal = jnp.broadcast_to(causal, scores.shape)
    outside = causal & ~jnp.broadcast_to(local, scores.shape)
    members = jax.nn.one_hot(ids, clusters, dtype=jnp.float32)                  # [B, H, S, C]
    readers = jnp.einsum("bhsc,bhsj->bhcj", members, outside.astype(jnp.float32))
    if centroid:
        size = jnp.sum(members, -2)[..., None]                                    # [B, H, C, 1]
        centre = jnp.einsum("bhsc,bhsj->bhcj", members, scores) / jnp.maximum(size, 1.0)
        score = jax.nn.log_softmax(jnp.where(readers > 0, centre, jnp.finfo(jnp.float32).min),
                                   axis=-1)
    else:
        if samples is not None:
            rank = jnp.cumsum(members, -2) - 1.0                 # rank within the cluster
            size = jnp.sum(members, -2, keepdims=True)
            last_of_bin = (jnp.floor((rank + 1) * samples / jnp.maximum(size, 1.0))
                           > jnp.floor(rank * samples / jnp.maximum(size, 1.0)))
            members = jnp.where(last_of_bin, members, 0.0)
            readers = jnp.einsum("bhsc,bhsj->bhcj", members, outside.astype(jnp.float32))
        p = jnp.where(outside, llama.masked_softmax(scores, causal), 0.0)
        mean = jnp.einsum("bhsc,bhsj->bhcj", members, p) / jnp.maximum(readers, 1.0)
        score = jnp.log(jnp.maximum(mean, jnp.finfo(jnp.float32).tiny))
    chosen = (readers > 0) & (score >= log_threshold)                            # [B, H, C, S]
    per_query = jnp.take_along_axis(chosen, ids[..., None], -2)  # [B, H, S, S] via the rows
    return causal & (per_query | jnp.broadcast_to(local, scores.shape))


def block_keys_mask(scores, causal, local, positions, block: int, log_threshold,
                    pooled: bool = False):
    """bool [B, H, S, S]: `local` plus, for the queries of each block a of `block` consecutive
    positions (positions int [B, S]), the key blocks b whose block score passes
    exp(log_threshold) (traced), each query keeping the causal pairs of its chosen blocks.

    The block score of (a, b) is the dense attention mass that a's queries put on b's keys
    outside `local`, averaged over a's real queries (an oracle: it reads the dense attention;
    mass that `local` keeps anyway does not ask for a block); with pooled, the
    softmax over the key blocks b <= a of the pooled score mean_{i in a, j in b} s_ij =
    q_a . k_b (q_a, k_b the blocks' mean query and key): what the blocks' means alone say, the
    estimate a block gate starts from."""
    causal = jnp.broadcast_to(causal, scores.shape)
    seq = scores.shape[-1]
    blocks = -(-seq // block)
    member = jax.nn.one_hot(positions // block, blocks, dtype=jnp.float32)       # [B, S, N]
    real = jnp.any(causal, -1).astype(jnp.float32)                               # [B, H, S]
    if pooled:
        size = jnp.sum(member, 1)                                                # [B, N]
        total = jnp.einsum("bsa,bhsj,bjc->bhac", member, scores, member)
        mean = total / jnp.maximum(size[:, None, :, None] * size[:, None, None, :], 1.0)
        ahead = jnp.arange(blocks)[None, :] > jnp.arange(blocks)[:, None]          # b > a
        score = jax.nn.log_softmax(jnp.where(ahead, jnp.finfo(jnp.float32).min, mean), -1)
    else:
        outside = causal & ~jnp.broadcast_to(local, scores.shape)
        p = jnp.where(outside, llama.masked_softmax(scores, causal), 0.0)
        mass = jnp.einsum("bsa,bhsj,bjc->bhac", member, p, member)
        queries = jnp.einsum("bsa,bhs->bha", member, real)[..., None]
        score = jnp.log(jnp.maximum(mass / jnp.maximum(queries, 1.0),
                                    jnp.finfo(jnp.float32).tiny))
    chosen = (score >= log_threshold).astype(jnp.float32)                        # [B, H, N, N]
    per_pair = jnp.einsum("bsa,bhac,bjc->bhsj", member, chosen, member) > 0
    return causal & (per_pair | jnp.broadcast_to(local, scores.shape))


def lagged_block_keys_mask(scores, causal, local, positions, block: int, log_threshold):
    """bool [B, H, S, S], causal end to end: `local`, each query's own block of `block`
    consecutive positions (positions int [B, S]; its causal part), and the key set that the
    previous block's queries chose: the keys j whose mean dense probability over the queries
    of block a - 1 that read j outside `local` passes exp(log_threshold) (traced) are open to
    every query of block a. The one key set per query block of cluster_keys_mask on
    consecutive blocks reads its own block's later queries; this one reads only queries that
    precede every query it serves, so a decoder can fix it when a block completes."""
    causal = jnp.broadcast_to(causal, scores.shape)
    seq = scores.shape[-1]
    blocks = -(-seq // block)
    ids = positions // block                                                      # [B, S]
    member = jax.nn.one_hot(ids, blocks, dtype=jnp.float32)                      # [B, S, N]
    outside = causal & ~jnp.broadcast_to(local, scores.shape)
    readers = jnp.einsum("bsa,bhsj->bhaj", member, outside.astype(jnp.float32))
    p = jnp.where(outside, llama.masked_softmax(scores, causal), 0.0)
    mean = jnp.einsum("bsa,bhsj->bhaj", member, p) / jnp.maximum(readers, 1.0)
    chosen = (readers > 0) & (jnp.log(jnp.maximum(mean, jnp.finfo(jnp.float32).tiny))
                              >= log_threshold)                                  # [B, H, N, S]
    # block a reads block a - 1's choice; block 0 has none
    lagged = jnp.concatenate([jnp.zeros_like(chosen[..., :1, :]), chosen[..., :-1, :]], -2)
    rows = jnp.broadcast_to(ids[:, None, :, None], (*scores.shape[:2], seq, 1))
    per_query = jnp.take_along_axis(lagged, rows, -2)                            # [B, H, S, S]
    own_block = ids[:, None, :, None] == ids[:, None, None, :]
    return causal & (per_query | own_block | jnp.broadcast_to(local, scores.shape))


def key_basis(gram, rank: int):
    """float32 [..., D, rank]: the top `rank` eigenvectors of the key Gram matrices gram
    [..., D, D] (symmetric), the directions a rank-r score estimate keeps."""
    dim = gram.shape[-1]
    if not 1 <= rank <= dim:
        raise ValueError(f"low_rank_scores: rank must lie in [1, {dim}] (the head dimension), "
                         f"got {rank}")
    _, vectors = jnp.linalg.eigh(gram)                                        # ascending
    return vectors[..., dim - rank:]


def low_rank_scores(q, k, rank: int, real, basis=None):
    """float32 [B, H, Sq, Sk]: the scores q . k with queries and keys projected on the top
    `rank` principal directions of the sequence's own real keys (real bool [B, Sk]), per kv
    head, or on a basis fitted elsewhere (basis [G, D, rank], e.g. key_basis of training rows'
    key_gram: then no key of the sequence, later ones included, shapes any query's estimate):
    an estimate of the scores at rank / D of their cost. q [B, Sq, H, D] (scaled), k
    [B, Sk, G, D]; query head h reads kv head h // (H // G). With rank = D the projection is
    the identity."""
    batch, q_len, heads, dim = q.shape
    groups = k.shape[2]
    if basis is None:
        basis = key_basis(key_gram(k, real), rank)                             # [B, G, D, r]
    else:
        if basis.shape != (groups, dim, rank):
            raise ValueError(f"low_rank_scores: basis has shape {tuple(basis.shape)}, expected "
                             f"(kv heads, head dimension, rank) = {(groups, dim, rank)}")
        basis = jnp.broadcast_to(basis, (batch, groups, dim, rank))
    kp = jnp.einsum("bsgd,bgdr->bgsr", k.astype(jnp.float32), basis)
    qp = jnp.einsum("bsgtd,bgdr->bgtsr",
                    q.astype(jnp.float32).reshape(batch, q_len, groups, heads // groups, dim),
                    basis)
    return jnp.einsum("bgtsr,bgjr->bgtsj", qp, kp).reshape(batch, heads, q_len, k.shape[1])

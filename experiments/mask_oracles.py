"""Masks of a fixed attention density on the frozen base model:
- the per-row top fraction of the scores (the same share of keys in every row);
- the most-attended keys opened to every query beside a sink + window;
- one threshold on the dense attention probability shared by every layer, head and row (the
  density goes where attention needs it);
- dense heads beside sink + window heads (the heads that keep least inside the window stay
  dense);
- the sink + window mask alone, and clusters drawn at random (the surgical mask of routes that
  carry no information);
- clusters of each head's own attention outside the window (spectral clustering) beside the
  sink + window: the best a partition of the tokens, what a tree's cut gives each head, keeps;
- the same with each head's cluster count allocated by the threshold mask (a head, row and
  layer that needs more pairs gets fewer, larger clusters): a partition with the threshold's
  allocation of density;
- the most-attended keys beside the sink + window, as many pairs per (row, head) as the
  threshold mask keeps there: keys every later query may read, with the threshold's allocation;
- each head its own sink + window, the windows fixed on the calibration rows so that every head
  keeps the same share of its dense attention mass outside the sink (realizable: a band per
  head); and one window per layer, the same for its heads;
- one key set per group of queries: queries grouped by the keys their attention shares, or in
  blocks of consecutive positions, each group keeping the keys its members' mean probability
  (or a few sampled members', its centre's score, or the mean of its members' low-rank score
  estimates) ranks above a threshold: a query's keys chosen by its group, not by a partition
  of the keys; and whole key blocks per query block, by their mass or by the blocks' mean
  query and key;
- causal forms of those, which a decoder can run: each query block takes the key set the
  previous block's queries chose (its own block kept whole), from the true scores or from
  scores estimated at low rank on a basis fitted on training rows; and each query its own keys
  by a threshold on such estimates.

  python experiments/mask_oracles.py                          # configs/mask_oracles.py
  python experiments/mask_oracles.py --toy                    # CPU: the tiny random Llama
  python experiments/mask_oracles.py --config.densities=0.25 --config.families=top_fraction

Every family runs through ultrametric_jax.run.restricted_attention (the base model with each
layer's attention rows replaced) on the held-out rows of the run config's corpus and of
config.extra_corpora, beside the dense model through the same code. Writes OUT/mask_oracles.json
(toy.json with --toy; rewritten after every row, "complete" once every setting has run) and a
PNG (perplexity against density, one panel per corpus); prints the table last. Each row also
says how much of the mask lies outside the sink + window on keys that most queries read: the
hub share, the allowed pairs there whose key at least half of its causal queries may read.
"""
from __future__ import annotations

import functools
import json
import math
import runpy
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_runs import CONFIGS, plot_per_corpus, sweep_setup, toy_model  # noqa: E402
from ultrametric_jax.model import llama  # noqa: E402
from ultrametric_jax.run.evaluate import _held_out_loss  # noqa: E402
from ultrametric_jax.run.data import eval_batches  # noqa: E402
from ultrametric_jax.run.key_selection import score_factors  # noqa: E402
from ultrametric_jax.run.pipeline import setup_run, write_json  # noqa: E402
from ultrametric_jax.run.restricted_attention import (  # noqa: E402
    block_keys_mask, cluster_keys_mask, key_basis, key_gram, lagged_block_keys_mask,
    low_rank_scores, restricted_logits, shared_key_affinity, spectral_clusters, threshold_mask,
    top_fraction_mask, top_keys_mask)
from ultrametric_jax.run.settings import RunConfig  # noqa: E402
from ultrametric_jax.run.window_baseline import (local_density, local_mask,  # noqa: E402
                                                 window_for_density)
from ultrametric_jax.surgery.losses import token_cross_entropy  # noqa: E402
from ultrametric_jax.surgery.tree import allowed_mask  # noqa: E402

CONFIG = CONFIGS / "mask_oracles.py"
TRAINING_CORPUS = "held-out plays"     # the run config's own corpus (Shakespeare)'s held-out split
FAMILIES = ("dense", "top_fraction", "top_keys", "threshold", "head_choice", "window",
            "random_clusters", "spectral_partition", "allocated_partition", "allocated_window",
            "layer_window", "allocated_top_keys", "cluster_keys", "chunk_keys",
            "chunk_centroid_keys", "low_rank_keys", "sampled_keys", "centroid_keys", "block_keys",
            "pooled_keys", "lagged_keys", "lagged_low_rank_keys", "low_rank_threshold",
            "bilinear_threshold")
CALIBRATED = ("threshold", "allocated_partition", "allocated_top_keys")   # the threshold's t
OWN_THRESHOLD = ("cluster_keys", "chunk_keys", "chunk_centroid_keys", "low_rank_keys",
                 "sampled_keys", "centroid_keys", "block_keys", "pooled_keys", "lagged_keys",
                 "lagged_low_rank_keys", "low_rank_threshold", "bilinear_threshold")  # own t
FITTED_BASIS = ("lagged_low_rank_keys", "low_rank_threshold")  # rank-r basis of training rows
FITTED_BILINEAR = ("bilinear_threshold",)     # rank-r score estimate fitted on training rows
WINDOWED = ("allocated_window", "layer_window")       # families with a window per head


def run_config(config, base: str, out: Path) -> RunConfig:
    """The base run config at the experiment's length, dtype and held-out corpora."""
    c = runpy.run_path(base)["get_config"]()
    if config.toy_model:
        c.model.path = toy_model(out)
    elif config.model_path:
        c.model.path = config.model_path
    c.model.dtype = config.dtype
    c.train.seq_len = c.surgery.max_len = config.seq_len
    c.eval.batches, c.eval.batch_size = config.batches, 1
    c.eval.extra_corpora, c.eval.extra_max_chars = config.extra_corpora, config.extra_max_chars
    return RunConfig.from_config_dict(c)


def clusters_for(target: float, seq: int, window: int, sink: int) -> int:
    """The cluster count C whose expected density, local + (1 - local) / C, is nearest target."""
    local = local_density(seq, window, sink)
    if target <= local:
        raise ValueError(f"clusters: density {target} is at or below the window and "
                         f"sink's own {local:.3f} at seq_len {seq}")
    return max(1, round((1.0 - local) / (target - local)))


class Layer(NamedTuple):
    """What a family's mask sees of one layer: its scaled float32 scores [B, H, S, S], the
    causal mask of real keys [B, 1, S, S], the sink + window mask `local` [B, 1, S, S] of the
    setting's window and sink, the positions [B, S], the traced per-run inputs (log_threshold,
    dense_heads, head_windows, bases: the key bases [layers, G, D, r] fitted on training rows,
    or an empty array), the setting's static values `s`, and the layer's queries (scaled) and
    keys."""
    index: int
    scores: jax.Array
    causal: jax.Array
    local: jax.Array
    positions: jax.Array
    log_threshold: jax.Array
    dense_heads: jax.Array
    head_windows: jax.Array
    bases: jax.Array
    s: dict
    q: jax.Array                          # [B, S, H, D], q . k the scores
    k: jax.Array                          # [B, S, G, D]


def _key(l: Layer):
    return jax.random.fold_in(jax.random.key(l.s["seed"]), l.index)


def _partition(l: Layer, allocated: bool):
    """Clusters of the head's own attention outside the sink + window, made symmetric."""
    outside = jnp.broadcast_to(l.causal, l.scores.shape) & ~l.local
    far = jnp.where(outside, llama.masked_softmax(l.scores, l.causal), 0.0)
    active = (allocated_clusters(threshold_mask(l.scores, l.causal, l.log_threshold), outside,
                                 l.s["clusters"]) if allocated else None)
    return spectral_clusters(far + jnp.swapaxes(far, -1, -2), l.s["clusters"], _key(l),
                             l.s["power_steps"], l.s["kmeans_steps"], active)


def _random_partition(l: Layer):
    b, h, seq = l.scores.shape[:3]
    return jax.random.randint(_key(l), (b, h, seq), 0, l.s["clusters"])


def _head_bands(l: Layer):
    distance = l.positions[:, None, :, None] - l.positions[:, None, None, :]
    return jnp.broadcast_to(l.causal, l.scores.shape) & (
        (distance < l.head_windows[l.index][None, :, None, None])
        | (l.positions[:, None, None, :] < l.s["sink"]))


def _query_groups(l: Layer, groups: str):
    """int32 [B, H, S]: the query groups of the key-set families: spectral clusters of how much
    the queries' dense attention outside the sink + window goes to the same keys, or `chunks`
    of consecutive positions (one key set per query block, the grain of block-sparse
    attention that selects key blocks per query block)."""
    b, h, seq = l.scores.shape[:3]
    if groups == "chunks":
        return jnp.broadcast_to((l.positions // _chunk(l))[:, None, :], (b, h, seq)).astype(
            jnp.int32)
    outside = jnp.broadcast_to(l.causal, l.scores.shape) & ~l.local
    affinity = shared_key_affinity(llama.masked_softmax(l.scores, l.causal), outside)
    return spectral_clusters(affinity, l.s["clusters"], _key(l), l.s["power_steps"],
                             l.s["kmeans_steps"])


def _allocated_top_keys(l: Layer):
    # as many pairs per (row, head) as the threshold mask keeps there
    kept = jnp.sum(threshold_mask(l.scores, l.causal, l.log_threshold), (-2, -1),
                   dtype=jnp.float32)
    return top_keys_mask(l.scores, l.causal, l.local, pairs=kept)


def _chunk(l: Layer) -> int:
    """The key-set families' block of consecutive queries: S / clusters, rounded up."""
    return -(-l.scores.shape[-1] // l.s["clusters"])


def _fitted_scores(l: Layer):
    """The scores estimated at the setting's rank on the basis fitted on training rows."""
    return low_rank_scores(l.q, l.k, l.s["rank"], None, basis=l.bases[l.index])


# family -> the allowed pairs [B, H, S, S] of one layer (the partition families: cluster ids
# [B, H, S] instead, which the sink + window joins)
MASKS = {
    "dense": lambda l: jnp.broadcast_to(l.causal, l.scores.shape),
    "top_fraction": lambda l: top_fraction_mask(l.scores, l.causal, l.s["fraction"],
                                                l.s["steps"]),
    "top_keys": lambda l: top_keys_mask(l.scores, l.causal, l.local, l.s["fraction"]),
    "allocated_top_keys": _allocated_top_keys,
    "block_keys": lambda l: block_keys_mask(l.scores, l.causal, l.local, l.positions,
                                            l.s["block"], l.log_threshold),
    "pooled_keys": lambda l: block_keys_mask(l.scores, l.causal, l.local, l.positions,
                                             l.s["block"], l.log_threshold, pooled=True),
    "threshold": lambda l: threshold_mask(l.scores, l.causal, l.log_threshold),
    "head_choice": lambda l: jnp.where(l.dense_heads[l.index][None, :, None, None], l.causal,
                                       l.local),
    "window": lambda l: jnp.broadcast_to(l.local, l.scores.shape),
    "allocated_window": _head_bands,
    "layer_window": _head_bands,
    "lagged_keys": lambda l: lagged_block_keys_mask(l.scores, l.causal, l.local, l.positions,
                                                    _chunk(l), l.log_threshold),
    "lagged_low_rank_keys": lambda l: lagged_block_keys_mask(
        _fitted_scores(l), l.causal, l.local, l.positions, _chunk(l), l.log_threshold),
    "low_rank_threshold": lambda l: threshold_mask(_fitted_scores(l), l.causal,
                                                   l.log_threshold) | (l.causal & l.local),
    # bases holds, for this family, the estimates A [layers, H, D, D]: scores q^T A k
    "bilinear_threshold": lambda l: threshold_mask(
        jnp.einsum("bshd,hde,bjhe->bhsj", l.q,
                   l.bases[l.index],
                   jnp.repeat(l.k, l.q.shape[2] // l.k.shape[2], axis=2)),
        l.causal, l.log_threshold) | (l.causal & l.local),
}
PARTITIONS = {
    "random_clusters": _random_partition,
    "spectral_partition": lambda l: _partition(l, allocated=False),
    "allocated_partition": lambda l: _partition(l, allocated=True),
}


def _key_sets(l: Layer, groups: str, low_rank: bool = False, **options):
    """(query groups [B, H, S], allowed pairs): one key set per group, chosen from the true
    scores, or with low_rank from scores estimated at the setting's rank (the attention itself
    reads the true scores either way)."""
    ids = _query_groups(l, groups)
    chooser = (low_rank_scores(l.q, l.k, l.s["rank"], jnp.any(l.causal, -2)[:, 0]) if low_rank
               else l.scores)
    return ids, cluster_keys_mask(chooser, l.causal, l.local, ids, l.s["clusters"],
                                  l.log_threshold, **options)


# family -> (query groups, allowed pairs) of one layer: one key set per group of queries
KEY_SETS = {
    "cluster_keys": lambda l: _key_sets(l, "spectral"),
    "chunk_keys": lambda l: _key_sets(l, "chunks"),
    "chunk_centroid_keys": lambda l: _key_sets(l, "chunks", centroid=True),
    "low_rank_keys": lambda l: _key_sets(l, "chunks", low_rank=True),
    "sampled_keys": lambda l: _key_sets(l, "spectral", samples=l.s["samples"]),
    "centroid_keys": lambda l: _key_sets(l, "spectral", centroid=True),
}


@functools.partial(nnx.jit, static_argnames=("family", "fraction", "window", "sink", "clusters",
                                             "steps", "seed", "power_steps", "kmeans_steps",
                                             "samples", "block", "rank"))
def _masked_cross_entropy(model, input_ids, mask, log_threshold, dense_heads, head_windows,
                          bases, **static):
    """((CE sum, count), (pair_counts per layer, 4 arrays [layers], then group ids)) of the
    base model under one family (log_threshold, traced, is the threshold family's: no
    recompilation while it is searched; dense_heads, bool [layers, heads], head_choice's;
    head_windows, int [layers, heads], the per-head window families'; bases [layers, G, D,
    r], the fitted-basis families' (empty for the others); the group ids
    [layers, B, H, S] are the partition and key-set families' clusters or query groups, empty
    for the others)."""
    positions = llama.default_positions(input_ids)
    local = local_mask(positions, mask, static["window"], static["sink"])
    counts, partitions = [], []

    def probabilities(layer, scores, causal, q, k):
        view = Layer(layer, scores, causal, local, positions, log_threshold, dense_heads,
                     head_windows, bases, static, q, k)
        if static["family"] in PARTITIONS:
            ids = PARTITIONS[static["family"]](view)
            if static["family"] != "random_clusters":
                partitions.append(ids)
            allowed = allowed_mask(positions, positions, ids, ids, static["window"],
                                   static["sink"], mask)
        elif static["family"] in KEY_SETS:
            ids, allowed = KEY_SETS[static["family"]](view)
            partitions.append(ids)
        else:
            allowed = MASKS[static["family"]](view)
        counts.append(pair_counts(allowed, causal, local))
        return llama.masked_softmax(scores, allowed)

    logits = restricted_logits(model, input_ids, mask, probabilities, with_qk=True)
    ids = jnp.stack(partitions) if partitions else jnp.zeros((0,), jnp.int32)
    pairs = tuple(jnp.stack(c) for c in zip(*counts)) + (ids,)
    return token_cross_entropy(logits, input_ids, mask), pairs


def pair_counts(allowed, causal, local):
    """float32 (allowed pairs, causal pairs, allowed pairs outside `local`, those of them whose
    key is allowed for at least half of its causal queries: a key most later queries read).
    float32 sums: B x H x S^2 pairs over every layer pass int32's range from 4k tokens."""
    causal = jnp.broadcast_to(causal, allowed.shape)
    far = allowed & ~jnp.broadcast_to(local, allowed.shape)
    readers = jnp.sum(allowed, -2, dtype=jnp.float32)                            # [B, H, S]
    hub = 2 * readers >= jnp.sum(causal, -2, dtype=jnp.float32)
    return (jnp.sum(allowed, dtype=jnp.float32), jnp.sum(causal, dtype=jnp.float32),
            jnp.sum(far, dtype=jnp.float32), jnp.sum(far & hub[..., None, :], dtype=jnp.float32))


def allocated_clusters(kept, outside, most: int) -> jax.Array:
    """int32 [B, H]: each (row, head)'s cluster count C = n / k rounded half up, clipped to
    [1, most], where n counts its causal pairs outside the sink + window (`outside`) and k
    those of them the mask `kept` keeps (C = most when k = 0): C equal clusters keep about
    1 / C of those pairs. Integer counts, so that a ratio of exactly x.5 rounds one way."""
    n = jnp.sum(outside, (-2, -1), dtype=jnp.int32)
    k = jnp.sum(kept & outside, (-2, -1), dtype=jnp.int32)
    nearest = (2 * n + k) // jnp.maximum(2 * k, 1)
    return jnp.where(k > 0, jnp.clip(nearest, 1, most), most).astype(jnp.int32)


def no_dense_heads(model) -> jax.Array:
    return jnp.zeros((model.config.num_hidden_layers, model.config.num_attention_heads), bool)


def evaluate(model, batches, log_threshold=0.0, dense_heads=None, head_windows=None,
             bases=None, record=False, **settings) -> dict:
    """Perplexity, measured density (allowed / causal pairs over every layer and head), the
    density of each layer, and the hub share: of the allowed pairs outside the setting's sink +
    window, the share whose key at least half of its causal queries may read; with record,
    also the partition families' cluster ids, or the key-set families' query groups, of every
    batch ("partitions": [layers, B, H, S] each)."""
    pairs = []                       # device values: one host sync, at the end

    def visit(counts, _mask):
        pairs.append(counts)

    def forward(model, input_ids, mask):
        heads = no_dense_heads(model) if dense_heads is None else jnp.asarray(dense_heads)
        windows = (jnp.zeros(heads.shape, jnp.int32) if head_windows is None
                   else jnp.asarray(head_windows, jnp.int32))
        fitted = jnp.zeros((0,), jnp.float32) if bases is None else jnp.asarray(bases)
        return _masked_cross_entropy(model, input_ids, mask, jnp.float32(log_threshold), heads,
                                     windows, fitted, **settings)

    result = _held_out_loss(forward, model, batches, visit)
    allowed, causal, far, to_hubs = (np.sum([np.asarray(c[i], np.float64) for c in pairs], 0)
                                     for i in range(4))
    out = {**result, "density": float(allowed.sum() / max(causal.sum(), 1.0)),
           "density_per_layer": (allowed / np.maximum(causal, 1.0)).tolist(),
           "hub_share": float(to_hubs.sum() / max(far.sum(), 1.0))}
    if record:
        out["partitions"] = [np.asarray(c[4]) for c in pairs]
    return out


@nnx.jit
def _key_grams(model, input_ids, mask):
    """float32 [layers, G, D, D]: every layer's key_gram (RoPE applied) summed over the batch."""
    grams = []
    real = mask.astype(bool)

    def probabilities(_layer, scores, causal, _q, k):
        grams.append(jnp.sum(key_gram(k, real), 0))
        return llama.masked_softmax(scores, causal)

    restricted_logits(model, input_ids, mask, probabilities, with_qk=True)
    return jnp.stack(grams)


def fitted_bilinear(model, batches, rank: int) -> jax.Array:
    """float32 [layers, H, D, D]: per layer and query head, the rank-r score estimate
    A = W_q W_k^T of the key selectors (run/key_selection.score_factors) fitted on `batches`
    (training rows)."""
    w_q, w_k = score_factors(model, batches, rank)
    return w_q @ jnp.swapaxes(w_k, -1, -2)


def fitted_bases(model, batches, rank: int) -> jax.Array:
    """float32 [layers, G, D, rank]: per layer and kv head, the top `rank` principal directions
    of the keys of `batches` (training rows: the held-out rows the families are measured on
    play no part in it)."""
    gram = sum(_key_grams(model, jnp.asarray(b["input_ids"]),
                          jnp.asarray(b["attention_mask"], bool)) for b in batches)
    return key_basis(gram, rank)


LOWEST_LOG_THRESHOLD = -40.0          # exp(-40) = 4e-18: below any probability that matters


def calibrate_threshold(model, batches, target: float, steps: int, settings: dict,
                        own: bool = False, bases=None) -> float:
    """The threshold family's log t whose density over `batches` is the lowest found at or above
    target: bisection on log t in [LOWEST_LOG_THRESHOLD, 0] (the density falls as t rises), one
    forward per step. Whichever calibrated family asks first, the forward is compiled with the
    static values of the threshold family's own setting (plan: fraction = target, one
    cluster), which its evaluation then reuses: the threshold mask reads neither. own: the
    log t of the family of `settings` itself (one of OWN_THRESHOLD), searched the same way
    (with its fitted bases, if it reads any)."""
    statics = (dict(settings) if own
               else dict(settings, family="threshold", fraction=float(target), clusters=1))

    def density(log_t):
        return evaluate(model, batches, log_threshold=log_t, bases=bases, **statics)["density"]

    return bisect_for_density(density, LOWEST_LOG_THRESHOLD, 0.0, target, steps,
                              f"{statics['family']}: even at p >= exp({LOWEST_LOG_THRESHOLD})")


def bisect_for_density(density, permissive: float, strict: float, target: float, steps: int,
                       what: str) -> float:
    """The least permissive x found between `permissive` and `strict` whose density(x) is at
    or above target (density is monotone between them): `steps` halvings. Raises ValueError,
    naming `what`, when even `permissive` falls short."""
    if density(permissive) < target:
        raise ValueError(f"{what}, the density stays below the target {target}")
    for _ in range(steps):
        mid = (permissive + strict) / 2
        permissive, strict = (mid, strict) if density(mid) >= target else (permissive, mid)
    return permissive


def choose_dense_heads(model, batches, target: float, seq_len: int, window: int,
                       sink: int) -> np.ndarray:
    """bool [layers, heads]: the heads that stay dense so that the total density (every other
    head keeps the sink + window, local_density of them) meets target: those that keep the
    least of their dense attention mass inside the sink + window on `batches`."""
    mass, sink_mass = mass_profile(model, batches, sink)
    kept = sink_mass + mass[..., :window].sum(-1)                         # [layers, heads]
    local = local_density(seq_len, window, sink)
    dense = math.ceil(kept.size * max(0.0, target - local) / (1.0 - local) - 1e-9)
    chosen = np.zeros(kept.size, bool)
    chosen[np.argsort(kept.ravel(), kind="stable")[:dense]] = True
    return chosen.reshape(kept.shape)


@functools.partial(nnx.jit, static_argnames=("sink",))
def _mass_by_distance(model, input_ids, mask, *, sink):
    """(sum over real rows of the dense attention mass at each distance i - j to a key past
    the sink [layers, heads, S], the same of the mass on sink keys [layers, heads], real rows
    per head [layers, heads]) of the dense base model."""
    positions = llama.default_positions(input_ids)
    sums, sinks, rows = [], [], []

    def probabilities(_layer, scores, causal):
        p = llama.masked_softmax(scores, causal)                                 # [B, H, S, S]
        seq = p.shape[-1]
        key = jnp.arange(seq)[:, None] - jnp.arange(seq)[None, :]        # [query, distance]
        at = jnp.take_along_axis(p, jnp.broadcast_to(jnp.clip(key, 0), p.shape), -1)
        at = jnp.where(key >= sink, at, 0.0)     # a sink key at any distance counts as sink
        real = jnp.broadcast_to(jnp.any(causal, -1), p.shape[:-1])                # [B, H, S]
        sums.append(jnp.sum(jnp.where(real[..., None], at, 0.0), (0, 2)))
        on_sink = jnp.sum(p * (positions[:, None, None, :] < sink), -1)
        sinks.append(jnp.sum(jnp.where(real, on_sink, 0.0), (0, 2)))
        rows.append(jnp.sum(real, (0, 2), dtype=jnp.float32))
        return p

    restricted_logits(model, input_ids, mask, probabilities)
    return jnp.stack(sums), jnp.stack(sinks), jnp.stack(rows)


def mass_profile(model, batches, sink: int) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [layers, heads, S], [layers, heads]): the dense attention mass of an average
    real row of `batches` at each distance i - j to a key past the sink, and on the sink keys.
    A sink + window w keeps sink_mass + mass[..., :w].sum(-1)."""
    mass = sink_mass = rows = 0.0
    for batch in batches:
        m, s, r = _mass_by_distance(model, jnp.asarray(batch["input_ids"]),
                                    jnp.asarray(batch["attention_mask"], bool), sink=sink)
        mass = mass + np.asarray(m, np.float64)
        sink_mass = sink_mass + np.asarray(s, np.float64)
        rows = rows + np.asarray(r, np.float64)
    rows = np.maximum(rows, 1.0)
    return mass / rows[..., None], sink_mass / rows


def head_windows_for_mass(mass, sink_mass, share: float) -> np.ndarray:
    """int [layers, heads]: each head's smallest window w >= 1 that keeps at least `share` of
    its dense attention mass outside the sink (mass [layers, heads, S] by distance past the
    sink, sink_mass [layers, heads], both per row), S when none does. The sink is kept
    anyway; a head whose rows rest on it (mass there acts as "no update") still needs the
    window that holds the rest of its attention."""
    rest = np.maximum(1.0 - sink_mass, 1e-12)[..., None]
    kept = np.cumsum(mass, -1) / rest                        # kept[..., w - 1]: window w
    reach = kept >= share - 1e-12
    return np.where(reach.any(-1), np.argmax(reach, -1) + 1, mass.shape[-1])


def choose_head_windows(model, batches, target: float, seq_len: int, sink: int,
                        steps: int = 40, per_layer: bool = False) -> tuple[np.ndarray, float]:
    """(int [layers, heads], share): per-head windows that keep the same share of every head's
    dense attention mass outside the sink on `batches`, the share the lowest found (bisection,
    `steps` halvings) whose total density over seq_len tokens (window_baseline.local_density)
    is at or above target. per_layer: one window per layer, for its heads' mean mass."""
    mass, sink_mass = mass_profile(model, batches, sink)
    if per_layer:
        mass = np.broadcast_to(mass.mean(1, keepdims=True), mass.shape)
        sink_mass = np.broadcast_to(sink_mass.mean(1, keepdims=True), sink_mass.shape)

    def density(share):
        windows = head_windows_for_mass(mass, sink_mass, share)
        return np.mean([local_density(seq_len, int(w), sink) for w in windows.ravel()])

    share = bisect_for_density(density, 1.0, 0.0, target, steps,
                               "allocated_window: even with windows that keep all of the "
                               "mass")
    return head_windows_for_mass(mass, sink_mass, share), share


def plan(config) -> list[dict]:
    """The (family, target) settings: dense once, then every family at every density."""
    for family in config.families:
        if family not in FAMILIES[1:]:
            raise ValueError(f"unknown family {family!r} (known: {FAMILIES[1:]})")
    for name in ("query_clusters", "key_block", "key_samples", "key_rank", "basis_rows"):
        if config[name] < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    base = dict(fraction=1.0, window=config.window, sink=config.sink, clusters=1,
                steps=config.bisection_steps, seed=config.seed,
                power_steps=config.partition_power_steps,
                kmeans_steps=config.partition_kmeans_steps, samples=config.key_samples,
                block=config.key_block, rank=config.key_rank)
    out = [dict(base, family="dense", target=1.0)]
    for target in config.densities:
        for family in config.families:
            s = dict(base, family=family, target=float(target))
            if family in ("top_fraction", "top_keys", "threshold", "head_choice") + WINDOWED:
                s["fraction"] = float(target)
            elif family in KEY_SETS or family in ("lagged_keys",) + FITTED_BASIS + FITTED_BILINEAR:
                s["clusters"] = config.query_clusters
            elif family == "window":
                s["window"] = window_for_density(target, config.seq_len, config.sink)
            elif family == "allocated_partition":
                s["clusters"] = config.partition_max_clusters
            else:
                s["clusters"] = clusters_for(target, config.seq_len, config.window, config.sink)
            out.append(s)
    return out


STYLES = {"top_fraction": ("o", "tab:green", "top fraction of the scores (oracle)"),
          "top_keys": ("D", "tab:purple", "most-attended keys for all + window + sink (oracle)"),
          "threshold": ("*", "tab:olive", "one probability threshold for all layers (oracle)"),
          "head_choice": ("P", "tab:brown", "dense heads + sink and window heads"),
          "window": ("s", "tab:blue", "sink + window"),
          "random_clusters": ("^", "tab:red", "random clusters + window + sink"),
          "spectral_partition": ("v", "tab:orange",
                                 "clusters of each head's attention + window + sink (oracle)"),
          "allocated_top_keys": ("d", "tab:purple", "most-attended keys, pairs from the "
                                 "threshold (oracle)"),
          "allocated_window": ("h", "tab:cyan", "a window per head, the same mass kept"),
          "layer_window": ("8", "tab:gray", "a window per layer, the same mass kept"),
          "allocated_partition": ("X", "tab:pink", "clusters of each head's attention, counts "
                                  "from the threshold (oracle)"),
          "cluster_keys": ("p", "black", "one key set per query cluster (oracle)"),
          "chunk_keys": ("H", "tab:green", "one key set per block of queries (oracle)"),
          "chunk_centroid_keys": ("4", "tab:green", "one key set per block of queries, from "
                                  "its centre"),
          "low_rank_keys": ("x", "tab:purple", "one key set per block of queries, from "
                            "low-rank scores"),
          "sampled_keys": ("1", "tab:red", "one key set per query cluster, from sampled "
                           "queries"),
          "centroid_keys": (">", "dimgray", "one key set per query cluster, from its centre"),
          "block_keys": ("s", "black", "key blocks per query block, by their mass (oracle)"),
          "pooled_keys": ("o", "tab:olive", "key blocks per query block, from the blocks' "
                          "means"),
          "lagged_keys": ("<", "tab:blue", "each query block the previous block's key set "
                          "(oracle, causal)"),
          "lagged_low_rank_keys": ("3", "tab:brown", "the previous block's key set from "
                                   "fitted low-rank scores (causal)"),
          "low_rank_threshold": ("2", "tab:orange", "per query, a threshold on fitted low-rank "
                                 "scores (causal)"),
          "bilinear_threshold": ("1", "tab:green", "per query, a threshold on fitted bilinear "
                                 "rank-r scores (causal)")}


def plot(rows: list[dict], path: Path) -> None:
    def draw(ax, mine):
        for family, (marker, color, label) in STYLES.items():
            pts = sorted((r["density"], r["perplexity"]) for r in mine if r["family"] == family)
            if pts:
                ax.plot([100 * d for d, _ in pts], [p for _, p in pts], marker + "-",
                        color=color, label=label)
        return next(r for r in mine if r["family"] == "dense")["perplexity"]

    plot_per_corpus(rows, path, draw, "attention density (% of causal pairs)")


def print_table(rows: list[dict]) -> None:
    print("\n| family | corpus | target | density | per-layer density | to hub keys | "
          "perplexity | change vs dense | setting |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        layers = r["density_per_layer"]
        print(f"| {r['family']} | {r['corpus']} | {100 * r['target']:.0f}% | "
              f"{100 * r['density']:.1f}% | {min(layers):.2f}-{max(layers):.2f} | "
              f"{100 * r['hub_share']:.0f}% | {r['perplexity']:.3f} | {r['change_pct']:+.1f}% "
              f"| {r['setting']} |")


def describe(s: dict) -> str:
    local = f"window {s['window']}, sink {s['sink']}"
    threshold = f"p >= exp({s.get('log_threshold', 0.0):.4f})"
    windows = np.asarray(s.get("head_windows", 0))
    return {  # lazily: each family's setting holds only its own values
        "dense": lambda: "",
        "top_fraction": lambda: f"fraction {s['fraction']}",
        "top_keys": lambda: f"keys within {s['fraction']}, {local}",
        "threshold": lambda: f"{threshold} in every layer",
        "head_choice": lambda: f"{int(np.sum(s['dense_heads']))} dense heads, the others "
                               f"{local}",
        "window": lambda: local,
        "random_clusters": lambda: f"{s['clusters']} clusters, {local}",
        "spectral_partition": lambda: f"{s['clusters']} spectral clusters, {local}",
        "allocated_partition": lambda: f"<= {s['clusters']} spectral clusters per head from "
                                       f"{threshold}, {local}",
        "allocated_top_keys": lambda: f"keys within {threshold}'s pairs, {local}",
        "cluster_keys": lambda: f"{s['clusters']} query clusters, mean {threshold}, {local}",
        "chunk_keys": lambda: f"{s['clusters']} query blocks, mean {threshold}, {local}",
        "chunk_centroid_keys": lambda: f"{s['clusters']} query blocks, centre's {threshold}, "
                                       f"{local}",
        "low_rank_keys": lambda: f"{s['clusters']} query blocks, mean {threshold} of "
                                 f"rank-{s['rank']} scores, {local}",
        "sampled_keys": lambda: f"{s['clusters']} query clusters, mean {threshold} over "
                                f"{s['samples']} sampled queries each, {local}",
        "block_keys": lambda: f"blocks of {s['block']}, mean mass >= "
                              f"exp({s.get('log_threshold', 0.0):.4f}), {local}",
        "pooled_keys": lambda: f"blocks of {s['block']}, pooled {threshold}, {local}",
        "centroid_keys": lambda: f"{s['clusters']} query clusters, centre's {threshold}, "
                                 f"{local}",
        "lagged_keys": lambda: f"{s['clusters']} query blocks, each the previous one's mean "
                               f"{threshold}, {local}",
        "lagged_low_rank_keys": lambda: f"{s['clusters']} query blocks, each the previous "
                                        f"one's mean {threshold} of rank-{s['rank']} scores "
                                        f"(fitted basis), {local}",
        "low_rank_threshold": lambda: f"{threshold} of rank-{s['rank']} scores (fitted "
                                      f"basis), {local}",
        "bilinear_threshold": lambda: f"{threshold} of rank-{s['rank']} bilinear score "
                                      f"estimates (fitted), {local}",
        "layer_window": lambda: f"windows {windows.min()}-{windows.max()} by layer, "
                                f"sink {s['sink']}",
        "allocated_window": lambda: f"windows {windows.min()}-{windows.max()} (median "
                                    f"{int(np.median(windows))}), sink {s['sink']}",
    }[s["family"]]()


def main(argv=None):
    args, config, out, base = sweep_setup(argv, __doc__.splitlines()[0], CONFIG, runs=False)
    setup = setup_run(run_config(config, base, out), install=True)
    corpora = {TRAINING_CORPUS: setup.val_batches,
               **setup.extra_batches}
    rows, thresholds = [], {}          # one calibration per target, shared by the families
    bases = bilinear = None            # fitted once, on training rows, when a family asks
    training_rows = eval_batches(setup.train_data, 1, config.basis_rows)
    stem = "toy" if args.toy else "mask_oracles"

    def save(complete: bool) -> dict:
        # rewritten after every row: a run stopped early keeps what it measured
        result = dict(config=config.to_dict(), complete=complete, rows=rows)
        write_json(str(out / f"{stem}.json"), result)
        return result

    keys = ("family", "fraction", "window", "sink", "clusters", "steps", "seed", "power_steps",
            "kmeans_steps", "samples", "block", "rank")
    for s in plan(config):
        settings = {k: s[k] for k in keys}
        calibration = setup.val_batches[:config.calibration_rows]   # first in-domain rows only
        if s["family"] in FITTED_BASIS and bases is None:
            bases = fitted_bases(setup.model, training_rows, config.key_rank)
        if s["family"] in FITTED_BILINEAR and bilinear is None:
            bilinear = fitted_bilinear(setup.model, training_rows, config.key_rank)
        family_bases = (bases if s["family"] in FITTED_BASIS else
                        bilinear if s["family"] in FITTED_BILINEAR else None)
        if s["family"] in OWN_THRESHOLD:
            s["log_threshold"] = calibrate_threshold(setup.model, calibration, s["target"],
                                                     config.threshold_steps, settings, own=True,
                                                     bases=family_bases)
        elif s["family"] in CALIBRATED:
            if s["target"] not in thresholds:
                thresholds[s["target"]] = calibrate_threshold(
                    setup.model, calibration, s["target"], config.threshold_steps, settings)
            s["log_threshold"] = thresholds[s["target"]]
        elif s["family"] in WINDOWED:
            s["head_windows"], s["mass_share"] = choose_head_windows(
                setup.model, calibration, s["target"], config.seq_len, s["sink"],
                per_layer=s["family"] == "layer_window")
        elif s["family"] == "head_choice":
            s["dense_heads"] = choose_dense_heads(setup.model, calibration, s["target"],
                                                  config.seq_len, s["window"], s["sink"])
        heads, windows = s.get("dense_heads"), s.get("head_windows")
        for corpus, batches in corpora.items():
            r = evaluate(setup.model, batches, log_threshold=s.get("log_threshold", 0.0),
                         dense_heads=heads, head_windows=windows, bases=family_bases,
                         **settings)
            rows.append(dict(family=s["family"], target=s["target"], corpus=corpus,
                             setting=describe(s), log_threshold=s.get("log_threshold"),
                             dense_heads=None if heads is None else heads.tolist(),
                             head_windows=None if windows is None else windows.tolist(),
                             mass_share=s.get("mass_share"), **r))
            dense = next(d for d in rows if d["family"] == "dense" and d["corpus"] == corpus)
            rows[-1]["change_pct"] = 100 * (r["perplexity"] / dense["perplexity"] - 1)
            save(complete=False)
            print(f"{s['family']} {describe(s)} on {corpus}: perplexity {r['perplexity']:.3f} "
                  f"at density {100 * r['density']:.1f}%", flush=True)
    result = save(complete=True)
    plot(rows, out / f"{stem}.png")
    print(f"\nresults: {out / (stem + '.json')}, {out / (stem + '.png')}")
    print_table(rows)
    return json.loads(json.dumps(result, default=str))


if __name__ == "__main__":
    main()

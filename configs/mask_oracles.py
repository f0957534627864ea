"""Masks of a fixed attention density on the frozen base model (experiments/mask_oracles.py):
what any sparse attention of that density could keep, against what a plain sink + window and
content-free clusters keep.

  python experiments/mask_oracles.py [--config.seq_len=2048 --config.densities=0.25,0.1]
  python experiments/mask_oracles.py --toy        # CPU: the tiny random Llama, a few rows

Families (each at every density):
- top_fraction: per query row, the ceil(density * n) causal keys with the highest scores of
  the layer's own q and k (an oracle: it reads the scores it masks; no router can beat it at
  that density by much);
- top_keys: `window` and `sink`, plus the keys that receive the most dense attention (column
  sums), open to every later query, as many as the density allows (an oracle too: the keys a
  partition of the tokens cannot give every query);
- threshold: the pairs whose dense attention probability passes one threshold shared by every
  layer, head and row (plus the diagonal), the threshold found by bisection on the first
  calibration_rows in-domain rows so that their density meets the target (an oracle of
  allocation: layers, heads and rows that need more pairs take them; the other corpora's
  density shows how the same threshold transfers);
- head_choice: every head either dense or sink + window only (`window`, `sink`), the heads
  that keep the least of their dense attention mass inside the sink + window on the
  calibration rows staying dense, as many as the density allows (not an oracle: a fixed
  choice per head that any sparse kernel can run as dense heads plus a band);
- window: the sink + window mask whose density over seq_len is closest (window_baseline);
- random_clusters: each token's cluster drawn uniformly per (layer, head) among C clusters,
  plus `window` and `sink` (the surgical mask of routes that carry no information), C chosen
  so that the expected density meets the target;
- spectral_partition: as many clusters as random_clusters, but found per (layer, head) by
  spectral clustering of the head's own dense attention outside the sink + window (made
  symmetric), plus `window` and `sink`: an oracle partition, what the cut of a tree gives each
  head at its best (clusters are equivalence classes; a threshold mask is not);
- allocated_partition: spectral_partition with each (row, head)'s own cluster count, up to
  partition_max_clusters: n / k rounded half up, n its pairs outside the sink + window and k
  those of them the threshold mask of the same target keeps (the threshold family's
  allocation of density, given to a partition);
- allocated_window: a sink + window per head, the windows chosen on the calibration rows so
  that every head keeps the same share of its dense attention mass outside the sink (its mass
  at each distance, averaged over the rows), that share the lowest whose density meets the
  target (realizable: fixed bands, a window per head);
- layer_window: the same with one window per layer, for the mean mass of its heads;
- allocated_top_keys: top_keys with each (row, head)'s pairs (sink + window included) those
  the threshold mask of the same target keeps there (an oracle: global keys with the
  threshold's allocation of density);
- cluster_keys: the queries of each (layer, head) split into query_clusters groups by spectral
  clustering of how much their dense attention outside the sink + window goes to the same keys
  (sum_j p_aj p_bj), each group keeping the keys whose mean probability over its members passes
  a threshold of its own, found by bisection like threshold's (an oracle: per-group key
  choice, the grain between a partition and per-query choice);
- chunk_keys: cluster_keys with query_clusters blocks of consecutive queries for groups (the
  grain of block-sparse attention that picks key blocks per query block; no routes at all);
- chunk_centroid_keys: chunk_keys' blocks, each keeping the keys its centre's score ranks
  above the threshold (as centroid_keys below): a per-key choice from the block's mean query;
- low_rank_keys: chunk_keys' blocks, each keeping the keys whose mean probability passes its
  threshold under scores estimated at rank key_rank (queries and keys projected on the top
  key_rank principal directions of the row's own keys, per kv head): a per-key choice from a
  cheap estimate of every member's scores, no oracle;
- sampled_keys: cluster_keys with each group's mean probability taken over key_samples of its
  queries only (the last of each of key_samples equal rank bins): what computing a few rows
  per cluster, not the dense attention, tells;
- block_keys: blocks of key_block consecutive queries, each keeping the key blocks on which its
  queries' mean dense attention mass passes a threshold of its own (an oracle at the grain a
  block-sparse kernel runs: whole key blocks per query block);
- pooled_keys: the same blocks chosen by the softmax of the blocks' mean query against each
  block's mean key (no training, no dense attention: the estimate a block gate starts from);
- lagged_keys: chunk_keys' blocks, each query block reading the key set the previous block's
  queries chose (their mean probability passing the threshold) and its own block whole: every
  query's keys fixed by earlier queries only (causal; an oracle of the previous block);
- lagged_low_rank_keys: lagged_keys with the choice made on scores estimated at rank key_rank
  on a basis fitted on basis_rows training rows (the top principal directions of their keys,
  per layer and kv head): causal end to end, no oracle, what a decoder can run;
- low_rank_threshold: per query, the causal keys whose probability under those fitted
  low-rank scores passes a threshold, beside the sink + window (a per-query selector);
- bilinear_threshold: low_rank_threshold with the estimate of the key selectors
  (surgery/key_selector.py): per query head, (W_q^T q) . (W_k^T k) at rank key_rank, the
  least-squares bilinear estimate of the scores on basis_rows training rows (their queries'
  second moment and keys' covariance), where low_rank_threshold projects both on the keys'
  principal directions;
- centroid_keys: the cluster_keys groups, each keeping the keys that the softmax of its
  centre's scores (the mean query of the group) ranks above the threshold: a key set a router
  could compute from the group alone.
get_config("toy") is the small CPU variant the tests run.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "mask_oracles"
    config.base_config = "smollm2_long.py"   # model, data and corpora come from this run config
    config.model_path = ""                   # "" keeps the base config's model
    config.dtype = "float32"
    config.seq_len = 2048
    config.batches = 3                       # held-out rows per corpus (batch size 1)
    config.extra_corpora = "stdlib"          # out of domain, besides the held-out plays
    config.extra_max_chars = 400_000
    config.densities = (0.25, 0.10)
    config.families = ("top_fraction", "top_keys", "threshold", "head_choice", "window",
                       "random_clusters", "spectral_partition", "allocated_partition",
                       "allocated_window", "layer_window", "allocated_top_keys",
                       "cluster_keys", "chunk_keys", "chunk_centroid_keys", "low_rank_keys",
                       "sampled_keys", "centroid_keys", "block_keys", "pooled_keys",
                       "lagged_keys", "lagged_low_rank_keys", "low_rank_threshold",
                       "bilinear_threshold")
    config.window = 64                       # top_keys' and random_clusters' window and sink
    config.sink = 1
    config.bisection_steps = 24              # top_fraction's threshold search
    config.threshold_steps = 14              # threshold's and the key-set families' bisection
                                             # (one forward each)
    config.partition_power_steps = 40        # spectral_partition's subspace iteration
    config.partition_kmeans_steps = 20       # and its k-means steps
    config.partition_max_clusters = 64       # allocated_partition's most clusters per head
    config.query_clusters = 16               # the key-set families' query groups per head
    config.key_block = 64                    # block_keys' and pooled_keys' block of positions
    config.key_samples = 8                   # sampled_keys' queries per group
    config.key_rank = 16                     # low_rank_keys' rank of the score estimate
    config.basis_rows = 2                    # training rows the fitted families' key bases
                                             # and score estimates are fitted on
    config.calibration_rows = 1              # in-domain held-out rows threshold and head_choice
                                             # are calibrated on
    config.seed = 0
    config.toy_model = False

    if variant == "toy":
        config.base_config = "tiny_random.py"
        config.toy_model = True
        config.seq_len = 32
        config.batches = 2
        config.extra_max_chars = 20_000
        config.densities = (0.5, 0.3)
        config.window, config.sink = 4, 1
        config.bisection_steps = 48
        config.partition_max_clusters = 8
        config.query_clusters = 4
        config.key_samples = 2
        config.key_block = 4
        config.key_rank = 4
        config.basis_rows = 1
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'toy')")
    return config

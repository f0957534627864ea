"""Topological ring attention (experiments/ring_pruning.py): which (head, device-pair) KV
transfers the routes make useless when the sequence is split over N devices, and a ring that
skips them, timed against the plain ring and one device.

  python experiments/ring_pruning.py [--toy] [--run-dir RUN] [--config.run.seq_len=16384 ...]

get_config("toy") is the small CPU variant the tests run.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "ring_pruning"
    config.seed = 0

    # (a) Analysis: routes as digit strings (level 0 the root) per head, cut at
    # levels - d_max into cluster ids; the sequence split in N contiguous chunks.
    config.analysis = ml_collections.ConfigDict()
    config.analysis.seq_len = 8192
    config.analysis.heads = 32
    config.analysis.arity = 2
    config.analysis.levels = 13          # ceil(log2(seq_len))
    config.analysis.d_max = 6
    config.analysis.window = 128
    config.analysis.sink = 1
    config.analysis.chunks = (2, 4, 8)
    # Synthetic routes: "contiguous" (each head's leaves follow the position, cut at a random
    # offset), "mixed" (contiguous, scatter_share of the tokens on random leaves), "scattered"
    # (every token on a random leaf).
    config.analysis.kinds = ("contiguous", "mixed", "scattered")
    config.analysis.scatter_share = 0.1
    # A trained run's routes (--run-dir): the first seq_len tokens of its held-out text.
    config.analysis.run_seq_len = 2048

    # (b) The ring itself on every device of the host (8 CPU devices with --toy).
    config.run = ml_collections.ConfigDict()
    # Synthetic routes the ring runs on, one run each: with contiguous ones every causal
    # transfer is prunable at the defaults (clusters shorter than the window), with mixed ones
    # none is at N = 2 (the plan is a union over heads).
    config.run.kinds = ("contiguous", "mixed")
    config.run.seq_len = 8192
    config.run.batch = 1
    config.run.q_heads = 32
    config.run.kv_heads = 8
    config.run.head_dim = 128
    config.run.dtype = "bfloat16"
    config.run.levels = 13
    config.run.d_max = 6
    config.run.window = 128
    config.run.sink = 1
    config.run.reps = 5
    config.run.backward = True            # also time forward + backward
    config.run.check = True               # compare with the masked dense reference

    if variant == "toy":
        a = config.analysis
        a.seq_len, a.heads, a.levels, a.d_max, a.window, a.sink = 256, 4, 8, 3, 8, 2
        a.run_seq_len = 64
        r = config.run
        r.seq_len, r.q_heads, r.kv_heads, r.head_dim, r.dtype = 256, 4, 2, 16, "float32"
        r.levels, r.d_max, r.window, r.sink, r.reps = 8, 3, 8, 2, 2
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'toy')")
    return config

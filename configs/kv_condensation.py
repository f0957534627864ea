"""KV-cache condensation (experiments/kv_condensation.py): perplexity of the last part of each
held-out sequence, and pass-key accuracy, when the far history is condensed into per-cluster
summaries, against a wider sink + window cache of the same size, the full cache and the
surgical mask.

  python experiments/kv_condensation.py --run-dir RUN [--config.capacities=8,16,32 ...]
  python experiments/kv_condensation.py --toy            # CPU: a tiny random run built here

get_config("toy") is the small CPU variant the tests run.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "kv_condensation"
    config.seed = 0

    # Perplexity: `sequences` held-out rows of seq_len tokens (BOS first); the last eval_len
    # tokens are scored, the rest is history.
    config.seq_len = 2048
    config.eval_len = 512
    config.sequences = 8
    config.batch = 4

    # The caches. window 0: the run's surgery.window; sink: the run's sink_tokens. A cache of
    # capacity C holds sink + window + C slots per query head; the wider window cache holds
    # sink + (window + C) exact keys.
    config.window = 0
    config.capacities = (8, 16, 32, 64)
    config.gamma = 0.99              # value weights gamma ** (newest member - j)
    config.keep = "largest"          # "largest" (most far members) or "recent" (newest member)
    config.medoid = "closest"        # "closest" (to the members' mean key) or "recent"

    # Needle: retrieval.passkey_prompt at these depths (the key lies in the far history when
    # depth * context is well before context - window - C), greedy replies scored by
    # retrieval.is_correct.
    config.needle = ml_collections.ConfigDict()
    config.needle.enabled = True
    config.needle.context_tokens = 2048
    config.needle.depths = (0.1, 0.3, 0.5, 0.7)
    config.needle.trials = 2
    config.needle.max_new_tokens = 12   # retrieval.MAX_NEW_TOKENS

    if variant == "toy":
        config.seq_len, config.eval_len, config.sequences, config.batch = 96, 32, 4, 2
        config.capacities = (2, 4)        # of 4 clusters: one binds, one keeps all
        config.gamma = 0.9
        config.needle.context_tokens = 236    # the byte-level prompt's own text is ~225 tokens
        config.needle.depths = (0.2, 0.6)
        config.needle.trials = 1
        config.needle.max_new_tokens = 6
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'toy')")
    return config

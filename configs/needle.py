"""Needle in a haystack (experiments/needle.py): greedy pass-key accuracy at several context
lengths and depths, dense against surgical, and per head whether the query reaches the needle.

  python experiments/needle.py --run-dir RUN [--run-dir RUN2] [--config.lengths=1024,2048 ...]
  python experiments/needle.py --toy             # CPU: a tiny random run built here

get_config("toy") is the small CPU variant the tests run.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "needle"
    config.seed = 0
    # Context lengths (capped to the model's context less max_new_tokens), depths of the key
    # (0: first, 1: right before the question) and prompts per (length, depth).
    config.lengths = (1024, 2048, 4096, 8192)
    config.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    config.trials = 2
    config.max_new_tokens = 12          # retrieval.MAX_NEW_TOKENS
    config.template = "standard"        # retrieval.STANDARD, or "compact" (retrieval.COMPACT)
    config.tokens_per_batch = 16384     # decoding batch = max(1, tokens_per_batch // length)

    if variant == "toy":
        config.lengths = (128, 256)
        config.depths = (0.0, 0.5, 1.0)
        config.trials = 1
        config.max_new_tokens = 6
        config.template = "compact"
        config.tokens_per_batch = 1024
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'toy')")
    return config

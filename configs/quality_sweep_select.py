"""Held-out perplexity against total attention density over the key-selector recipe's knobs
(the main job's recipe; experiments/quality_sweep.py with this config): the density target,
the rank of the score estimate, the window and the sink, one knob per setting, each evaluated
in domain and on two out-of-domain corpora beside the dense model and the sink + window mask
alone at the same density. Nothing trains (train.steps = 0: the tree keeps every pair).

  python experiments/quality_sweep.py --config configs/quality_sweep_select.py --jobs 5

At 1024 tokens with the held-out sets of configs/quality_sweep.py (4 x 2 rows per corpus), so
its points sit beside the router sweep's; float32, as the selectors were calibrated. The
script's toy run (--toy) is quality_sweep.py's own; this config has no toy variant.
"""
import pathlib
import runpy

import ml_collections

_sweep = runpy.run_path(str(pathlib.Path(__file__).with_name("quality_sweep.py")))
setting = _sweep["setting"]


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant:
        raise ValueError(f"unknown variant {variant!r} (this config has none)")
    config = _sweep["get_config"]()
    config.name = "quality_sweep_select"
    config.steps = 0
    s = ml_collections.ConfigDict()
    config.base_config = "smollm2_select.py"
    config.common = ml_collections.ConfigDict(dict(
        model=dict(path="/tmp/m/smol.gguf", dtype="float32"),
        train=dict(seq_len=1024, batch_size=2),
        eval=dict(batches=4, batch_size=2, tasks="", extra_corpora="stdlib,/tmp/docs",
                  extra_max_chars=1_500_000, window_baseline=True)))
    # smollm2_select: rank 32, a 25% target, sink 1, window 64, the tree cut at its root.
    s.default = setting()
    s.target_50 = setting(selection=dict(target_density=0.5))
    s.target_10 = setting(selection=dict(target_density=0.1))
    s.target_05 = setting(selection=dict(target_density=0.05))
    s.rank_16 = setting(surgery=dict(key_rank=16))
    s.rank_64 = setting(surgery=dict(key_rank=64))     # = head_dim: the scores themselves
    s.window_16 = setting(surgery=dict(window=16))
    s.window_128 = setting(surgery=dict(window=128))
    s.sink_0 = setting(surgery=dict(sink_tokens=0))
    config.settings = s
    return config

"""Held-out perplexity against total attention density over the recipe's knobs
(experiments/quality_sweep.py): one surgery run per named setting, each evaluated in domain
and on two out-of-domain corpora, beside the dense model and the sink + window mask alone at
the same density.

  python experiments/quality_sweep.py [--toy] [--jobs N] [--config.only=default,d_max_3 ...]

`settings` maps a name to overrides of the run config (its own nested structure: surgery,
objective, ...), applied after `common`; get_config("toy") is the small CPU variant the tests
run (the tiny random Llama, a few steps).
"""
import pathlib

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setting(**sections) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(sections)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "quality_sweep"
    # The run config every setting starts from (a file under configs/ or a path).
    config.base_config = "smollm2_long.py"
    config.steps = 150
    config.only = ""                   # comma-separated setting names; "" runs them all
    config.toy_model = False           # True: the tiny random Llama written under OUT
    # Overrides every run takes (after surgery.tau_steps = steps and lambda_ramp_steps =
    # steps // 5, which the script sets): 1k tokens (L = 10), the held-out sets (Shakespeare's unseen plays; Python's sources; the third corpus: the
    # Python documentation's reST sources, as in BENCHMARKS.md) and the window baseline.
    config.common = ml_collections.ConfigDict(dict(
        model=dict(path="/tmp/m/smol.gguf"),
        train=dict(seq_len=1024, batch_size=4),
        surgery=dict(max_len=1024),
        eval=dict(batches=4, tasks="", extra_corpora="stdlib,/tmp/docs",
                  extra_max_chars=1_500_000, window_baseline=True),
        checkpoint=dict(every=25)))
    # smollm2_long at 1k: p = 2, L = 10, d_max 5 (32 clusters), window 64, sink 1, a 20%
    # total density target (dual ascent, per layer), CE + KD + recall. One knob per setting
    # (global_10 two: the budget's scope and its target).
    s = ml_collections.ConfigDict()
    s.default = setting()
    s.target_10 = setting(objective=dict(density_target=0.1))
    s.target_35 = setting(objective=dict(density_target=0.35))
    s.target_50 = setting(objective=dict(density_target=0.5))
    s.no_target = setting(objective=dict(density_target=None))
    s.d_max_3 = setting(surgery=dict(d_max=3))
    s.d_max_4 = setting(surgery=dict(d_max=4))
    s.d_max_6 = setting(surgery=dict(d_max=6))
    s.window_16 = setting(surgery=dict(window=16))
    s.window_128 = setting(surgery=dict(window=128))
    s.sink_0 = setting(surgery=dict(sink_tokens=0))
    s.sink_8 = setting(surgery=dict(sink_tokens=8))
    # one multiplier for the total density: layers that need more pairs keep them (the
    # threshold mask of experiments/mask_oracles.py puts 81% in layer 0, 11-31% in most)
    s.global_20 = setting(objective=dict(per_layer=False))
    s.global_10 = setting(objective=dict(per_layer=False, density_target=0.1))
    config.settings = s

    if variant == "toy":
        config.base_config = "tiny_random.py"
        config.steps = 4
        config.toy_model = True
        config.common = ml_collections.ConfigDict(dict(
            eval=dict(batches=2, extra_corpora=f"stdlib,{ROOT / 'README.md'}",
                      extra_max_chars=20_000, window_baseline=True),
            checkpoint=dict(every=4)))
        s = ml_collections.ConfigDict()
        s.default = setting()
        s.d_max_2 = setting(surgery=dict(d_max=2))
        s.target_30 = setting(objective=dict(density_target=0.3), surgery=dict(sink_tokens=2))
        config.settings = s
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'toy')")
    return config

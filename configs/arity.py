"""The tree's arity p (experiments/arity.py): one surgery run per (part, p), perplexity (dense
and surgical), density and routing entropy per level.

  python experiments/arity.py [--toy] [--jobs N] [--config.arities=2,4 --config.parts=matched]

Parts:
- "matched": every p at (as nearly as integers allow) the same number of clusters per head,
  p**(L - d_max) closest in ratio to `clusters`, L = max(levels_for(p, seq_len), cut), and the
  same total density target (objective.density_target = matched_density, held by the base
  recipe's budget);
- "preprint": the preprint's own setting, L = levels_for(p, seq_len) and d_max = L // 2, with
  its recipe (`preprint`: CE + balance, no density budget).
get_config("toy") is the small CPU variant the tests run.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "arity"
    config.base_config = "smollm2_long.py"   # a file under configs/ or a path
    config.steps = 150
    config.toy_model = False                 # True: the tiny random Llama written under OUT
    config.arities = (2, 3, 4, 8)
    config.parts = ("matched", "preprint")
    config.seq_len = 1024                    # train.seq_len and surgery.max_len
    # p = 2, L = 10, d_max 4 at 1k tokens: 2**6 = 64 clusters per head.
    config.clusters = 64
    config.matched_density = 0.3
    # Overrides every run takes (after the tree, the schedules over the run's steps and the
    # sequence length, which the script sets).
    config.common = ml_collections.ConfigDict(dict(
        model=dict(path="/tmp/m/smol.gguf"),
        train=dict(batch_size=4),
        eval=dict(batches=4, tasks="", extra_corpora="stdlib,/tmp/docs",
                  extra_max_chars=1_500_000),
        checkpoint=dict(every=25)))
    # The preprint's recipe on top of the base config's: cross-entropy + balance, no budget.
    config.preprint = ml_collections.ConfigDict(dict(
        objective=dict(kd_weight=0.0, recall_weight=0.0, density_target=None)))

    if variant == "toy":
        config.base_config = "tiny_random.py"
        config.steps = 4
        config.toy_model = True
        config.arities = (2, 3)
        config.seq_len = 32
        config.clusters = 4
        config.matched_density = 0.5
        config.common = ml_collections.ConfigDict(dict(
            eval=dict(batches=2, extra_corpora="stdlib", extra_max_chars=20_000),
            checkpoint=dict(every=4)))
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (known: 'toy')")
    return config

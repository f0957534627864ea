"""SmolLM2-135M-Instruct on Shakespeare with the distillation recipe, sized for a 2-core CPU.

The routers learn from the frozen model itself instead of from the cross-entropy alone:
- attention recall (objective.recall_weight): in every layer, the attention mass of the dense
  probabilities of the same q and k that the tree mask keeps, -mean log r_i;
- output distillation (objective.kd_weight): KL from the dense model's next-token distribution
  (the same parameters with the routers bypassed, computed once per batch without gradient);
- a density budget (objective.density_target, dual ascent on one multiplier per layer), so the
  run asks for a density instead of hoping for one.
Routes, the tree and the schedules as in smollm2_shakespeare.py, at 512 tokens (L = 9, d_max 4):
training memory per layer is O(S^2) whatever L (the bridged mask recomputes its levels).
Evaluated on the held-out plays and, out of domain, on Python's own sources.
"""
import pathlib
import runpy

_default = runpy.run_path(str(pathlib.Path(__file__).with_name("smollm2_shakespeare.py")))


def get_config():
    config = _default["get_config"]()
    config.name = "smollm2_distill"
    config.surgery.max_len = 512       # L = 9
    config.surgery.d_max = 4           # cut at depth 5: up to 32 clusters per head
    config.surgery.window = 32
    config.objective.ce_weight = 1.0
    config.objective.kd_weight = 1.0
    config.objective.recall_weight = 1.0
    config.objective.density_target = 0.35
    config.objective.budget = "dual"
    config.objective.dual_eta = 2.0
    config.objective.per_layer = True
    config.train.seq_len = 512
    config.train.batch_size = 2
    config.train.steps = 40
    config.eval.batches = 4
    config.eval.extra_corpora = "stdlib"
    config.eval.extra_max_chars = 400_000
    return config

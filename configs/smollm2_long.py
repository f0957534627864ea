"""SmolLM2-135M-Instruct on Shakespeare, distillation recipe at long context (GPU).

2048-token sequences (L = 11, d_max 5: the tree cuts at depth 6, up to 64 clusters per head),
300 router steps of 4 sequences, a 20% density target held by dual ascent per layer, and the
held-out evaluation in domain (the plays no training batch sees) and out of domain (Python's own
sources, and any further text given in eval.extra_corpora, e.g. the Python documentation's reST
sources). Override seq_len / max_len for 1k or 4k (training memory per layer is O(S^2) whatever
L). About the preprint's own scale on one H200; see README for carrying the model there.
"""
import pathlib
import runpy

_distill = runpy.run_path(str(pathlib.Path(__file__).with_name("smollm2_distill.py")))


def get_config():
    config = _distill["get_config"]()
    config.name = "smollm2_long"
    config.surgery.max_len = 2048      # L = 11
    config.surgery.d_max = 5
    config.surgery.window = 64
    config.surgery.init_margin = 2.0
    config.surgery.tau_steps = 300
    config.surgery.lambda_ramp_steps = 60
    config.objective.density_target = 0.2
    config.train.seq_len = 2048
    config.train.batch_size = 4
    config.train.steps = 300
    config.train.lr = 1e-3
    config.eval.batches = 8
    config.eval.batch_size = 2
    config.eval.extra_max_chars = 4_000_000
    config.checkpoint.every = 50
    config.model.dtype = "bfloat16"
    return config

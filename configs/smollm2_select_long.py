"""SmolLM2-135M-Instruct with key selectors at 2048 tokens (GPU; configs/smollm2_select.py is
the CPU form): rank-32 key selection calibrated for 24% total density on training rows, sink 1
+ window 64, the tree keeping every pair; 16 held-out rows in domain and out of domain.

  ultrametric eval --config configs/smollm2_select_long.py --workdir runs/select_long \
      --config.eval.extra_corpora=stdlib,/path/to/docs

At 4096 tokens: --config.train.seq_len=4096 --config.surgery.max_len=4096
--config.surgery.levels=12 --config.surgery.d_max=12 --config.selection.target_density=0.095.
"""
import pathlib
import runpy

_select = runpy.run_path(str(pathlib.Path(__file__).with_name("smollm2_select.py")))


def get_config():
    config = _select["get_config"]()
    config.name = "smollm2_select_long"
    config.surgery.max_len = 2048
    config.surgery.levels = 11
    config.surgery.d_max = 11
    config.selection.target_density = 0.24
    config.train.seq_len = 2048
    config.eval.batches = 8
    config.eval.batch_size = 2
    config.eval.extra_max_chars = 1_500_000
    config.eval.tasks = ""             # perplexity only; --config.eval.tasks=all for behaviour
    return config

"""The main job (`ultrametric run`): SmolLM2-135M-Instruct on Shakespeare with key selectors,
sized for a 2-core CPU (1024 tokens).

Each attention layer keeps, per query, the keys whose probability under scores estimated at
rank 32 passes one threshold, beside a sink of 1 and a window of 64 (surgery/key_selector.py,
run/key_selection.py). The estimate is the least-squares rank-32 fit of the layer's own scores
on training rows (the queries' second moment and the keys' covariance, per query head); the
threshold, shared by every layer, is calibrated on further training rows for a 25% total
attention density. The tree keeps every pair (d_max = L: one cluster) and no router trains
(train.steps = 0: the run's step-0 checkpoint holds the collapsed routers), so the selectors
alone sparsify:

  ultrametric run                     # this config: about 5 minutes, 2.9 GB on 2 cores

measures the dense baseline, fits the selectors, writes them beside the checkpoints, and
reports held-out perplexity and density dense against surgical, in domain (the unseen plays)
and out of domain (Python's own sources), then the fast behaviour tasks. Every knob is
overridable (--config.surgery.key_rank=16, --config.selection.target_density=0.1,
--config.eval.tasks= for perplexity only, ...). The tree recipe with trained routers is
configs/smollm2_shakespeare.py (256 tokens) and smollm2_distill.py / smollm2_long.py.
"""
import pathlib
import runpy

_default = runpy.run_path(str(pathlib.Path(__file__).with_name("smollm2_shakespeare.py")))


def get_config():
    config = _default["get_config"]()
    config.name = "smollm2_select"
    config.surgery.max_len = 1024
    config.surgery.levels = 10         # 2**10 = 1024
    config.surgery.d_max = 10          # the tree cuts at the root: one cluster, every pair
    config.surgery.window = 64
    config.surgery.sink_tokens = 1
    config.surgery.key_rank = 32
    config.selection.target_density = 0.25
    config.selection.fit_rows = 8
    config.selection.calibration_rows = 2
    config.selection.steps = 14
    config.train.seq_len = 1024
    config.train.batch_size = 2
    config.train.steps = 0             # the tree keeps every pair: no router to train
    config.model.dtype = "float32"
    config.eval.batches = 4
    config.eval.batch_size = 1
    config.eval.extra_corpora = "stdlib"
    config.eval.extra_max_chars = 400_000
    # The fast subset of the behaviour tasks (as smollm2_shakespeare.py: under a minute)
    return config

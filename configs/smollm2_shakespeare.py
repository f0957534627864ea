"""SmolLM2-135M-Instruct (offline GGUF) on Shakespeare: the default, sized for a 2-core CPU.

The preprint's baseline setting (p=2, window 16, sink 1, batch 2 x 256 tokens, Shakespeare
held out by play) scaled to minutes on a CPU:
- L = 8 levels (= log2 of the 256-token sequences, from surgery.max_len) with d_max = 4, so the
  tree cuts at depth 4 (up to 16 clusters); every level costs S x S work in training.
- init_margin 1 and lr 2e-3: routers leave the collapse point within the first steps instead of
  after ~35 (margin 5, lr 1e-3); by 40 steps the density has dropped and levelled off.
`ultrametric run` with this config takes about 5 minutes on an idle 2-core machine.
"""
import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_config"]()
    config.name = "smollm2_shakespeare"
    config.model.path = ""           # the default offline model
    config.surgery.max_len = 256     # L = 8
    config.surgery.d_max = 4
    config.surgery.window = 16
    config.surgery.init_margin = 1.0
    config.surgery.tau_steps = 40
    config.surgery.lambda_ramp_steps = 8
    config.data.corpus = "shakespeare"
    config.train.steps = 40
    config.train.batch_size = 2
    config.train.grad_accum = 2      # 2 micro-batches of one: half the step's activation memory
    config.train.seq_len = 256
    config.train.lr = 2e-3
    config.eval.batches = 8
    config.eval.batch_size = 2
    # The fast subset of these behaviour tasks (under a minute); fidelity_long (fidelity on
    # held-out text past the window) and the full sets through `ultrametric eval --tasks`.
    config.eval.tasks = "fidelity,humaneval,instructions,retrieval"
    config.checkpoint.every = 10
    config.checkpoint.keep = 2
    return config

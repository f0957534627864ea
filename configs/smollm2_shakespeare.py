"""SmolLM2-135M-Instruct (offline GGUF) on Shakespeare: the default, sized for a 2-core CPU.

The preprint's baseline setting (p=2, L=13, d_max=6, window 16, batch 2 x 256) with fewer
steps, so that `ultrametric run` finishes in minutes on a laptop-class CPU.
"""
import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_config"]()
    config.name = "smollm2_shakespeare"
    config.model.path = ""           # the default offline model
    config.surgery.levels = 13
    config.surgery.d_max = 6
    config.surgery.window = 16
    config.surgery.tau_steps = 60
    config.surgery.lambda_ramp_steps = 20
    config.data.corpus = "shakespeare"
    config.train.steps = 60
    config.train.batch_size = 2
    config.train.seq_len = 256
    config.eval.batches = 4
    config.eval.batch_size = 2
    config.checkpoint.every = 20
    config.checkpoint.keep = 2
    return config

"""TinyLlama-1.1B on Shakespeare, for a single GPU/TPU host.

Only the fields that differ from base.py are set: base's corpus (Shakespeare), 1000 steps and
data-parallel mesh over every device are kept.

  ultrametric run --config configs/tinyllama.py \
      --config.model.path=/models/TinyLlama-1.1B-intermediate-step-1431k-3T
"""
import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_config"]()
    config.name = "tinyllama"
    config.model.path = "TinyLlama-1.1B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.surgery.max_len = 2048    # p=2 -> L=11, d_max=5
    config.surgery.window = 64
    config.train.batch_size = 16
    config.train.seq_len = 2048
    config.train.warmup_steps = 50
    config.eval.batches = 16
    config.eval.batch_size = 8
    return config

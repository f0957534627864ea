"""Llama-3-8B on WikiText-style prose, for a GPU/TPU host (the preprint's large setting).

Only the fields that differ from base.py are set; base's surgery.max_len 8192 gives p=2 ->
L=13 levels, d_max=6.

Point `model.path` at a local HF checkpoint directory and `data.corpus` at the text, e.g.
  ultrametric run --config configs/llama3_8b_wikitext.py \
      --config.model.path=/models/Meta-Llama-3-8B --config.data.corpus=/data/wikitext103.jsonl
"""
import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_config"]()
    config.name = "llama3_8b_wikitext"
    config.model.path = "Meta-Llama-3-8B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.surgery.tau_steps = 2000
    config.surgery.lambda_ramp_steps = 200
    config.data.corpus = "wikitext103.jsonl"
    config.data.chunk_chars = 20000
    config.train.steps = 2000
    config.train.batch_size = 16
    config.train.grad_accum = 4
    config.train.seq_len = 4096
    config.train.warmup_steps = 100
    config.eval.batches = 32
    config.checkpoint.every = 200
    # Fully-sharded data parallel over all devices of the host.
    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config

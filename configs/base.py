"""The base configuration every experiment starts from (ml_collections, `get_config()`).

Every field can be overridden on the command line, e.g. `--config.train.steps=50`.
Optional integers are typed placeholders (None until set) so that an override is parsed as an
int rather than a string.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "base"
    config.seed = 0

    # The frozen base model: an HF directory (config.json + *.safetensors), a .gguf file, or ""
    # for the default offline model (SmolLM2-135M-Instruct).
    config.model = ml_collections.ConfigDict()
    config.model.path = ""
    config.model.dtype = "float32"        # compute dtype of the base model
    config.model.param_dtype = "float32"  # storage dtype of the base model's weights

    # Mirrors ultrametric_jax.config.SurgeryConfig field by field.
    config.surgery = ml_collections.ConfigDict()
    config.surgery.arity = 2
    config.surgery.levels = config_dict.placeholder(int)  # None: derived from max_len
    config.surgery.max_len = 8192
    config.surgery.d_max = config_dict.placeholder(int)   # None: levels // 2
    config.surgery.mask_temperature = 0.5
    config.surgery.window = 128
    config.surgery.sink_tokens = 1
    config.surgery.depth_op = "cumprod"
    config.surgery.ste = "gate"
    config.surgery.init_margin = 5.0
    config.surgery.tau_start = 1.0
    config.surgery.tau_end = 0.1
    config.surgery.tau_steps = 1000
    config.surgery.lambda_max = 1.0
    config.surgery.lambda_ramp_steps = 100

    # Corpus: "shakespeare", "stdlib" (Python's own sources), a text file, a directory of text
    # files, or a .jsonl file with a "text" field.
    config.data = ml_collections.ConfigDict()
    config.data.corpus = "shakespeare"
    config.data.val_fraction = 0.1   # share of documents held out (hashed, deterministic)
    config.data.chunk_chars = 0      # > 0 cuts long documents into pieces before the split
    config.data.max_chars = 0        # > 0 caps the corpus size (documents in sorted order)

    config.train = ml_collections.ConfigDict()
    config.train.steps = 1000
    config.train.batch_size = 8      # sequences per optimiser step (split over grad_accum)
    config.train.grad_accum = 1
    config.train.seq_len = 512
    config.train.lr = 1e-3
    config.train.warmup_steps = 0
    config.train.weight_decay = 0.01
    config.train.clip_norm = 1.0     # global gradient-norm clip; 0 disables it
    config.train.log_every = 1

    config.eval = ml_collections.ConfigDict()
    config.eval.batches = 8
    config.eval.batch_size = 4

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 100
    config.checkpoint.keep = 3

    # Multi-host runs: call jax.distributed.initialize() first (also when the environment sets
    # ULTRAMETRIC_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS).
    config.distributed = False
    # Device mesh axes; -1 takes all remaining devices.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    return config

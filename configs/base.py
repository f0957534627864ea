"""The base configuration every experiment starts from (ml_collections, `get_config()`).

Every field can be overridden on the command line, e.g. `--config.train.steps=50`.
The surgery, objective and selection sections are SurgeryConfig's, ObjectiveConfig's and
SelectionConfig's own fields and defaults; their optional fields are typed placeholders (None
until set) so that an override is parsed with the field's type.
"""
import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from ultrametric_jax.run.settings import SelectionConfig
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.objectives import ObjectiveConfig


def dataclass_section(cls) -> ml_collections.ConfigDict:
    """Every field of a config dataclass with its default; Optional[T] = None as a T
    placeholder."""
    section = ml_collections.ConfigDict()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.default is None:
            (inner,) = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
            section[field.name] = config_dict.placeholder(inner)
        else:
            section[field.name] = field.default
    return section


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

    # The topology and its annealing schedules: SurgeryConfig's fields, at its defaults.
    config.surgery = dataclass_section(SurgeryConfig)

    # What the routers learn from: weights of CE, distillation (output KL, attention recall)
    # and the balance loss, and the density budget: ObjectiveConfig's fields, at its defaults
    # (CE + balance, no budget).
    config.objective = dataclass_section(ObjectiveConfig)

    # Fitting the key selectors of a surgery with surgery.key_rank > 0 after the routers train
    # (score projections fitted on training rows, one threshold calibrated for
    # target_density): SelectionConfig's fields.
    config.selection = dataclass_section(SelectionConfig)

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
    # Out-of-domain held-out texts, each evaluated dense against surgical beside the training
    # corpus's own held-out split: corpus specs as for data.corpus, comma-separated.
    config.eval.extra_corpora = ""
    config.eval.extra_max_chars = 2_000_000
    # Behaviour beyond perplexity, dense against surgical (fidelity, humaneval, instructions,
    # retrieval, or all; comma-separated): fast subsets unless tasks_fast is False.
    config.eval.tasks = ""
    config.eval.tasks_fast = True
    # Also evaluate the sink + window mask alone (no tree) at the surgical density, per corpus.
    config.eval.window_baseline = False

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

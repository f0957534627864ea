"""The typed settings of a run, built once from the experiment's ConfigDict.

`RunConfig.from_config_dict(config)` checks every field and returns frozen dataclasses; the
pipeline and everything below it take these, never the ConfigDict. A bad value is a
ConfigError naming the field (`invalid config value train.batch_size=0: must be an integer >= 1`).
The surgery section becomes the method's own `SurgeryConfig`, the objective section its
`ObjectiveConfig` (absent from a config: CE + balance, no budget).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.objectives import ObjectiveConfig

DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "tensor")


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config value {key}={value!r}: {why}")


def _positive_ints(section: str, obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               f"{section}.{name}", value, "must be an integer >= 1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The frozen base model: where it lives ("" is the default offline SmolLM2) and dtypes."""
    path: str
    dtype: str                # compute dtype
    param_dtype: str          # storage dtype of the weights

    def __post_init__(self):
        _check(self.dtype in DTYPES, "model.dtype", self.dtype, f"must be one of {DTYPES}")
        _check(self.param_dtype in DTYPES, "model.param_dtype", self.param_dtype,
               f"must be one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The corpus and its deterministic train / held-out split."""
    corpus: str
    val_fraction: float
    chunk_chars: int
    max_chars: int

    def __post_init__(self):
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
               "must lie in (0, 1)")
        _check(self.chunk_chars >= 0, "data.chunk_chars", self.chunk_chars, "must be >= 0")
        _check(self.max_chars >= 0, "data.max_chars", self.max_chars, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Router training: steps, batch (split over grad_accum micro-batches), AdamW.

    steps = 0 trains nothing: the routers keep their collapse initialisation (the tree keeps
    every pair) and the run's step-0 checkpoint holds them, so a surgery that sparsifies by
    key selection alone (surgery.key_rank) runs, evaluates and exports without a pointless
    training step."""
    steps: int
    batch_size: int
    grad_accum: int
    seq_len: int
    lr: float
    warmup_steps: int
    weight_decay: float
    clip_norm: float          # global gradient-norm clip; 0 disables it
    log_every: int

    def __post_init__(self):
        _positive_ints("train", self, ("batch_size", "grad_accum", "log_every"))
        _check(isinstance(self.steps, int) and not isinstance(self.steps, bool)
               and self.steps >= 0, "train.steps", self.steps,
               "must be an integer >= 0 (0: no router training)")
        _check(self.seq_len >= 2, "train.seq_len", self.seq_len, "must be >= 2")
        _check(self.batch_size % self.grad_accum == 0, "train.batch_size", self.batch_size,
               f"must be a multiple of train.grad_accum={self.grad_accum}")
        _check(math.isfinite(self.lr) and self.lr > 0, "train.lr", self.lr,
               "must be a finite number > 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(math.isfinite(self.clip_norm) and self.clip_norm >= 0, "train.clip_norm",
               self.clip_norm, "must be >= 0 (0 disables clipping)")

    @property
    def micro_batch(self) -> int:
        """Sequences per micro-batch."""
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: that many batches of batch_size sequences, of the training corpus's
    validation split and of every corpus in extra_corpora (held out from training entirely:
    the out-of-domain texts a surgery must be judged on too), each read up to extra_max_chars."""
    batches: int
    batch_size: int
    extra_corpora: tuple = ()
    extra_max_chars: int = 2_000_000
    # Behaviour tasks run after the perplexity (run/tasks: fidelity, humaneval, instructions,
    # retrieval, or "all"), dense against surgical: their fast subsets, or the full sets.
    tasks: tuple = ()
    tasks_fast: bool = True
    # Also the sink + window mask alone (no tree) at each corpus's surgical density
    # (run/window_baseline): does the tree beat a plain sliding window at equal density?
    window_baseline: bool = False

    def __post_init__(self):
        _positive_ints("eval", self, ("batches", "batch_size", "extra_max_chars"))
        for name in ("extra_corpora", "tasks"):
            value = getattr(self, name)
            items = tuple(c.strip() for c in value.split(",") if c.strip()) \
                if isinstance(value, str) else tuple(value)
            _check(all(isinstance(c, str) and c for c in items), f"eval.{name}", value,
                   "must be a comma-separated list of names")
            object.__setattr__(self, name, items)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint every `every` steps (and at the end), the newest `keep` kept."""
    every: int
    keep: int

    def __post_init__(self):
        _positive_ints("checkpoint", self, ("every", "keep"))


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Fitting the key selectors of a surgery with key_rank > 0 (run/key_selection.py), after
    the routers train: the score projections on the first fit_rows training rows, then one
    threshold for every layer, `steps` bisection halvings on the next calibration_rows
    training rows, so that their total attention density meets target_density (held-out text
    plays no part)."""
    target_density: Optional[float] = None   # required with surgery.key_rank > 0
    fit_rows: int = 8
    calibration_rows: int = 2
    steps: int = 14

    def __post_init__(self):
        if self.target_density is not None:
            _check(0.0 < self.target_density <= 1.0, "selection.target_density",
                   self.target_density, "must lie in (0, 1]")
        _positive_ints("selection", self, ("fit_rows", "calibration_rows"))
        _check(self.steps >= 0, "selection.steps", self.steps, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 takes all remaining devices."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for axis in MESH_AXES:
            size = getattr(self, axis)
            _check(size == -1 or size >= 1, f"mesh.{axis}", size, "must be -1 or >= 1")

    def axis_sizes(self) -> dict:
        return dataclasses.asdict(self)


# Section name -> its dataclass (the surgery section is the method's SurgeryConfig).
SECTIONS = {"model": ModelConfig, "surgery": SurgeryConfig, "objective": ObjectiveConfig,
            "selection": SelectionConfig, "data": DataConfig,
            "train": TrainConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
            "mesh": MeshConfig}
REQUIRED = ("name", "seed", "model", "surgery", "data", "train", "eval", "checkpoint")


def _section(name: str, values: Mapping[str, Any]):
    cls = SECTIONS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown config key '{name}.{unknown[0]}' (known keys under "
                          f"{name}: {', '.join(sorted(fields))})")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in values and f.default is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"invalid config value {name}.{missing[0]}=None: missing from the "
                          "config")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run is made of, checked."""
    name: str
    seed: int
    model: ModelConfig
    surgery: SurgeryConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    mesh: MeshConfig = MeshConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    selection: SelectionConfig = SelectionConfig()
    distributed: bool = False   # call jax.distributed.initialize() first

    def __post_init__(self):
        _check(self.surgery.max_len >= self.train.seq_len, "surgery.max_len",
               self.surgery.max_len, f"must be >= train.seq_len={self.train.seq_len}")
        target = self.selection.target_density
        _check(target is not None or not self.surgery.key_rank, "selection.target_density",
               target, f"a surgery with key selectors (surgery.key_rank="
               f"{self.surgery.key_rank}) needs the density to fit them for")
        _check(target is None or self.surgery.key_rank > 0, "selection.target_density", target,
               "needs key selectors: set surgery.key_rank (e.g. 32) or leave it None")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "RunConfig":
        """From a plain nested dict (a ConfigDict's to_dict(), or one a checkpoint recorded)."""
        for key in REQUIRED:
            _check(key in config, key, None, "missing from the config")
        sections = {name: _section(name, config[name]) for name in SECTIONS if name in config}
        return cls(name=str(config["name"]), seed=int(config["seed"]),
                   distributed=bool(config.get("distributed") or False), **sections)

    @classmethod
    def from_config_dict(cls, config) -> "RunConfig":
        """From an ml_collections ConfigDict (an experiment's get_config(), overridden)."""
        return cls.from_dict(config.to_dict())

    def to_dict(self) -> dict:
        """The nested dict of every field: what run directories and checkpoints record."""
        out = dataclasses.asdict(self)
        out["surgery"] = self.surgery.to_dict()
        out["objective"] = self.objective.to_dict()
        return out

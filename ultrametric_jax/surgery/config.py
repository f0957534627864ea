"""SurgeryConfig: the hyper-parameters of the ultrametric topology (the method's specification
is in the README), validated eagerly so that a bad value fails with a message naming the field."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ultrametric_jax.errors import ConfigError

# Choices of SurgeryConfig.depth_op / .ste, and the bound on cluster ids (packed in int32).
DEPTH_OPS = ("cumprod", "cummin")
STE_FORMS = ("gate", "renorm")
INT32_MAX = 2**31 - 1


def levels_for(arity: int, max_len: int) -> int:
    """Smallest L with arity**L >= max_len, in integer arithmetic (log_5(125) is exactly 3)."""
    levels, capacity = 0, 1
    while capacity < max_len:
        capacity *= arity
        levels += 1
    return max(levels, 1)


@dataclasses.dataclass(frozen=True)
class SurgeryConfig:
    """Hyper-parameters of the ultrametric topology injected into every attention layer."""
    arity: int = 2                      # p: children per tree node
    levels: Optional[int] = None        # L; None derives it from max_len
    max_len: int = 8192
    d_max: Optional[int] = None         # allowed tree distance; None means L // 2
    mask_temperature: float = 0.5       # T of the soft tree mask
    window: int = 128                   # local window: i - j < window is always allowed
    sink_tokens: int = 1                # keys j < sink_tokens are always allowed
    depth_op: str = "cumprod"           # "cumprod" | "cummin"
    ste: str = "gate"                   # "gate" | "renorm"
    init_margin: float = 5.0            # collapse initialisation margin of the router bias
    # Gumbel temperature schedule (tau0 -> tau_min) and balance-loss ramp (0 -> lambda_max).
    # Scale of the Gumbel noise on the training routes: 0 trains on the argmax routes that
    # evaluation runs (no train / evaluation mismatch), 1 samples the Gumbel-softmax.
    gumbel_scale: float = 1.0
    # The noise follows the temperature: scale gumbel_scale * (tau / tau_start)**gumbel_anneal,
    # so with gumbel_anneal > 0 the last steps train near the argmax routes evaluation runs.
    gumbel_anneal: float = 0.0
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_steps: int = 1000
    lambda_max: float = 1.0
    lambda_ramp_steps: int = 100
    # Key selector (surgery/key_selector.py): 0 = none; r = per query, the keys whose
    # probability under scores estimated at rank r passes a calibrated threshold, beside the
    # sink + window and within the tree's pairs. Fitted (run/key_selection.py), not trained.
    key_rank: int = 0

    def __post_init__(self):
        def bad(field, why):
            raise ConfigError(f"invalid SurgeryConfig.{field}={getattr(self, field)!r}: {why}")
        if int(self.arity) != self.arity or self.arity < 2:
            bad("arity", "the tree arity p must be an integer >= 2")
        if self.max_len < 1:
            bad("max_len", "must be >= 1")
        if self.levels is not None and self.levels < 1:
            bad("levels", "the tree depth L must be >= 1")
        if self.d_max is not None and not 0 <= self.d_max <= self.num_levels:
            bad("d_max", f"must lie in [0, L={self.num_levels}]")
        if self.mask_temperature <= 0:
            bad("mask_temperature", "must be > 0")
        if self.window < 0:
            bad("window", "must be >= 0")
        if self.sink_tokens < 0:
            bad("sink_tokens", "must be >= 0")
        if self.depth_op not in DEPTH_OPS:
            bad("depth_op", f"must be one of {DEPTH_OPS}")
        if self.ste not in STE_FORMS:
            bad("ste", f"must be one of {STE_FORMS}")
        if self.arity ** self.cut_level - 1 > INT32_MAX:
            raise ConfigError(
                f"invalid SurgeryConfig: arity**(L - d_max) = {self.arity}**{self.cut_level} "
                "cluster ids do not fit in int32; raise d_max or lower levels / arity")
        if self.init_margin <= 0:
            bad("init_margin", "must be > 0")
        if not 0 < self.tau_end <= self.tau_start:
            bad("tau_end", "need 0 < tau_end <= tau_start")
        if self.tau_steps < 0 or self.lambda_ramp_steps < 0:
            bad("tau_steps" if self.tau_steps < 0 else "lambda_ramp_steps", "must be >= 0")
        if not (math.isfinite(self.gumbel_scale) and self.gumbel_scale >= 0):
            bad("gumbel_scale", "must be a finite number >= 0")
        if not (math.isfinite(self.gumbel_anneal) and self.gumbel_anneal >= 0):
            bad("gumbel_anneal", "must be a finite number >= 0")
        if self.lambda_max < 0:
            bad("lambda_max", "must be >= 0")
        if int(self.key_rank) != self.key_rank or self.key_rank < 0:
            bad("key_rank", "must be an integer >= 0 (0: no key selector)")

    @property
    def num_levels(self) -> int:
        """L, resolved."""
        return self.levels if self.levels is not None else levels_for(self.arity, self.max_len)

    @property
    def max_distance(self) -> int:
        """d_max, resolved."""
        return self.d_max if self.d_max is not None else self.num_levels // 2

    @property
    def cut_level(self) -> int:
        """k = L - d_max: hard-allowed pairs are exactly those sharing the first k digits."""
        return self.num_levels - self.max_distance

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SurgeryConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown SurgeryConfig fields: {sorted(unknown)}")
        return cls(**d)

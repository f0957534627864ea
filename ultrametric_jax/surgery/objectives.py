"""Training objectives of the surgery beyond the cross-entropy: distillation from the frozen
base model (layer-local attention recall, output KL) and their combination with the CE, the
balance loss and the density budget (surgery/budget.py) into one loss.

total = a CE + b L_kd + c L_rec + lambda(step) L_bal + budget term. The teacher quantities (the
dense attention scores of the same layer, the dense model's logits) enter without gradient, so
every term reaches the router and nothing of the base model. All maths in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.surgery import budget as bud

RECALL_FORMS = ("log_mass", "kl")
BUDGET_ROUTES = ("argmax", "feedback", "sampled")
# r_i is floored here before its log: a row that keeps (almost) nothing costs -log(1e-6) = 13.8
# instead of inf. The diagonal pair (i, i) is always allowed, so a floored row has dropped all
# but less than 1e-6 of its dense attention mass.
RECALL_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Weights of the surgery's training objectives and the density budget. The balance term
    keeps its schedule in SurgeryConfig (lambda_max, lambda_ramp_steps)."""
    ce_weight: float = 1.0                  # a: next-token cross-entropy
    kd_weight: float = 0.0                  # b: KL from the dense model's next-token distribution
    recall_weight: float = 0.0              # c: layer-local attention recall, mean over layers
    recall_form: str = "log_mass"           # "log_mass": -log r_i | "kl": KL(P || soft-masked P)
    density_target: Optional[float] = None  # rho*: total attention density; None = no budget
    budget: str = "penalty"                 # "penalty": mu relu(rho - rho*)^2 | "dual": nu rho
    budget_mu: float = 100.0                # mu of the penalty
    dual_eta: float = 1.0                   # eta of the dual ascent on nu
    per_layer: bool = False                 # the target binds every layer, not just the total
    # Whose density the budget binds: "sampled", the Gumbel routes of the training step, or
    # "argmax", the noise-free routes evaluation runs (budget.route_density). "argmax" meets
    # the target held out but, measured, costs far more perplexity (BENCHMARKS.md).
    # "feedback" (dual budget only): the gradient of the sampled routes' density, scaled by a
    # multiplier that dual ascent raises until the argmax routes' density meets the target.
    budget_routes: str = "sampled"

    def __post_init__(self):
        def bad(field, why):
            raise ConfigError(f"invalid ObjectiveConfig.{field}={getattr(self, field)!r}: {why}")
        for field in ("ce_weight", "kd_weight", "recall_weight"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                bad(field, "must be a finite number >= 0")
        if self.ce_weight == self.kd_weight == self.recall_weight == 0:
            raise ConfigError("invalid ObjectiveConfig: ce_weight, kd_weight and recall_weight "
                              "are all 0; nothing would keep the model's quality")
        if self.recall_form not in RECALL_FORMS:
            bad("recall_form", f"must be one of {RECALL_FORMS}")
        if self.density_target is not None and not 0 < self.density_target <= 1:
            bad("density_target", "must lie in (0, 1] (a fraction of the causal pairs) or be None")
        if self.budget not in bud.BUDGETS:
            bad("budget", f"must be one of {bud.BUDGETS}")
        if not self.budget_mu > 0:
            bad("budget_mu", "must be > 0")
        if not self.dual_eta > 0:
            bad("dual_eta", "must be > 0")
        if self.budget_routes not in BUDGET_ROUTES:
            bad("budget_routes", f"must be one of {BUDGET_ROUTES}")
        if not isinstance(self.per_layer, bool):
            bad("per_layer", "must be True or False")
        if self.budget_routes == "feedback" and self.budget != "dual":
            bad("budget_routes", "'feedback' steers the dual multiplier by the argmax routes' "
                "density: it needs budget='dual'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectiveConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ObjectiveConfig fields: {sorted(unknown)}")
        return cls(**d)


def _row_weights(causal: jax.Array, shape, q_valid: Optional[jax.Array]) -> jax.Array:
    """float32 [B, H, Sq]: 1 for a real query with at least one causal real key."""
    rows = jnp.any(jnp.broadcast_to(causal, shape), axis=-1)
    if q_valid is not None:
        rows = rows & q_valid.astype(bool)[:, None, :]
    return rows.astype(jnp.float32)


def _row_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def dense_attention_probs(scores: jax.Array, causal: jax.Array) -> jax.Array:
    """The teacher P = softmax over the causal real keys of the scaled scores, float32
    [B, H, Sq, Sk], without gradient (zero rows where a query has no causal key)."""
    scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
    causal = jnp.broadcast_to(causal, scores.shape)
    row_max = jnp.max(jnp.where(causal, scores, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(causal, jnp.exp(jnp.where(causal, scores - row_max, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def attention_recall_loss(scores: jax.Array, m: jax.Array, causal: jax.Array,
                          q_valid: Optional[jax.Array] = None) -> jax.Array:
    """L_rec = -mean over (b, h, real i) of log max(r_i, RECALL_FLOOR), r_i = sum_j m_ij P_ij.

    scores: the layer's scaled attention scores [B, H, Sq, Sk] (any float; used without
    gradient); m: the bridged mask [B, H, Sq, Sk] (forward the hard mask, backward the soft
    tree mask, 1 on sink and window pairs); causal: bool broadcastable to [B, H, Sq, Sk], the
    causal pairs with a real key; q_valid: bool [B, Sq] or None. Forward, r_i is the dense
    attention mass the hard mask keeps; the gradient reaches the router through m only.
    (With m exactly 0/1, this is also KL(Q || P) for Q = P m / r, the masked renormalised
    distribution.)
    """
    probs = dense_attention_probs(scores, causal)
    recall = jnp.sum(m.astype(jnp.float32) * probs, axis=-1)                 # [B, H, Sq]
    loss = -jnp.log(jnp.maximum(recall, RECALL_FLOOR))
    return _row_mean(loss, _row_weights(causal, scores.shape, q_valid))


def attention_kl_loss(scores: jax.Array, mask: jax.Array, causal: jax.Array,
                      q_valid: Optional[jax.Array] = None) -> jax.Array:
    """mean over (b, h, real i) of KL(P_i || Q_i), Q_ij = P_ij w_ij / sum_k P_ik w_ik with
    w = max(mask, RECALL_FLOOR): log sum_j P_ij w_ij - sum_j P_ij log w_ij.

    Meant for a relaxed mask, values in (0, 1] (the soft tree mask, 1 on sink and window
    pairs): with the bridged m, exactly 0 on a dropped pair, every dropped unit of mass costs
    -log(RECALL_FLOOR) and its gradient is cut by the floor. Shapes as attention_recall_loss.
    """
    probs = dense_attention_probs(scores, causal)
    weights = jnp.maximum(mask.astype(jnp.float32), RECALL_FLOOR)
    kept = jnp.sum(probs * weights, axis=-1)
    cross = jnp.sum(probs * jnp.log(weights), axis=-1)
    loss = jnp.log(jnp.maximum(kept, RECALL_FLOOR)) - cross
    return _row_mean(loss, _row_weights(causal, scores.shape, q_valid))


def output_distillation_loss(dense_logits: jax.Array, surgical_logits: jax.Array,
                             valid: Optional[jax.Array] = None) -> jax.Array:
    """L_kd = mean over real tokens t of KL(softmax(z_dense_t) || softmax(z_surgical_t)).

    dense_logits, surgical_logits: [B, S, V] (any float dtype; float32 maths), the dense ones
    used without gradient; valid: bool [B, S] (True = real token) or None. Token t's
    next-token distribution counts when token t is real.
    """
    if dense_logits.shape != surgical_logits.shape:
        raise ValueError(f"dense logits {dense_logits.shape} and surgical logits "
                         f"{surgical_logits.shape} must have the same shape")
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(dense_logits).astype(jnp.float32), -1)
    student = jax.nn.log_softmax(surgical_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(teacher)
    # 0 log 0 = 0 where the teacher gives a token no mass (a -inf logit).
    kl = jnp.sum(jnp.where(p > 0, p * (teacher - student), 0.0), axis=-1)  # [B, S]
    weights = (jnp.ones(kl.shape, jnp.float32) if valid is None
               else jnp.broadcast_to(valid, kl.shape).astype(jnp.float32))
    return _row_mean(kl, weights)


def budget_term(config: ObjectiveConfig, rho: jax.Array,
                nu: Optional[jax.Array] = None) -> jax.Array:
    """The density budget's loss term for rho [layers] (budget.soft_density per layer): the
    penalty, or nu * rho with the multipliers nu of budget.init_dual_state /
    budget.dual_ascent_update; 0 without a density_target."""
    if config.density_target is None:
        return jnp.zeros((), jnp.float32)
    if config.budget == "penalty":
        return bud.density_penalty(rho, config.density_target, config.budget_mu,
                                   config.per_layer)
    if nu is None:
        raise ValueError("budget='dual' needs the multipliers nu (budget.init_dual_state)")
    return bud.dual_budget_term(nu, rho, config.per_layer)


def combine_objectives(config: ObjectiveConfig, *, cross_entropy, balance, lam,
                       kd=None, recall=None, rho=None, nu=None):
    """(total, terms): a CE + b L_kd + c L_rec + lam L_bal + budget term, float32.

    kd, recall and rho may be None when their weight is 0 / there is no density_target;
    recall is the mean over layers of the per-layer losses; rho the per-layer densities
    [layers]. terms maps each name to its unweighted value (for logging).
    """
    terms = {"cross_entropy": cross_entropy, "balance": balance, "kd": kd, "recall": recall}
    weights = {"cross_entropy": config.ce_weight, "balance": lam, "kd": config.kd_weight,
               "recall": config.recall_weight}
    total = jnp.zeros((), jnp.float32)
    for name, value in terms.items():
        if isinstance(weights[name], (int, float)) and weights[name] == 0:
            continue
        if value is None:
            raise ValueError(f"the {name} term is missing but its weight is {weights[name]}")
        total = total + jnp.asarray(weights[name], jnp.float32) * jnp.asarray(value, jnp.float32)
    if config.density_target is not None:
        if rho is None:
            raise ValueError("density_target is set but the per-layer densities rho are missing")
        terms["budget"] = budget_term(config, rho, nu)
        total = total + terms["budget"]
    return total, {k: v for k, v in terms.items() if v is not None}

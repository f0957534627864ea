"""The compiled training step: gradients of the routers over `grad_accum` micro-batches, one
optimiser update, the annealing schedules, and the step's metrics.

The model is split once into three parts: the trainable routers (`trainable_filter()`), the
small mutable state (Gumbel RNG counters and the temperature tau), and everything else — the
frozen base model, a read-only input of the step, never copied or updated.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ultrametric_jax.run.optimizer import build_optimizer
from ultrametric_jax.run.settings import TrainConfig
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.surgery.annealing import lambda_schedule, tau_schedule
from ultrametric_jax.surgery.attention import GumbelTemperature
from ultrametric_jax.surgery.budget import (DensityMultiplier, density_multiplier,
                                            dual_ascent_update)
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.inject import (base_model_mode, forward_with_aux, set_tau,
                                            trainable_filter)
from ultrametric_jax.surgery.losses import token_cross_entropy
from ultrametric_jax.surgery.objectives import (ObjectiveConfig, combine_objectives,
                                                output_distillation_loss)

MUTABLE = (nnx.RngState, GumbelTemperature, DensityMultiplier)
# Metric of the step that is 1.0 when every updated parameter is finite (read, not logged).
PARAMS_FINITE = "params_finite"


def split_model(model) -> tuple:
    """(graphdef, trainable params, mutable state, frozen rest) of an injected model."""
    return nnx.split(model, trainable_filter(), MUTABLE, ...)


def make_grad_fn(graphdef, objective: ObjectiveConfig = ObjectiveConfig()) -> Callable:
    """(params, mutable, frozen, input_ids [b,S], mask [b,S], lam)
    -> ((loss, (scalars, new mutable)), grads wrt params) of one micro-batch.

    The loss is objective's combination of CE, output distillation from the base model (the
    same parameters in base_model_mode, without gradient), attention recall, the balance loss
    and the density budget (surgery/objectives.py)."""
    if objective.recall_weight > 0 and objective.recall_form != "log_mass":
        raise ConfigError(f"invalid config value objective.recall_form="
                          f"{objective.recall_form!r}: training computes the 'log_mass' recall")
    extras = ("recall",) if objective.recall_weight > 0 else ()
    # The budget's densities: the argmax routes' (what evaluation runs) or the Gumbel routes'.
    noise_free = objective.density_target is not None and objective.budget_routes == "argmax"
    rho_key = "route_density_per_layer" if noise_free else "soft_density_per_layer"
    extras += ("route_density",) if noise_free else ()
    # The densities dual ascent compares with the target: "feedback" differentiates the
    # sampled routes' density but steers its multiplier by the argmax routes' (evaluation's).
    feedback_key = ("argmax_density_per_layer" if objective.budget_routes == "feedback"
                    else rho_key)

    def micro_loss(params, mutable, frozen, input_ids, mask, lam):
        model = nnx.merge(graphdef, params, mutable, frozen, copy=True)
        kd = None
        if objective.kd_weight > 0:
            with base_model_mode(model):
                dense_logits = jax.lax.stop_gradient(model(input_ids, attention_mask=mask))
        logits, aux = forward_with_aux(model, input_ids, mask, extras=extras)
        ce_sum, count = token_cross_entropy(logits, input_ids, mask)
        ce = ce_sum / jnp.maximum(count, 1.0)
        if objective.kd_weight > 0:
            kd = output_distillation_loss(dense_logits, logits, mask)
        nu = density_multiplier(model)
        loss, terms = combine_objectives(
            objective, cross_entropy=ce, balance=aux["balance_loss"], lam=lam, kd=kd,
            recall=aux.get("recall"), rho=aux[rho_key],
            nu=None if nu is None else jax.lax.stop_gradient(nu))
        new_mutable = nnx.state(model, MUTABLE)
        scalars = {"loss": loss, "ce": ce, "balance_loss": aux["balance_loss"],
                   "density": aux["density"], "tree_density": aux["tree_density"],
                   "argmax_density": aux["argmax_density"],
                   "density_per_layer": jax.lax.stop_gradient(aux[feedback_key]),
                   "tokens": count,
                   **{k: v for k, v in terms.items() if k in ("kd", "recall", "budget")}}
        return loss, (scalars, new_mutable)

    return jax.value_and_grad(micro_loss, has_aux=True)


def accumulate_gradients(grad_fn: Callable, params, mutable, frozen, input_ids, mask, lam):
    """Mean gradient over the leading (micro-batch) axis of input_ids / mask, threading the
    mutable state (RNG counters) through the micro-batches in order; returns
    (grads, mutable, per-micro-batch scalars stacked)."""
    accum = input_ids.shape[0]

    def body(carry, batch):
        grads, mutable = carry
        (_, (scalars, mutable)), g = grad_fn(params, mutable, frozen, batch[0], batch[1], lam)
        grads = jax.tree.map(lambda a, b: a + b / accum, grads, g)
        return (grads, mutable), scalars

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, mutable), per_micro = jax.lax.scan(body, (zeros, mutable), (input_ids, mask))
    return grads, mutable, per_micro


def all_finite(tree) -> jax.Array:
    """True when every element of every array leaf is finite (a norm could overflow)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(graphdef, tx: optax.GradientTransformation, tau_fn: Callable,
                    lambda_fn: Callable, state_shardings: Optional[tuple] = None,
                    objective: ObjectiveConfig = ObjectiveConfig()) -> Callable:
    """jit(train_step(params, opt_state, mutable, frozen, step, input_ids [A,b,S], mask [A,b,S]))
    -> (params, opt_state, mutable, metrics).

    metrics: the mean loss terms and densities of the micro-batches (at the parameters passed
    in), tokens, tau, lambda, the gradient norm and PARAMS_FINITE of the updated parameters.
    state_shardings: the (params, opt_state, mutable) shardings of the state passed in, which
    the step returns its state with, so that the next step reuses this compilation; None (one
    device) leaves them to the compiler.
    """
    grad_fn = make_grad_fn(graphdef, objective)
    dual = objective.density_target is not None and objective.budget == "dual"

    def train_step(params, opt_state, mutable, frozen, step_index, input_ids, mask):
        tau, lam = tau_fn(step_index), lambda_fn(step_index)
        model = nnx.merge(graphdef, params, mutable, frozen, copy=True)
        set_tau(model, tau)
        mutable = nnx.state(model, MUTABLE)
        grads, mutable, per_micro = accumulate_gradients(grad_fn, params, mutable, frozen,
                                                         input_ids, mask, lam)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        density_per_layer = jnp.mean(per_micro.pop("density_per_layer"), axis=0)
        if dual:      # nu <- max(0, nu + eta (rho - rho*)), with this step's densities
            model = nnx.merge(graphdef, params, mutable, frozen, copy=True)
            model.density_multiplier[...] = dual_ascent_update(
                model.density_multiplier[...], density_per_layer, objective.density_target,
                objective.dual_eta, objective.per_layer)
            mutable = nnx.state(model, MUTABLE)
        metrics = {k: (jnp.sum(v) if k == "tokens" else jnp.mean(v)) for k, v in per_micro.items()}
        metrics.update(tau=jnp.asarray(tau, jnp.float32), **{"lambda": jnp.asarray(lam)},
                       grad_norm=optax.global_norm(grads),
                       **{PARAMS_FINITE: all_finite(params).astype(jnp.float32)})
        return params, opt_state, mutable, metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=(0, 1, 2))
    return jax.jit(train_step, donate_argnums=(0, 1, 2), out_shardings=(*state_shardings, None))


# jax.jit caches its compilations per function object: one step function per model
# structure, training settings, surgery and state placement lets a second trainer of the same
# run in this process (a resume) reuse the compiled step instead of compiling it again.
_STEP_CACHE: dict = {}


def cached_train_step(graphdef, train: TrainConfig, surgery: SurgeryConfig,
                      state_shardings: Optional[tuple] = None,
                      objective: ObjectiveConfig = ObjectiveConfig()) -> Callable:
    """make_train_step for this model structure, train settings, surgery, objective and state
    shardings, built once per process."""
    leaves, treedef = jax.tree.flatten(state_shardings)
    key = (graphdef, train, surgery, objective, tuple(leaves), treedef)
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = make_train_step(graphdef, build_optimizer(train),
                                           tau_schedule(surgery), lambda_schedule(surgery),
                                           state_shardings, objective)
    return _STEP_CACHE[key]

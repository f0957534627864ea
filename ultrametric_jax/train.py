"""Router-only training of a surgical model: the jitted step, checkpoints, resume, metrics.

The model is split into three parts once: the router parameters (RouterParam, trained by optax
AdamW with warm-up and global-norm clipping), the small mutable state (Gumbel RNG counters and
the temperature tau), and everything else — the frozen base model, passed to the compiled step
as a read-only input and never copied or updated. One optimiser step averages the gradients of
`grad_accum` micro-batches (a lax.scan), anneals tau and ramps lambda with the surgery's
schedules, and returns the step's metrics.

A run resumes from the newest readable checkpoint of its directory: router and optimiser state,
RNG state, step and data-iterator position, so an interrupted run continues exactly as an
uninterrupted one. A non-finite loss stops the run before anything of that step is saved.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ultrametric_jax import sharding
from ultrametric_jax.config import ConfigError
from ultrametric_jax.config_flags import surgery_config
from ultrametric_jax.data import (BatchIterator, PackedSequences, build_splits, corpus_tokenizer,
                                  eval_batches)
from ultrametric_jax.losses import token_cross_entropy, total_loss
from ultrametric_jax.metrics import MetricsWriter, format_scalars, progress_bar
from ultrametric_jax.router import RouterParam
from ultrametric_jax.run_checkpoint import RunCheckpointer, base_model_identity, check_same_base
from ultrametric_jax.schedules import lambda_schedule, tau_schedule
from ultrametric_jax.surgery import forward_with_aux, inject_topology, set_tau
from ultrametric_jax.surgical_attention import GumbelTemperature

CHECKPOINT_SUBDIR = "checkpoints"
MUTABLE = (nnx.RngState, GumbelTemperature)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving that step."""


def build_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with a linear warm-up to train.lr, after optional global-norm clipping."""
    if train.warmup_steps > 0:
        lr = optax.linear_schedule(0.0, train.lr, int(train.warmup_steps))
    else:
        lr = optax.constant_schedule(train.lr)
    adamw = optax.adamw(lr, weight_decay=train.weight_decay)
    if train.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.clip_norm), adamw)
    return adamw


def make_grad_fn(graphdef) -> Callable:
    """(params, mutable, frozen, input_ids [b,S], mask [b,S], lam)
    -> ((loss, (scalars, new mutable)), grads wrt params) of one micro-batch."""

    def micro_loss(params, mutable, frozen, input_ids, mask, lam):
        model = nnx.merge(graphdef, params, mutable, frozen, copy=True)
        logits, aux = forward_with_aux(model, input_ids, mask)
        ce_sum, count = token_cross_entropy(logits, input_ids, mask)
        ce = ce_sum / jnp.maximum(count, 1.0)
        loss = total_loss(ce, aux["balance_loss"], lam)
        new_mutable = nnx.state(model, MUTABLE)
        scalars = {"loss": loss, "ce": ce, "balance_loss": aux["balance_loss"],
                   "density": aux["density"], "tree_density": aux["tree_density"],
                   "tokens": count}
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


def make_train_step(graphdef, tx: optax.GradientTransformation, tau_fn: Callable,
                    lambda_fn: Callable) -> Callable:
    """jit(step(params, opt_state, mutable, frozen, step, input_ids [A,b,S], mask [A,b,S]))
    -> (params, opt_state, mutable, metrics)."""
    grad_fn = make_grad_fn(graphdef)

    def step(params, opt_state, mutable, frozen, step_index, input_ids, mask):
        tau, lam = tau_fn(step_index), lambda_fn(step_index)
        model = nnx.merge(graphdef, params, mutable, frozen, copy=True)
        set_tau(model, tau)
        mutable = nnx.state(model, MUTABLE)
        grads, mutable, per_micro = accumulate_gradients(grad_fn, params, mutable, frozen,
                                                         input_ids, mask, lam)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {k: (jnp.sum(v) if k == "tokens" else jnp.mean(v)) for k, v in per_micro.items()}
        metrics.update(tau=jnp.asarray(tau, jnp.float32), **{"lambda": jnp.asarray(lam)},
                       grad_norm=optax.global_norm(grads))
        return params, opt_state, mutable, metrics

    return jax.jit(step, donate_argnums=(0, 1, 2))


_STEP_CACHE: dict = {}


def cached_train_step(graphdef, train: ml_collections.ConfigDict, surgery) -> Callable:
    """make_train_step for this model structure and these hyper-parameters, built once per
    process, so that a second trainer of the same run reuses the compiled step."""
    key = (graphdef, surgery, train.lr, train.warmup_steps, train.weight_decay, train.clip_norm)
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = make_train_step(graphdef, build_optimizer(train),
                                           tau_schedule(surgery), lambda_schedule(surgery))
    return _STEP_CACHE[key]


def checkpoint_layout(params, opt_state, mutable) -> dict:
    """The state a run checkpoint holds; the one definition shared by saving, resuming and
    `checkpoint_template`, so that they cannot disagree."""
    return {"router": params, "opt": opt_state, "mutable": mutable}


def checkpoint_template(config: ml_collections.ConfigDict, model) -> dict:
    """The checkpoint state layout SurgeryTrainer saves for `model` (injected) under `config`:
    a restore template whose leaves have the saved structure, shapes and dtypes.

    Puts `model` in training mode, as the trainer does before splitting it.
    """
    model.train()
    _, params, mutable, _ = nnx.split(model, RouterParam, MUTABLE, ...)
    return checkpoint_layout(params, build_optimizer(config.train).init(params), mutable)


@dataclasses.dataclass
class TrainOutcome:
    step: int                 # steps completed (== train.steps unless stopped)
    resumed_from: Optional[int]
    last_metrics: dict
    seconds: float


class SurgeryTrainer:
    """Trains the routers of an injected model; owns the run directory's checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, model, train_data: PackedSequences,
                 workdir: str, base_identity: dict, *, progress: bool = True):
        self.config, self.model, self.workdir = config, model, workdir
        self.base_identity, self.progress = base_identity, progress
        surgery = surgery_config(config)
        self.tx = build_optimizer(config.train)
        model.train()
        accum = config.train.grad_accum
        self.micro_batch = config.train.batch_size // accum
        self.accum = accum
        self.mesh = self._place_on_mesh(config, model)
        self.graphdef, self.params, self.mutable, self.frozen = nnx.split(
            model, RouterParam, MUTABLE, ...)
        self.opt_state = self.tx.init(self.params)
        self.step = 0
        self.data = BatchIterator(train_data, config.train.batch_size,
                                  seed=config.seed)
        self.checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR),
                                            keep=config.checkpoint.keep)
        self._step_fn = cached_train_step(self.graphdef, config.train, surgery)
        self.metrics = MetricsWriter(workdir)

    def _place_on_mesh(self, config, model):
        """Shards the model over config.mesh (a no-op on one device); the jitted step then
        runs with the parameters' shardings and the batch split over data x fsdp."""
        try:
            mesh = sharding.mesh_from_config(config.mesh)
        except sharding.ShardingError as e:
            raise ConfigError(f"invalid config value mesh={config.mesh.to_dict()}: {e}") from None
        ways = sharding.data_parallel_size(mesh)
        if self.micro_batch % ways:
            raise ConfigError(
                f"invalid config value train.batch_size={config.train.batch_size}: each "
                f"micro-batch of {self.micro_batch} sequences must split evenly over the "
                f"{ways} data-parallel devices of mesh {dict(mesh.shape)}; change "
                "train.batch_size or config.mesh")
        if mesh.size > 1:
            sharding.shard_module(model, mesh)
        return mesh

    # ------------------------------------------------------------------ state

    def _checkpoint_state(self) -> dict:
        return checkpoint_layout(self.params, self.opt_state, self.mutable)

    def restore(self) -> Optional[int]:
        """Load the newest readable checkpoint, if any; returns its step."""
        restored = self.checkpointer.restore_latest(self._checkpoint_state())
        if restored is None:
            return None
        check_same_base(restored.meta["base_model"], self.base_identity)
        self.params = restored.state["router"]
        if self.mesh.size > 1:
            self.params = sharding.shard_state(self.params, self.mesh)
        self.opt_state = restored.state["opt"]
        self.mutable = restored.state["mutable"]
        self.data.set_state(restored.meta["data_state"])
        self.step = restored.step
        self.sync_model()
        return restored.step

    def save(self) -> None:
        self.checkpointer.save(self.step, self._checkpoint_state(), data_state=self.data.state(),
                               base_model=self.base_identity, config=self.config.to_dict())

    def sync_model(self) -> None:
        """Write the trained state back into the model object (for evaluation / export)."""
        nnx.update(self.model, self.params, self.mutable)

    # ------------------------------------------------------------------ loop

    def _next_batch(self):
        batch = next(self.data)
        shape = (self.accum, self.micro_batch, -1)
        ids, mask = batch["input_ids"].reshape(shape), batch["attention_mask"].reshape(shape)
        if self.mesh.size == 1:
            return jnp.asarray(ids), jnp.asarray(mask)
        return (sharding.global_batch(ids, self.mesh, batch_dim=1),
                sharding.global_batch(mask, self.mesh, batch_dim=1))

    def train(self, resume: bool = True) -> TrainOutcome:
        total = int(self.config.train.steps)
        resumed = self.restore() if resume else None
        # Records past the restored step come from an interrupted attempt: drop them.
        self.metrics.truncate_after(self.step)
        start_time, last = time.time(), {}
        bar = progress_bar(total, initial=self.step, enabled=self.progress)
        try:
            while self.step < total:
                t0 = time.time()
                ids, mask = self._next_batch()
                params, opt_state, mutable, metrics = self._step_fn(
                    self.params, self.opt_state, self.mutable, self.frozen,
                    jnp.asarray(self.step, jnp.int32), ids, mask)
                # The old state was donated to the step: adopt the new one before judging it.
                self.params, self.opt_state, self.mutable = params, opt_state, mutable
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    last_good = self.checkpointer.latest_step()
                    raise NonFiniteLossError(
                        f"non-finite training loss ({metrics['loss']}) at step {self.step + 1} "
                        f"(ce={metrics['ce']}, balance_loss={metrics['balance_loss']}); "
                        f"stopping. The last good checkpoint is step {last_good} in "
                        f"{self.checkpointer.directory}; lower train.lr or check the data.")
                self.step += 1
                metrics["tokens_per_s"] = metrics.pop("tokens") / max(time.time() - t0, 1e-9)
                last = metrics
                if self.step % self.config.train.log_every == 0 or self.step == total:
                    self.metrics.write(self.step, metrics)
                bar.update(1)
                bar.set_postfix(format_scalars(metrics, ("loss", "ce", "density", "tau")),
                                refresh=False)
                if self.step % self.config.checkpoint.every == 0 or self.step == total:
                    self.save()
        finally:
            bar.close()
            self.sync_model()
            self.model.eval()
        return TrainOutcome(step=self.step, resumed_from=resumed, last_metrics=last,
                            seconds=time.time() - start_time)

    def close(self) -> None:
        self.metrics.close()
        self.checkpointer.close()


def base_parameters_fingerprint(model) -> np.ndarray:
    """All non-router parameters flattened to one float64 vector (for identity checks)."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(RouterParam)))
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(state)])


# ----------------------------------------------------------------------------- run setup

@dataclasses.dataclass
class RunSetup:
    """A loaded base model (not yet injected) and the data of a run."""
    model: object
    weights_path: str
    identity: dict
    train_data: PackedSequences
    val_batches: list


def resolve_model_source(config: ml_collections.ConfigDict, *, install: bool):
    """Where the base model lives; model.path "" means the default offline SmolLM2."""
    from ultrametric_jax import assets
    spec = config.model.path or "smollm2"
    try:
        return assets.resolve_model(spec, install=install)
    except FileNotFoundError as e:
        raise ConfigError(f"invalid config value model.path={config.model.path!r}: {e}") from None


def setup_run(config: ml_collections.ConfigDict, *, install: bool = False) -> RunSetup:
    """Load the frozen base model, its identity, its tokenizer and the packed data splits."""
    from ultrametric_jax.checkpoint import load_pretrained
    source = resolve_model_source(config, install=install)
    model = load_pretrained(source.weights, dtype=config.model.dtype,
                            param_dtype=config.model.param_dtype)
    limit = model.config.max_position_embeddings
    if config.train.seq_len > limit:
        raise ConfigError(f"invalid config value train.seq_len={config.train.seq_len}: the "
                          f"model supports at most {limit} positions")
    tokenizer = corpus_tokenizer(source.tokenizer or source.weights, model.config)
    train_data, val_data = build_splits(config.data, tokenizer, config.train.seq_len)
    val_batches = eval_batches(val_data, config.eval.batch_size, config.eval.batches)
    return RunSetup(model=model, weights_path=source.weights,
                    identity=base_model_identity(source.weights), train_data=train_data,
                    val_batches=val_batches)


def inject(config: ml_collections.ConfigDict, model) -> None:
    """Inject the configured topology; router initialisation and Gumbel noise follow the seed."""
    inject_topology(model, surgery_config(config),
                    nnx.Rngs(params=config.seed, gumbel=config.seed + 1))

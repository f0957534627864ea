"""Router-only training of a surgical model: the jitted step, checkpoints, resume, metrics.

The model is split into three parts once: the router parameters (RouterParam, trained by optax
AdamW with warm-up and global-norm clipping), the small mutable state (Gumbel RNG counters and
the temperature tau), and everything else — the frozen base model, passed to the compiled step
as a read-only input and never copied or updated. One optimiser step averages the gradients of
`grad_accum` micro-batches (a lax.scan), anneals tau and ramps lambda with the surgery's
schedules, and returns the step's metrics.

On a mesh the step returns its state with the shardings it was given (each array placed by its
logical axes, optimiser moments like their parameters), so every step, and every step after a
resume, runs the one compiled program. The host reads the step metrics only on logging and
saving steps; it then checks every step since the last read.

A run resumes from the newest readable checkpoint of its directory: router and optimiser state,
RNG state, step and data-iterator position, so an interrupted run continues exactly as an
uninterrupted one. A non-finite loss stops the run before anything of that step is saved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from ultrametric_jax.parallel import sharding
from ultrametric_jax.errors import ConfigError
from ultrametric_jax.cli.flags import surgery_config
from ultrametric_jax.run.data import (BatchIterator, PackedSequences, build_splits, corpus_tokenizer,
                                  eval_batches)
from ultrametric_jax.surgery.losses import token_cross_entropy, total_loss
from ultrametric_jax.run.metrics import MetricsWriter, format_scalars, progress_bar
from ultrametric_jax.surgery.router import RouterParam
from ultrametric_jax.run.checkpoint import RunCheckpointer, base_model_identity, check_same_base
from ultrametric_jax.surgery.annealing import lambda_schedule, tau_schedule
from ultrametric_jax.surgery.inject import forward_with_aux, inject_topology, set_tau
from ultrametric_jax.surgery.attention import GumbelTemperature

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
                    lambda_fn: Callable, state_shardings: Optional[tuple] = None) -> Callable:
    """jit(train_step(params, opt_state, mutable, frozen, step, input_ids [A,b,S], mask [A,b,S]))
    -> (params, opt_state, mutable, metrics).

    state_shardings: the (params, opt_state, mutable) shardings of the state passed in, which
    the step returns its state with, so that the next step reuses this compilation; None (one
    device) leaves them to the compiler.
    """
    grad_fn = make_grad_fn(graphdef)

    def train_step(params, opt_state, mutable, frozen, step_index, input_ids, mask):
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

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=(0, 1, 2))
    return jax.jit(train_step, donate_argnums=(0, 1, 2), out_shardings=(*state_shardings, None))


_STEP_CACHE: dict = {}


def cached_train_step(graphdef, train: ml_collections.ConfigDict, surgery,
                      state_shardings: Optional[tuple] = None) -> Callable:
    """make_train_step for this model structure, train config, surgery and state shardings,
    built once per process, so that a second trainer of the same run reuses the compiled
    step."""
    leaves, treedef = jax.tree.flatten(state_shardings)
    key = (graphdef, surgery, json.dumps(train.to_dict(), sort_keys=True), tuple(leaves),
           treedef)
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = make_train_step(graphdef, build_optimizer(train),
                                           tau_schedule(surgery), lambda_schedule(surgery),
                                           state_shardings)
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


def run_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The device mesh config.mesh asks for, checked against the training batch: ConfigError
    naming the field when the devices cannot form it or a micro-batch cannot split over its
    data-parallel devices. Loads nothing, so a run can check it first."""
    try:
        mesh = sharding.mesh_from_config(config.mesh)
    except sharding.ShardingError as e:
        raise ConfigError(f"invalid config value mesh={config.mesh.to_dict()}: {e}") from None
    micro_batch = config.train.batch_size // config.train.grad_accum
    ways = sharding.data_parallel_size(mesh)
    if micro_batch % ways:
        raise ConfigError(
            f"invalid config value train.batch_size={config.train.batch_size}: each "
            f"micro-batch of {micro_batch} sequences must split evenly over the "
            f"{ways} data-parallel devices of mesh {dict(mesh.shape)}; change "
            "train.batch_size or config.mesh")
    return mesh


def place_on_mesh(model, mesh: Mesh) -> None:
    """Shards the model's arrays over `mesh` by their logical axes (a no-op on one device)."""
    if mesh.size > 1:
        sharding.shard_module(model, mesh)


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
        self.accum = config.train.grad_accum
        self.micro_batch = config.train.batch_size // self.accum
        # The model's arrays on the mesh by their logical axes; the batch splits over
        # data x fsdp.
        self.mesh = run_mesh(config)
        place_on_mesh(model, self.mesh)
        self.graphdef, self.params, self.mutable, self.frozen = nnx.split(
            model, RouterParam, MUTABLE, ...)
        self.opt_state = self.tx.init(self.params)
        shardings = None
        if self.mesh.size > 1:
            layout = self._checkpoint_state()
            shardings = sharding.state_shardings(layout, self.mesh)
            layout = jax.device_put(layout, shardings)
            self.params, self.opt_state, self.mutable = (
                layout["router"], layout["opt"], layout["mutable"])
            shardings = (shardings["router"], shardings["opt"], shardings["mutable"])
        self.step = 0
        self.data = BatchIterator(train_data, config.train.batch_size,
                                  seed=config.seed)
        self.checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR),
                                            keep=config.checkpoint.keep)
        self._step_fn = cached_train_step(self.graphdef, config.train, surgery, shardings)
        self.metrics = MetricsWriter(workdir)

    # ------------------------------------------------------------------ state

    def _checkpoint_state(self) -> dict:
        return checkpoint_layout(self.params, self.opt_state, self.mutable)

    def restore(self) -> Optional[int]:
        """Load the newest readable checkpoint, if any, placed as the current state is;
        returns its step."""
        restored = self.checkpointer.restore_latest(self._checkpoint_state())
        if restored is None:
            return None
        check_same_base(restored.meta["base_model"], self.base_identity)
        self.params = restored.state["router"]
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
        log_every, save_every = self.config.train.log_every, self.config.checkpoint.every
        resumed = self.restore() if resume else None
        # Records past the restored step come from an interrupted attempt: drop them.
        self.metrics.truncate_after(self.step)
        start_time, last = time.time(), {}
        pending, window_start = [], time.time()
        bar = progress_bar(total, initial=self.step, enabled=self.progress)
        try:
            while self.step < total:
                ids, mask = self._next_batch()
                params, opt_state, mutable, metrics = self._step_fn(
                    self.params, self.opt_state, self.mutable, self.frozen,
                    jnp.asarray(self.step, jnp.int32), ids, mask)
                # The old state was donated to the step: adopt the new one.
                self.params, self.opt_state, self.mutable = params, opt_state, mutable
                self.step += 1
                pending.append((self.step, metrics))
                bar.update(1)
                saving = self.step % save_every == 0 or self.step == total
                if saving or self.step % log_every == 0:
                    last = self._read_metrics(pending, time.time() - window_start)
                    bar.set_postfix(format_scalars(last, ("loss", "ce", "density", "tau")),
                                    refresh=False)
                    if saving:
                        self.save()
                    pending, window_start = [], time.time()
        finally:
            bar.close()
            self.sync_model()
            self.model.eval()
        return TrainOutcome(step=self.step, resumed_from=resumed, last_metrics=last,
                            seconds=time.time() - start_time)

    def _read_metrics(self, pending: list, seconds: float) -> dict:
        """Fetch the metrics of the steps run since the last read (one host sync), stop on the
        first non-finite loss among them, and log those of logging steps; returns the newest.

        tokens_per_s is the throughput over those steps.
        """
        fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(
            [m for _, m in pending])]
        tokens_per_s = sum(m.pop("tokens") for m in fetched) / max(seconds, 1e-9)
        for (step, _), m in zip(pending, fetched):
            if not math.isfinite(m["loss"]):
                last_good = self.checkpointer.latest_step()
                raise NonFiniteLossError(
                    f"non-finite training loss ({m['loss']}) at step {step} "
                    f"(ce={m['ce']}, balance_loss={m['balance_loss']}); "
                    f"stopping. The last good checkpoint is step {last_good} in "
                    f"{self.checkpointer.directory}; lower train.lr or check the data.")
            m["tokens_per_s"] = tokens_per_s
            if step % self.config.train.log_every == 0 or step == self.config.train.steps:
                self.metrics.write(step, m)
        return fetched[-1]

    def close(self) -> None:
        self.metrics.close()
        self.checkpointer.close()


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
    from ultrametric_jax.io import assets
    spec = config.model.path or "smollm2"
    try:
        return assets.resolve_model(spec, install=install)
    except FileNotFoundError as e:
        raise ConfigError(f"invalid config value model.path={config.model.path!r}: {e}") from None


def setup_run(config: ml_collections.ConfigDict, *, install: bool = False) -> RunSetup:
    """Load the frozen base model, its identity, its tokenizer and the packed data splits."""
    from ultrametric_jax.io.checkpoints import load_pretrained
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

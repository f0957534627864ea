"""Router-only training of a surgical model: the loop, its checkpoints, resume and metrics.

On a mesh the compiled step returns its state with the shardings it was given (each array
placed by its logical axes, optimiser moments like their parameters), so every step, and every
step after a resume, runs the one compiled program. The host reads the step metrics only on
logging and saving steps, and on the step after a save; it then checks every step since the
last read.

A checkpoint holds only a state known to be sound: its parameters finite, and the loss and
gradients computed from it finite. The state of a saving step is therefore kept aside and
written once the next step (or, at the end, one trial step whose update is discarded) has
computed its loss and gradients. A non-finite step stops the run with the previous sound
checkpoint as the newest one, so that a resume with, say, a lower learning rate continues from
it. A run resumes from the newest readable checkpoint of its directory: router and optimiser
state, RNG state, step and data-iterator position, so an interrupted run continues exactly as
an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ultrametric_jax.parallel import sharding
from ultrametric_jax.run.checkpoint import CHECKPOINT_SUBDIR, RunCheckpointer
from ultrametric_jax.run.data import BatchIterator, PackedSequences
from ultrametric_jax.run.metrics import MetricsWriter, format_scalars, progress_bar
from ultrametric_jax.run.optimizer import build_optimizer
from ultrametric_jax.run.provenance import check_same_base, check_same_setup
from ultrametric_jax.run.settings import RunConfig
from ultrametric_jax.run.step import PARAMS_FINITE, cached_train_step, split_model


class NonFiniteLossError(RuntimeError):
    """A training step gave a non-finite loss, gradient or parameter; the run stopped without
    saving that state."""


def checkpoint_layout(params, opt_state, mutable) -> dict:
    """The state a run checkpoint holds; the one definition shared by saving, resuming and
    `checkpoint_template`, so that they cannot disagree."""
    return {"router": params, "opt": opt_state, "mutable": mutable}


def checkpoint_template(run: RunConfig, model) -> dict:
    """The checkpoint state layout SurgeryTrainer saves for `model` (injected) under `run`:
    a restore template whose leaves have the saved structure, shapes and dtypes.

    Puts `model` in training mode, as the trainer does before splitting it.
    """
    model.train()
    _, params, mutable, _ = split_model(model)
    return checkpoint_layout(params, build_optimizer(run.train).init(params), mutable)


@dataclasses.dataclass
class TrainOutcome:
    step: int                 # steps completed (== train.steps unless stopped)
    resumed_from: Optional[int]
    last_metrics: dict
    seconds: float


@dataclasses.dataclass
class Snapshot:
    """The state after `step`, copied aside until it is known to be sound."""
    step: int
    state: dict
    data_state: dict


class SurgeryTrainer:
    """Trains the routers of an injected model on `mesh`; owns the run directory's
    checkpoints. `run` may be replaced between calls of train() (more steps, say)."""

    def __init__(self, run: RunConfig, model, train_data: PackedSequences, workdir: str,
                 base_identity: dict, mesh: Mesh, *, progress: bool = True):
        self.run, self.model, self.workdir, self.mesh = run, model, workdir, mesh
        self.base_identity, self.progress = base_identity, progress
        self.model_config = dataclasses.asdict(model.config)
        self.tx = build_optimizer(run.train)
        model.train()
        # The model's arrays on the mesh by their logical axes; the batch splits over
        # data x fsdp.
        if mesh.size > 1:
            sharding.shard_module(model, mesh)
        self.graphdef, self.params, self.mutable, self.frozen = split_model(model)
        self.opt_state = self.tx.init(self.params)
        shardings = None
        if mesh.size > 1:
            layout = self._checkpoint_state()
            shardings = sharding.state_shardings(layout, mesh)
            layout = jax.device_put(layout, shardings)
            self.params, self.opt_state, self.mutable = (
                layout["router"], layout["opt"], layout["mutable"])
            shardings = (shardings["router"], shardings["opt"], shardings["mutable"])
        self.step = 0
        self.data = BatchIterator(train_data, run.train.batch_size, seed=run.seed)
        self.checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR),
                                            keep=run.checkpoint.keep)
        self._shardings = shardings
        self._compiled_step = None        # built on the first step (none when steps = 0)
        self.metrics = MetricsWriter(workdir)

    @property
    def _step_fn(self):
        if self._compiled_step is None:
            self._compiled_step = cached_train_step(self.graphdef, self.run.train,
                                                    self.run.surgery, self._shardings,
                                                    self.run.objective)
        return self._compiled_step

    # ------------------------------------------------------------------ state

    def _checkpoint_state(self) -> dict:
        return checkpoint_layout(self.params, self.opt_state, self.mutable)

    def check_checkpoint(self, meta: dict, where: str) -> None:
        """Refuses a checkpoint of another base model, surgery topology or architecture."""
        check_same_base(meta["base_model"], self.base_identity)
        check_same_setup(meta, where, self.run.surgery, self.model_config)

    def restore(self) -> Optional[int]:
        """Load the newest readable checkpoint, if any, placed as the current state is;
        returns its step."""
        restored = self.checkpointer.restore_latest(self._checkpoint_state(),
                                                    self.check_checkpoint)
        if restored is None:
            return None
        self.params = restored.state["router"]
        self.opt_state = restored.state["opt"]
        self.mutable = restored.state["mutable"]
        self.data.set_state(restored.meta["data_state"])
        self.step = restored.step
        self.sync_model()
        return restored.step

    def snapshot(self) -> Snapshot:
        """A copy of the current state (the next step donates the live one)."""
        return Snapshot(self.step, jax.tree.map(jnp.copy, self._checkpoint_state()),
                        self.data.state())

    def save(self, snapshot: Snapshot) -> None:
        self.checkpointer.save(snapshot.step, snapshot.state, data_state=snapshot.data_state,
                               base_model=self.base_identity, config=self.run.to_dict(),
                               surgery=self.run.surgery.to_dict(),
                               model_config=self.model_config)

    def sync_model(self) -> None:
        """Write the trained state back into the model object (for evaluation / export)."""
        nnx.update(self.model, self.params, self.mutable)

    # ------------------------------------------------------------------ loop

    def _next_batch(self):
        batch = next(self.data)
        # Each process holds its own share of every micro-batch (its Grain data shard).
        shape = (self.run.train.grad_accum, -1, batch["input_ids"].shape[-1])
        ids, mask = batch["input_ids"].reshape(shape), batch["attention_mask"].reshape(shape)
        if self.mesh.size == 1:
            return jnp.asarray(ids), jnp.asarray(mask)
        return (sharding.global_batch(ids, self.mesh, batch_dim=1),
                sharding.global_batch(mask, self.mesh, batch_dim=1))

    def train(self, resume: bool = True) -> TrainOutcome:
        total = self.run.train.steps
        log_every, save_every = self.run.train.log_every, self.run.checkpoint.every
        resumed = self.restore() if resume else None
        # Records past the restored step come from an interrupted attempt: drop them.
        self.metrics.truncate_after(self.step)
        start_time, last = time.time(), {}
        pending, window_start = [], time.time()
        unsaved: Optional[Snapshot] = None
        bar = progress_bar(total, initial=self.step, enabled=self.progress and total > 0)
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
                if saving or unsaved is not None or self.step % log_every == 0:
                    last = self._read_metrics(pending, time.time() - window_start)
                    bar.set_postfix(format_scalars(last, ("loss", "ce", "density", "tau")),
                                    refresh=False)
                    if unsaved is not None:     # this step's loss and gradients are its own
                        self.save(unsaved)
                        unsaved = None
                    if saving:
                        unsaved = self.snapshot()
                    pending, window_start = [], time.time()
            if unsaved is not None:
                self._trial_step(unsaved.step)
                self.save(unsaved)
            elif total == 0 and self.checkpointer.latest_step() is None:
                # No training: the collapse-initialised routers are the run's step 0.
                self.save(self.snapshot())
        finally:
            bar.close()
            self.sync_model()
            self.model.eval()
        return TrainOutcome(step=self.step, resumed_from=resumed, last_metrics=last,
                            seconds=time.time() - start_time)

    def _trial_step(self, step: int) -> None:
        """One step from a copy of the current state on the next batch, its update discarded
        and the data position kept: raises NonFiniteLossError unless the loss and gradients
        of the current state are finite."""
        position = self.data.state()
        ids, mask = self._next_batch()
        self.data.set_state(position)
        state = jax.tree.map(jnp.copy, (self.params, self.opt_state, self.mutable))
        _, _, _, metrics = self._step_fn(*state, self.frozen, jnp.asarray(step, jnp.int32),
                                         ids, mask)
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        problem = self._problem(m, check_params=False)
        if problem:
            what, details = problem
            raise NonFiniteLossError(self._stop_message(
                f"{what} from the state after step {step} (a trial step on the next "
                f"batch){details}"))

    @staticmethod
    def _problem(m: dict, *, check_params: bool = True) -> Optional[tuple[str, str]]:
        """(what, details) of what is non-finite in one step's fetched metrics, or None."""
        if not math.isfinite(m["loss"]):
            return (f"non-finite training loss ({m['loss']})",
                    f" (ce={m['ce']}, balance_loss={m['balance_loss']})")
        if not math.isfinite(m["grad_norm"]):
            return f"non-finite gradient norm ({m['grad_norm']})", ""
        if check_params and m[PARAMS_FINITE] != 1.0:
            return "non-finite router parameters", " after the update"
        return None

    def _stop_message(self, what: str) -> str:
        last_good = self.checkpointer.latest_step()
        where = (f"The last good checkpoint is step {last_good} in "
                 f"{self.checkpointer.directory}" if last_good is not None
                 else "No checkpoint was written")
        return f"{what}; stopping. {where}; lower train.lr or check the data."

    def _read_metrics(self, pending: list, seconds: float) -> dict:
        """Fetch the metrics of the steps run since the last read (one host sync), stop on the
        first non-finite loss, gradient or parameter among them, and log those of logging
        steps; returns the newest.

        tokens_per_s is the throughput over those steps.
        """
        fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(
            [m for _, m in pending])]
        tokens_per_s = sum(m.pop("tokens") for m in fetched) / max(seconds, 1e-9)
        for (step, _), m in zip(pending, fetched):
            problem = self._problem(m)
            if problem:
                what, details = problem
                raise NonFiniteLossError(self._stop_message(f"{what} at step {step}{details}"))
            m.pop(PARAMS_FINITE)
            m["tokens_per_s"] = tokens_per_s
            if step % self.run.train.log_every == 0 or step == self.run.train.steps:
                self.metrics.write(step, m)
        return fetched[-1]

    def close(self) -> None:
        self.metrics.close()
        self.checkpointer.close()


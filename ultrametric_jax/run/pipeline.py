"""The surgery pipeline that every command runs, in the order a run goes:

    mesh = check_mesh(run)                        # the devices can serve config.mesh
    refuse_drift(run, workdir)                    # the run directory was trained like this
    setup = setup_run(run)                        # frozen base model, its identity, the data
    dense = dense_baseline(setup, run, workdir)   # held-out perplexity of the base model
    inject(run, setup.model)                      # the collapse-initialised topology
    outcome = make_trainer(...).train()           # routers only; resumes; checkpoints
    report = evaluate(run, setup, ...)            # surgical perplexity, density, eval.json

`train_and_evaluate` is `ultrametric run` (and, without the evaluation, `ultrametric train`);
`evaluate_run` is `ultrametric eval`; `restore_run` / `export_run` rebuild a run's trained model
from its checkpoint for `ultrametric export`. Everything here takes the typed `RunConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from flax import nnx
from jax.sharding import Mesh

from ultrametric_jax.errors import CheckpointError, ConfigError
from ultrametric_jax.io import assets
from ultrametric_jax.io.export_format import SELECTOR_FILE
from ultrametric_jax.io.checkpoints import load_pretrained
from ultrametric_jax.parallel import sharding
from ultrametric_jax.run import evaluate as evaluation
from ultrametric_jax.run.checkpoint import (CHECKPOINT_SUBDIR, CorruptCheckpointError, Restored,
                                            RunCheckpointReader)
from ultrametric_jax.run.data import PackedSequences, build_splits, corpus_tokenizer, eval_batches
from ultrametric_jax.run.host_memory import release_compiled
from ultrametric_jax.run.key_selection import fit_key_selectors
from ultrametric_jax.run.metrics import MetricsWriter
from ultrametric_jax.run.export import (ExportError, export_surgical_model, load_selectors,
                                        save_selectors, selector_info, selector_surgery,
                                        tokenizer_source, verify_base_model)
from ultrametric_jax.run.provenance import (CheckpointMismatchError, ConfigDriftError,
                                            base_model_identity, check_same_base,
                                            check_same_setup, surgery_changes)
from ultrametric_jax.run.settings import DTYPES, RunConfig
from ultrametric_jax.run.tasks import parse_task_names, run_tasks
from ultrametric_jax.run.window_baseline import matched_baseline
from ultrametric_jax.run.tasks.chat import chat_template_from_gguf
from ultrametric_jax.run.trainer import (SurgeryTrainer, TrainOutcome, checkpoint_template)
from ultrametric_jax.surgery.budget import attach_density_multiplier
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.inject import base_model_mode, inject_topology

DENSE_CACHE = "dense_eval.json"
RUN_CONFIG = "config.json"


# ----------------------------------------------------------------------------- setup

def check_mesh(run: RunConfig) -> Mesh:
    """The device mesh run.mesh asks for, checked against the training batch: ConfigError
    naming the field when the devices cannot form it or a micro-batch cannot split over its
    data-parallel devices. Loads nothing, so a run can check it first."""
    try:
        mesh = sharding.mesh_from_config(run.mesh.axis_sizes())
    except sharding.ShardingError as e:
        raise ConfigError(f"invalid config value mesh={run.mesh.axis_sizes()}: {e}") from None
    ways = sharding.data_parallel_size(mesh)
    if run.train.micro_batch % ways:
        raise ConfigError(
            f"invalid config value train.batch_size={run.train.batch_size}: each "
            f"micro-batch of {run.train.micro_batch} sequences must split evenly over the "
            f"{ways} data-parallel devices of mesh {dict(mesh.shape)}; change "
            "train.batch_size or config.mesh")
    return mesh


EXTRA_CHUNK_CHARS = 4096


@dataclasses.dataclass
class RunSetup:
    """A loaded base model (not yet injected) and the data of a run."""
    model: object
    weights_path: str
    identity: dict
    train_data: PackedSequences
    val_batches: list
    tokenizer_path: str = ""
    # corpus -> its held-out batches, for every eval.extra_corpora entry
    extra_batches: dict = dataclasses.field(default_factory=dict)


def resolve_model_source(run: RunConfig, *, install: bool) -> assets.ModelSource:
    """Where the base model lives; model.path "" means the default offline SmolLM2."""
    try:
        return assets.resolve_model(run.model.path or "smollm2", install=install)
    except FileNotFoundError as e:
        raise ConfigError(f"invalid config value model.path={run.model.path!r}: {e}") from None


def load_base_model(path: str, run: RunConfig):
    """The frozen base model at `path` in the run's dtypes; a config.json that is not JSON is
    a CheckpointError naming the file."""
    try:
        return load_pretrained(path, dtype=run.model.dtype, param_dtype=run.model.param_dtype)
    except json.JSONDecodeError as e:
        name = os.path.join(path, "config.json") if os.path.isdir(path) else path
        raise CheckpointError(f"{name} is not valid JSON ({e})") from None


def setup_run(run: RunConfig, *, install: bool = False) -> RunSetup:
    """Load the frozen base model, its identity, its tokenizer and the packed data splits."""
    source = resolve_model_source(run, install=install)
    model = load_base_model(source.weights, run)
    limit = model.config.max_position_embeddings
    if run.train.seq_len > limit:
        raise ConfigError(f"invalid config value train.seq_len={run.train.seq_len}: the "
                          f"model supports at most {limit} positions")
    tokenizer = corpus_tokenizer(source.tokenizer or source.weights, model.config)
    train_data, val_data = build_splits(run.data, tokenizer, run.train.seq_len)
    val_batches = eval_batches(val_data, run.eval.batch_size, run.eval.batches)
    extra = {}
    for corpus in run.eval.extra_corpora:
        # Out of the training domain: every document may be held out, the split only fixes
        # which ones are read (the same as a training run on that corpus would hold out).
        # Documents are cut into 4k-character pieces first, so the hashed split samples the
        # whole corpus, not a few whole files.
        data = dataclasses.replace(run.data, corpus=corpus, max_chars=run.eval.extra_max_chars,
                                   chunk_chars=run.data.chunk_chars or EXTRA_CHUNK_CHARS)
        extra[corpus] = eval_batches(build_splits(data, tokenizer, run.train.seq_len)[1],
                                     run.eval.batch_size, run.eval.batches)
    return RunSetup(model=model, weights_path=source.weights,
                    identity=base_model_identity(source.weights), train_data=train_data,
                    val_batches=val_batches, tokenizer_path=source.tokenizer or source.weights,
                    extra_batches=extra)


def inject(run: RunConfig, model) -> None:
    """Inject the configured topology; router initialisation and Gumbel noise follow the seed.
    A dual-ascent density budget also gives the model its multipliers (mutable run state)."""
    inject_topology(model, run.surgery, nnx.Rngs(params=run.seed, gumbel=run.seed + 1))
    objective = run.objective
    if objective.density_target is not None and objective.budget == "dual":
        attach_density_multiplier(model, len(model.model.layers), objective.per_layer)


def place_on_mesh(model, mesh: Mesh) -> None:
    """Shards the model's arrays over `mesh` by their logical axes (a no-op on one device)."""
    if mesh.size > 1:
        sharding.shard_module(model, mesh)


# ----------------------------------------------------------------------------- run directory

def write_json(path: str, obj) -> None:
    """Write `obj` as JSON to a temporary file, then rename it over `path`: a reader sees the
    old file or the new one, never a torn one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_SUBDIR)


def refuse_drift(run: RunConfig, workdir: str) -> None:
    """ConfigDriftError when the newest checkpoint of the run directory was trained with
    another surgery topology; reads only (a run may be writing), before anything loads."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return
    reader = RunCheckpointReader(directory)
    try:
        step = reader.latest_step()
        if step is None:
            return
        try:
            meta = reader.read_meta(step)
        except CorruptCheckpointError:
            return      # restoring skips it, and checks the step it restores
    finally:
        reader.close()
    check_same_setup(meta, f"checkpoint step {step} in {directory}", run.surgery)


def dense_baseline(setup: RunSetup, run: RunConfig, workdir: str) -> dict:
    """Perplexity of the base model on the held-out batches, cached in the workdir per base
    model, data, evaluation settings and dtypes; an unreadable cache file is recomputed."""
    key = {"base_model": setup.identity["files"], "data": dataclasses.asdict(run.data),
           "seq_len": run.train.seq_len, "eval": dataclasses.asdict(run.eval),
           "dtype": run.model.dtype, "param_dtype": run.model.param_dtype}
    key = json.loads(json.dumps(key))      # as the cache file holds it (tuples become lists)
    path = os.path.join(workdir, DENSE_CACHE)
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached["result"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, or one that cannot be read: measure afresh
    result = evaluation.perplexity(setup.model, setup.val_batches)
    write_json(path, {"key": key, "result": result})
    return result


# ----------------------------------------------------------------------------- train, evaluate

def make_trainer(run: RunConfig, setup: RunSetup, mesh: Mesh, workdir: str, *,
                 progress: bool = True) -> SurgeryTrainer:
    """The trainer of an injected setup.model, writing to workdir."""
    return SurgeryTrainer(run, setup.model, setup.train_data, workdir, setup.identity, mesh,
                          progress=progress)


def fit_selection(run: RunConfig, setup: RunSetup, workdir: str, step: int) -> Optional[dict]:
    """Fits the key selectors of a surgery with key_rank > 0 (run.selection: the score
    projections on the first training rows, the threshold on the next ones) and writes them
    beside the checkpoints (SELECTOR_FILE, atomically); what was fitted, or None."""
    if not run.surgery.key_rank:
        return None
    selection, data = run.selection, setup.train_data
    needed = selection.fit_rows + selection.calibration_rows
    if len(data) < needed:
        raise ConfigError(f"invalid config value selection.fit_rows={selection.fit_rows}: "
                          f"the training split packs into {len(data)} rows, fewer than "
                          f"fit_rows + calibration_rows = {needed}")
    rows = [{"input_ids": data.tokens[i:i + 1], "attention_mask": data.mask[i:i + 1]}
            for i in range(needed)]
    fitted = fit_key_selectors(setup.model, rows[:selection.fit_rows],
                               rows[selection.fit_rows:], selection.target_density,
                               selection.steps)
    info = {"key_rank": run.surgery.key_rank, "target_density": selection.target_density,
            "calibration_rows": selection.calibration_rows, "step": step, **fitted}
    save_selectors(setup.model, os.path.join(workdir, SELECTOR_FILE), info)
    return info


def evaluate(run: RunConfig, setup: RunSetup, workdir: str, dense: Optional[dict],
             step: int) -> evaluation.EvalReport:
    """Evaluate the (trained, injected) setup.model on the training corpus's held-out split
    and on every extra corpus (dense through base_model_mode: the same parameters without the
    topology); writes eval.json and eval.png. Key selectors (surgery.key_rank > 0) are fitted
    first, on training rows."""
    selection = fit_selection(run, setup, workdir, step)
    surgical = evaluation.evaluate_surgical(setup.model, setup.val_batches, run.surgery)
    by_corpus = {}
    for corpus, batches in setup.extra_batches.items():
        with base_model_mode(setup.model):
            dense_extra = evaluation.perplexity(setup.model, batches)
        by_corpus[corpus] = {"dense": dense_extra, "surgical": evaluation.evaluate_surgical(
            setup.model, batches, run.surgery)}
    window_only = None
    if run.eval.window_baseline:
        # The same base parameters, the same batches, the surgical density of each corpus.
        sink = run.surgery.sink_tokens
        window_only = matched_baseline(setup.model, setup.val_batches, surgical["density"], sink)
        for corpus, batches in setup.extra_batches.items():
            by_corpus[corpus]["window_only"] = matched_baseline(
                setup.model, batches, by_corpus[corpus]["surgical"]["density"], sink)
    report = evaluation.EvalReport(dense=dense, surgical=surgical, step=step,
                                   surgery=run.surgery.to_dict(), by_corpus=by_corpus,
                                   window_only=window_only, selection=selection)
    evaluation.write_report(report, workdir)
    if run.eval.tasks:
        release_compiled()
        # One model object serves both sides: the dense side runs in base_model_mode. The
        # perplexity report is on disk first, so a failing task loses nothing of it.
        path = setup.tokenizer_path
        tasks = run_tasks(run.eval.tasks, setup.model, setup.model, path,
                          fast=run.eval.tasks_fast, out_dir=workdir,
                          chat_template=chat_template_from_gguf(path)
                          if path.endswith(".gguf") else None)
        report.tasks = tasks["summary"]
        evaluation.write_report(report, workdir)
    metrics = MetricsWriter(workdir)      # TensorBoard, where installed (process 0 only)
    try:
        metrics.write_layer_density(step, surgical["density_per_layer"],
                                    surgical["tree_density_per_layer"])
    finally:
        metrics.close()
    return report


def train_and_evaluate(run: RunConfig, workdir: str, *, install: bool, evaluate_after: bool
                       ) -> tuple[TrainOutcome, Optional[evaluation.EvalReport]]:
    """(train outcome, eval report or None); raises NonFiniteLossError / UserError."""
    sharding.maybe_initialize_distributed(True if run.distributed else None)
    mesh = check_mesh(run)      # a mesh or batch the devices cannot serve fails first
    if evaluate_after and run.eval.tasks:
        parse_task_names(run.eval.tasks)
    refuse_drift(run, workdir)
    setup = setup_run(run, install=install)
    write_json(os.path.join(workdir, RUN_CONFIG), run.to_dict())
    dense = dense_baseline(setup, run, workdir) if evaluate_after else None
    release_compiled()             # each phase compiles its own programs: free the last one's
    inject(run, setup.model)
    trainer = make_trainer(run, setup, mesh, workdir)
    try:
        outcome = trainer.train()
    finally:
        trainer.close()
    if not evaluate_after:
        return outcome, None
    release_compiled()
    return outcome, evaluate(run, setup, workdir, dense, outcome.step)


def restore_latest(run: RunConfig, model, identity: dict, workdir: str) -> Optional[Restored]:
    """The newest readable checkpoint of workdir, read only, written into the injected model;
    None (model untouched) when there is none. Refuses one of another base model, topology or
    architecture."""
    model_config = dataclasses.asdict(model.config)

    def check(meta: dict, where: str) -> None:
        check_same_base(meta["base_model"], identity)
        check_same_setup(meta, where, run.surgery, model_config)

    # Read-only: a run may still be writing to this directory.
    reader = RunCheckpointReader(checkpoint_dir(workdir))
    try:
        restored = reader.restore_latest(checkpoint_template(run, model), check)
    finally:
        reader.close()
    if restored is not None:
        nnx.update(model, restored.state["router"], restored.state["mutable"])
    return restored


def evaluate_run(run: RunConfig, workdir: str
                 ) -> tuple[evaluation.EvalReport, Optional[Restored]]:
    """Dense vs surgical evaluation of the newest checkpoint of workdir (the collapse-
    initialised topology when there is none); (report, restored checkpoint or None)."""
    mesh = check_mesh(run)
    refuse_drift(run, workdir)
    if run.eval.tasks:
        parse_task_names(run.eval.tasks)     # an unknown task fails before anything loads
    setup = setup_run(run)
    dense = dense_baseline(setup, run, workdir)
    inject(run, setup.model)
    place_on_mesh(setup.model, mesh)
    restored = restore_latest(run, setup.model, setup.identity, workdir)
    setup.model.eval()
    return evaluate(run, setup, workdir, dense, restored.step if restored else 0), restored


# ----------------------------------------------------------------------------- export

@dataclasses.dataclass
class RestoredRun:
    """The trained surgical model of a run checkpoint and what it was built from."""
    model: object               # JAX LlamaForCausalLM with the topology, evaluation mode
    surgery: SurgeryConfig
    run: RunConfig              # the run's recorded settings
    step: int
    base_model: dict            # {"path", "files": {name: sha256}} as recorded
    checkpoint_dir: str


def restore_run(directory: str, step: Optional[int] = None,
                dtype: Optional[str] = None) -> RestoredRun:
    """The surgical model of a run's checkpoint (latest step by default), evaluation mode,
    after checking that the base model on disk is the one the run trained on. dtype: a compute
    dtype other than the run's (model.dtype; its weights keep model.param_dtype). Read only: it
    never prunes, quarantines or cleans the run's directory."""
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not a compute dtype; expected one of {DTYPES}")

    def unreadable(e: CorruptCheckpointError) -> ExportError:
        if e.cause is None:
            return ExportError(f"checkpoint step {step} in {directory} is corrupt: its "
                               "arrays do not match their recorded checksum; pick another --step")
        return ExportError(f"checkpoint step {step} in {directory} is unreadable "
                           f"({type(e.cause).__name__}: {str(e.cause)[:200]}); pick another "
                           "--step")

    reader = RunCheckpointReader(directory)
    try:
        steps = reader.all_steps()
        if not steps:
            raise ExportError(f"no checkpoint in {directory}: the run has not saved a step yet")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ExportError(f"no checkpoint step {step} in {directory} (available: {steps})")
        try:
            meta = reader.read_meta(step)
        except CorruptCheckpointError as e:
            raise unreadable(e) from e
        if "config" not in meta or "base_model" not in meta:
            raise ExportError(f"checkpoint step {step} in {directory} records no run config "
                              "or base model identity")
        run = with_fitted_selectors(RunConfig.from_dict(meta["config"]), directory, step)
        if dtype is not None:
            run = dataclasses.replace(run, model=dataclasses.replace(run.model, dtype=dtype))
        model = load_base_model(verify_base_model(meta["base_model"]), run)
        inject(run, model)
        model_config = dataclasses.asdict(model.config)

        def check(record: dict, where: str) -> None:
            # The state was shaped by the surgery it records; its run config must say the same.
            check_same_setup(record, where, run.surgery, model_config)

        try:
            state = reader.restore(step, checkpoint_template(run, model), check).state
        except ConfigDriftError:
            raise
        except CheckpointMismatchError:
            raise ExportError(f"checkpoint step {step} in {directory} holds a state layout "
                              "that its own recorded config does not produce") from None
        except CorruptCheckpointError as e:
            raise unreadable(e) from e
    finally:
        reader.close()
    nnx.update(model, state["router"], state["mutable"])
    if run.surgery.key_rank:
        restore_selectors(model, directory, step)
    model.eval()
    return RestoredRun(model=model, surgery=run.surgery, run=run, step=step,
                       base_model=meta["base_model"], checkpoint_dir=directory)


def selector_path(directory: str) -> str:
    """Where the key selectors of the run whose checkpoints are in `directory` are written."""
    return os.path.join(os.path.dirname(os.path.abspath(directory)), SELECTOR_FILE)


def with_fitted_selectors(run: RunConfig, directory: str, step: int) -> RunConfig:
    """`run` with the key selectors fitted for its routers of `step`, where the run trained
    without them and `ultrametric eval --config.surgery.key_rank=...` fitted them afterwards
    (their file beside the checkpoints records the surgery, same topology, and the step)."""
    path = selector_path(directory)
    if run.surgery.key_rank or not os.path.isfile(path):
        return run
    surgery, info = selector_surgery(path), selector_info(path)
    if (surgery is None or not surgery.key_rank or info.get("step") != step
            or info.get("target_density") is None or surgery_changes(run.surgery, surgery)):
        return run
    selection = dataclasses.replace(run.selection, target_density=info.get("target_density"))
    return dataclasses.replace(run, surgery=surgery, selection=selection)


def restore_selectors(model, directory: str, step: int) -> None:
    """Loads the key selectors fitted beside the checkpoint directory; they must have been
    fitted for the routers of `step` (ExportError otherwise, or when they are missing)."""
    path = selector_path(directory)
    load_selectors(model, path)
    fitted = selector_info(path).get("step")
    if fitted != step:
        raise ExportError(f"the key selectors in {path} were fitted for the routers of step "
                          f"{fitted}, not step {step}: evaluate the run at step {step} "
                          f"(`ultrametric eval`) to fit them, or pick --step {fitted}")


def export_run(directory: str, out_dir: str, *, step: Optional[int] = None,
               overwrite: bool = False) -> RestoredRun:
    """Restore a run checkpoint and export it to out_dir; returns what was exported."""
    restored = restore_run(directory, step)
    tokenizer, tokenizer_dir = tokenizer_source(restored.base_model["path"])
    export_surgical_model(
        restored.model, restored.surgery, out_dir, tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir, overwrite=overwrite,
        provenance={"checkpoint": directory, "step": restored.step,
                    "base_model": restored.base_model})
    return restored

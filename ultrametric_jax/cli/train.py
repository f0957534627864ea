"""`ultrametric train`: inject the topology into the frozen base model and train the routers.

Resumes from the newest readable checkpoint of --workdir. Exit status: 0 done, 1 training
stopped on a non-finite loss (the last good checkpoint is kept), 2 invalid configuration.
"""
from __future__ import annotations

import json
import os
import sys
import time

DESCRIPTION = "Train the injected topology (routers only, base model frozen); resumable."
DENSE_CACHE = "dense_eval.json"


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


def write_run_config(config, workdir: str) -> None:
    write_json(os.path.join(workdir, "config.json"), config.to_dict())


def dense_baseline(setup, config, workdir: str) -> dict:
    """Perplexity of the base model on the held-out batches, cached in the workdir per base
    model, data, evaluation settings and dtypes; an unreadable cache file is recomputed."""
    from ultrametric_jax.run.evaluate import perplexity
    key = {"base_model": setup.identity["files"], "data": config.data.to_dict(),
           "seq_len": config.train.seq_len, "eval": config.eval.to_dict(),
           "dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    path = os.path.join(workdir, DENSE_CACHE)
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached["result"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, or one that cannot be read: measure afresh
    result = perplexity(setup.model, setup.val_batches)
    write_json(path, {"key": key, "result": result})
    return result


def train_pipeline(config, workdir: str, *, install: bool, evaluate: bool):
    """(train outcome, eval report or None); raises NonFiniteLossError / ConfigError."""
    from ultrametric_jax.cli.flags import surgery_config
    from ultrametric_jax.run.evaluate import EvalReport, evaluate_surgical, write_report
    from ultrametric_jax.parallel.sharding import maybe_initialize_distributed
    from ultrametric_jax.run.trainer import SurgeryTrainer, inject, run_mesh, setup_run
    maybe_initialize_distributed(True if config.get("distributed") else None)
    run_mesh(config)  # a mesh or batch the devices cannot serve fails before anything loads
    setup = setup_run(config, install=install)
    write_run_config(config, workdir)
    dense = dense_baseline(setup, config, workdir) if evaluate else None
    inject(config, setup.model)
    trainer = SurgeryTrainer(config, setup.model, setup.train_data, workdir, setup.identity)
    try:
        outcome = trainer.train()
    finally:
        trainer.close()
    if not evaluate:
        return outcome, None
    surgical = evaluate_surgical(setup.model, setup.val_batches, surgery_config(config))
    report = EvalReport(dense=dense, surgical=surgical, step=outcome.step)
    write_report(report, workdir)
    return outcome, report


def _body(config, config_path: str, workdir: str) -> int:
    from ultrametric_jax.run.trainer import NonFiniteLossError
    start = time.time()
    try:
        outcome, _ = train_pipeline(config, workdir, install=False, evaluate=False)
    except NonFiniteLossError as e:
        print(f"ultrametric train: {e}", file=sys.stderr)
        return 1
    resumed = f" (resumed from step {outcome.resumed_from})" if outcome.resumed_from else ""
    m = outcome.last_metrics
    tail = (f"; last loss {m['loss']:.4f}, ce {m['ce']:.4f}, density {m['density']:.3f}"
            if m else "")
    print(f"trained {outcome.step} steps{resumed} in {time.time() - start:.0f} s{tail}; "
          f"checkpoints in {os.path.join(workdir, 'checkpoints')}")
    return 0


def main(argv) -> int:
    from ultrametric_jax.cli.flags import command_main
    return command_main("train", DESCRIPTION, argv, _body)

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


def write_run_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)


def dense_baseline(setup, config, workdir: str) -> dict:
    """Perplexity of the base model on the held-out batches, cached per base model and data."""
    from ultrametric_jax.evaluate import perplexity
    key = {"base_model": setup.identity["files"], "data": config.data.to_dict(),
           "seq_len": config.train.seq_len, "eval": config.eval.to_dict(),
           "dtype": config.model.dtype}
    path = os.path.join(workdir, "dense_eval.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["result"]
    result = perplexity(setup.model, setup.val_batches)
    with open(path, "w") as f:
        json.dump({"key": key, "result": result}, f, indent=2)
    return result


def train_pipeline(config, workdir: str, *, install: bool, evaluate: bool):
    """(train outcome, eval report or None); raises NonFiniteLossError / ConfigError."""
    from ultrametric_jax.config_flags import surgery_config
    from ultrametric_jax.evaluate import EvalReport, evaluate_surgical, write_report
    from ultrametric_jax.sharding import maybe_initialize_distributed
    from ultrametric_jax.train import SurgeryTrainer, inject, setup_run
    maybe_initialize_distributed(True if config.get("distributed") else None)
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
    from ultrametric_jax.train import NonFiniteLossError
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
    from ultrametric_jax.config_flags import command_main
    return command_main("train", DESCRIPTION, argv, _body)

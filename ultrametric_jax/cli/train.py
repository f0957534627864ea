"""`ultrametric train`: inject the topology into the frozen base model and train the routers.

Resumes from the newest readable checkpoint of --workdir. Exit status: 0 done, 1 training
stopped on a non-finite step (the last good checkpoint is kept), 2 a user error.
"""
from __future__ import annotations

import sys
import time

from ultrametric_jax.cli.options import command_main
from ultrametric_jax.run.pipeline import checkpoint_dir, train_and_evaluate
from ultrametric_jax.run.settings import RunConfig
from ultrametric_jax.run.trainer import NonFiniteLossError

DESCRIPTION = "Train the injected topology (routers only, base model frozen); resumable."


def _body(run: RunConfig, config_path: str, workdir: str) -> int:
    start = time.time()
    try:
        outcome, _ = train_and_evaluate(run, workdir, install=False, evaluate_after=False)
    except NonFiniteLossError as e:
        print(f"ultrametric train: {e}", file=sys.stderr)
        return 1
    resumed = f" (resumed from step {outcome.resumed_from})" if outcome.resumed_from else ""
    m = outcome.last_metrics
    tail = (f"; last loss {m['loss']:.4f}, ce {m['ce']:.4f}, density {m['density']:.3f}"
            if m else "")
    print(f"trained {outcome.step} steps{resumed} in {time.time() - start:.0f} s{tail}; "
          f"checkpoints in {checkpoint_dir(workdir)}")
    return 0


def main(argv) -> int:
    return command_main("train", DESCRIPTION, argv, _body)

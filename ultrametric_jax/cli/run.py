"""`ultrametric run`: the whole job — fetch the default model if missing, measure the dense
baseline, train the routers (resumable), evaluate the surgical model, print a short report.
Exit status: 0 done, 1 training stopped on a non-finite step, 2 a user error."""
from __future__ import annotations

import os
import sys
import time

from ultrametric_jax.cli.options import command_main
from ultrametric_jax.run.pipeline import train_and_evaluate
from ultrametric_jax.run.settings import RunConfig
from ultrametric_jax.run.trainer import NonFiniteLossError

DESCRIPTION = ("Run the surgery pipeline: dense baseline, router training, surgical "
               "evaluation and report.")


def _body(run: RunConfig, config_path: str, workdir: str) -> int:
    start = time.time()
    try:
        outcome, report = train_and_evaluate(run, workdir, install=True, evaluate_after=True)
    except NonFiniteLossError as e:
        print(f"ultrametric run: {e}", file=sys.stderr)
        return 1
    name = os.path.splitext(os.path.basename(config_path))[0]
    resumed = f", resumed from step {outcome.resumed_from}" if outcome.resumed_from else ""
    trained = (f"{outcome.step} router steps{resumed}" if run.train.steps
               else "no router training (train.steps = 0)")
    print(f"ultrametric run {name}: {trained}, {time.time() - start:.0f} s in all")
    print(report.summary())
    print(f"results: {os.path.join(workdir, 'eval.json')}, {os.path.join(workdir, 'eval.png')}")
    return 0


def main(argv) -> int:
    return command_main("run", DESCRIPTION, argv, _body)

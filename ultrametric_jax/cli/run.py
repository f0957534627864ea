"""`ultrametric run`: the whole job — fetch the default model if missing, measure the dense
baseline, train the routers (resumable), evaluate the surgical model, print a short report."""
from __future__ import annotations

import os
import sys
import time

DESCRIPTION = ("Run the surgery pipeline: dense baseline, router training, surgical "
               "evaluation and report.")


def _body(config, config_path: str, workdir: str) -> int:
    from ultrametric_jax.cli.train import train_pipeline
    from ultrametric_jax.run.trainer import NonFiniteLossError
    start = time.time()
    try:
        outcome, report = train_pipeline(config, workdir, install=True, evaluate=True)
    except NonFiniteLossError as e:
        print(f"ultrametric run: {e}", file=sys.stderr)
        return 1
    name = os.path.splitext(os.path.basename(config_path))[0]
    resumed = f", resumed from step {outcome.resumed_from}" if outcome.resumed_from else ""
    print(f"ultrametric run {name}: {outcome.step} router steps{resumed}, "
          f"{time.time() - start:.0f} s in all")
    print(report.summary())
    print(f"results: {os.path.join(workdir, 'eval.json')}, {os.path.join(workdir, 'eval.png')}")
    return 0


def main(argv) -> int:
    from ultrametric_jax.cli.flags import command_main
    return command_main("run", DESCRIPTION, argv, _body)

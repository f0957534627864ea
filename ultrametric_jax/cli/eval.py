"""`ultrametric eval`: dense vs surgical perplexity, density per layer and routing entropy of
the newest readable checkpoint in --workdir (the collapse-initialised topology when there is
none), and with `--tasks fidelity,humaneval,instructions,retrieval` (or `all`; `--full-tasks`
for the full sets) the behaviour tasks, dense against surgical. Reads the checkpoints without
changing them, so it is safe while a run is training."""
from __future__ import annotations

import os
import sys

from ultrametric_jax.cli.options import command_main
from ultrametric_jax.run.evaluate import RESULTS_JSON, RESULTS_PNG
from ultrametric_jax.run.pipeline import checkpoint_dir, evaluate_run
from ultrametric_jax.run.settings import RunConfig

DESCRIPTION = ("Evaluate the newest surgery checkpoint of --workdir against the dense base "
               "model; writes eval.json and eval.png.")


def _body(run: RunConfig, config_path: str, workdir: str) -> int:
    report, restored = evaluate_run(run, workdir)
    if restored is None:
        print(f"ultrametric eval: no checkpoint in {checkpoint_dir(workdir)}; evaluated the "
              "collapse-initialised topology (step 0)", file=sys.stderr)
    print(report.summary())
    extra = ", tasks.json, tasks.png" if run.eval.tasks else ""
    print(f"results: {os.path.join(workdir, RESULTS_JSON)}, "
          f"{os.path.join(workdir, RESULTS_PNG)}{extra}")
    return 0


def task_flags(argv) -> list:
    """--tasks NAMES / --tasks=NAMES and --full-tasks, as the config fields they set."""
    out, argv, i = [], list(argv or []), 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--tasks" and i + 1 < len(argv):
            out.append(f"--config.eval.tasks={argv[i + 1]}")
            i += 2
            continue
        if arg.startswith("--tasks="):
            out.append("--config.eval.tasks=" + arg[len("--tasks="):])
        elif arg == "--full-tasks":
            out.append("--config.eval.tasks_fast=False")
        else:
            out.append(arg)
        i += 1
    return out


def main(argv) -> int:
    return command_main("eval", DESCRIPTION, task_flags(argv), _body)

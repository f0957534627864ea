"""`ultrametric eval`: dense vs surgical perplexity, density per layer and routing entropy of
the newest readable checkpoint in --workdir (the collapse-initialised topology when there is
none). Reads the checkpoints without changing them, so it is safe while a run is training."""
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
    print(f"results: {os.path.join(workdir, RESULTS_JSON)}, "
          f"{os.path.join(workdir, RESULTS_PNG)}")
    return 0


def main(argv) -> int:
    return command_main("eval", DESCRIPTION, argv, _body)

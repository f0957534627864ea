"""`ultrametric eval`: dense vs surgical perplexity, density per layer and routing entropy of
the newest readable checkpoint in --workdir (the collapse-initialised topology when there is
none). Reads the checkpoints without changing them, so it is safe while a run is training."""
from __future__ import annotations

import os
import sys

DESCRIPTION = ("Evaluate the newest surgery checkpoint of --workdir against the dense base "
               "model; writes eval.json and eval.png.")


def _body(config, config_path: str, workdir: str) -> int:
    from flax import nnx

    from ultrametric_jax.cli.train import dense_baseline
    from ultrametric_jax.cli.flags import surgery_config
    from ultrametric_jax.run.evaluate import EvalReport, evaluate_surgical, write_report
    from ultrametric_jax.run.checkpoint import RunCheckpointReader, check_same_base
    from ultrametric_jax.run.trainer import (CHECKPOINT_SUBDIR, checkpoint_template, inject,
                                       place_on_mesh, run_mesh, setup_run)
    mesh = run_mesh(config)
    setup = setup_run(config, install=False)
    dense = dense_baseline(setup, config, workdir)
    inject(config, setup.model)
    place_on_mesh(setup.model, mesh)
    directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
    # Read-only: a run may still be writing to this directory.
    reader = RunCheckpointReader(directory)
    try:
        restored = reader.restore_latest(checkpoint_template(config, setup.model))
    finally:
        reader.close()
    if restored is None:
        print(f"ultrametric eval: no checkpoint in {directory}; evaluating the "
              "collapse-initialised topology (step 0)", file=sys.stderr)
    else:
        check_same_base(restored.meta["base_model"], setup.identity)
        nnx.update(setup.model, restored.state["router"], restored.state["mutable"])
    setup.model.eval()
    surgical = evaluate_surgical(setup.model, setup.val_batches, surgery_config(config))
    report = EvalReport(dense=dense, surgical=surgical, step=restored.step if restored else 0)
    json_path, png_path = write_report(report, workdir)
    print(report.summary())
    print(f"results: {json_path}, {png_path}")
    return 0


def main(argv) -> int:
    from ultrametric_jax.cli.flags import command_main
    return command_main("eval", DESCRIPTION, argv, _body)

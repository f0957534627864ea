"""`ultrametric eval`: dense vs surgical perplexity, density per layer and routing entropy of
the newest checkpoint in --workdir (the collapse-initialised topology when there is none)."""
from __future__ import annotations

import os
import sys

DESCRIPTION = ("Evaluate the newest surgery checkpoint of --workdir against the dense base "
               "model; writes eval.json and eval.png.")


def _body(config, config_path: str, workdir: str) -> int:
    from ultrametric_jax.commands.train import dense_baseline
    from ultrametric_jax.config_flags import surgery_config
    from ultrametric_jax.evaluate import EvalReport, evaluate_surgical, write_report
    from ultrametric_jax.train import SurgeryTrainer, inject, setup_run
    setup = setup_run(config, install=False)
    dense = dense_baseline(setup, config, workdir)
    inject(config, setup.model)
    trainer = SurgeryTrainer(config, setup.model, setup.train_data, workdir, setup.identity,
                             progress=False)
    try:
        step = trainer.restore()
    finally:
        trainer.close()
    if step is None:
        print(f"ultrametric eval: no checkpoint in {os.path.join(workdir, 'checkpoints')}; "
              "evaluating the collapse-initialised topology (step 0)", file=sys.stderr)
    setup.model.eval()
    surgical = evaluate_surgical(setup.model, setup.val_batches, surgery_config(config))
    report = EvalReport(dense=dense, surgical=surgical, step=step or 0)
    json_path, png_path = write_report(report, workdir)
    print(report.summary())
    print(f"results: {json_path}, {png_path}")
    return 0


def main(argv) -> int:
    from ultrametric_jax.config_flags import command_main
    return command_main("eval", DESCRIPTION, argv, _body)

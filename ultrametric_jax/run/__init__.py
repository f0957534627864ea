"""Running the surgery: data, the train step, the trainer, run checkpoints, evaluation, metrics,
export and the pipeline every command calls."""

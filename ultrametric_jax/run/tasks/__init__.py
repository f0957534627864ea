"""Behaviour beyond perplexity: the dense and the surgical model through the same tasks.

    from ultrametric_jax.run.tasks import run_tasks
    report = run_tasks("fidelity,humaneval,instructions,retrieval", dense, surgical, tokenizer,
                       fast=True, progress=True, out_dir="results/behaviour")
    print("\\n".join(report["summary"].values()))

Tasks: fidelity (greedy agreement, first divergence, teacher-forced KL), humaneval (pass@1,
sandboxed), instructions (checkable constraints through the chat template), retrieval (pass
key at several depths). New tasks register themselves with `register_task`.
"""
from __future__ import annotations

from ultrametric_jax.run.tasks.registry import (TASKS, Task, TaskContext, TaskError,
                                               parse_task_names, register_task, run_tasks)
# Importing a task module registers its task, in this order.
from ultrametric_jax.run.tasks import fidelity, humaneval, instructions, retrieval  # noqa: E402,F401

__all__ = ["TASKS", "Task", "TaskContext", "TaskError", "parse_task_names", "register_task",
           "run_tasks"]

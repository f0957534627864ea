"""Behaviour beyond perplexity: the dense and the surgical model through the same tasks.

    from ultrametric_jax.run.tasks import run_tasks
    report = run_tasks("fidelity,humaneval,instructions,retrieval", dense, surgical, tokenizer,
                       fast=True, progress=True, out_dir="results/behaviour")
    print("\\n".join(report["summary"].values()))

Tasks: fidelity (greedy agreement, first divergence, teacher-forced KL), humaneval (pass@1,
sandboxed), instructions (checkable constraints through the chat template), retrieval (pass
key at several depths), fidelity_long (fidelity on long held-out prose and code prompts,
where the routes act). Other tasks join with `register_task(Task(...))`.
"""
from __future__ import annotations

from ultrametric_jax.run.tasks.registry import (TASKS, Task, TaskContext, TaskError,
                                               parse_task_names, register_task, run_tasks)
from ultrametric_jax.run.tasks import (fidelity, fidelity_long, humaneval, instructions,
                                      retrieval)

for _module in (fidelity, humaneval, instructions, retrieval, fidelity_long):
    register_task(_module.TASK)
del _module

__all__ = ["TASKS", "Task", "TaskContext", "TaskError", "parse_task_names", "register_task",
           "run_tasks"]

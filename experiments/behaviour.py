"""Behaviour beyond perplexity: every task, dense against surgical, for trained surgery runs.

For each run work directory (a finished `ultrametric run` / `ultrametric train`), restores the
surgical model of its latest checkpoint, runs the behaviour tasks on it and on its own dense
base model (the same weights with base attention: one copy in memory), writes
<out>/<run name>/tasks.json and tasks.png, and prints one Markdown table of all runs with the
attention density of each run's eval.json.

  python experiments/behaviour.py --out results/behaviour RUN_DIR [RUN_DIR ...]
  python experiments/behaviour.py --fast --out /tmp/behaviour RUN_DIR      # the fast subset
"""
from __future__ import annotations

import argparse
import json
import os
import time

from ultrametric_jax.run.export import checkpoint_dir_of, tokenizer_source
from ultrametric_jax.run.pipeline import restore_run
from ultrametric_jax.run.tasks import run_tasks
from ultrametric_jax.run.tasks.chat import chat_template_from_gguf

COLUMNS = (("fidelity", "surgical", "greedy_agreement", "greedy agreement"),
           ("fidelity", "surgical", "kl_per_token", "KL nats/token"),
           ("humaneval", "dense", "pass_at_1", "HumanEval dense"),
           ("humaneval", "surgical", "pass_at_1", "HumanEval surgical"),
           ("instructions", "dense", "prompt_accuracy", "instructions dense"),
           ("instructions", "surgical", "prompt_accuracy", "instructions surgical"),
           ("retrieval", "dense", "accuracy", "pass key dense"),
           ("retrieval", "surgical", "accuracy", "pass key surgical"))


def measure(workdir: str, args) -> dict:
    restored = restore_run(checkpoint_dir_of(workdir)[0])
    base = restored.base_model["path"]
    tokenizer, tokenizer_dir = tokenizer_source(base)
    tokenizer = tokenizer or tokenizer_dir
    template = chat_template_from_gguf(base) if base.endswith(".gguf") else None
    name = os.path.basename(os.path.normpath(workdir))
    start = time.perf_counter()
    report = run_tasks(args.tasks, restored.model, restored.model, tokenizer, fast=args.fast,
                       out_dir=os.path.join(args.out, name), chat_template=template,
                       batch_size=args.batch_size)
    print(f"{name}: {time.perf_counter() - start:.0f} s")
    for line in report["summary"].values():
        print("  " + line)
    density = None
    eval_json = os.path.join(workdir, "eval.json")
    if os.path.exists(eval_json):
        with open(eval_json) as f:
            density = json.load(f)["surgical"]["density"]
    return {"name": name, "step": restored.step, "density": density, "report": report}


def table(rows: list[dict]) -> str:
    head = ["run", "step", "density"] + [c[3] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        tasks = row["report"]["tasks"]
        cells = [row["name"], str(row["step"]),
                 "-" if row["density"] is None else f"{100 * row['density']:.1f}%"]
        for task, side, key, _ in COLUMNS:
            value = tasks.get(task, {}).get(side, {}).get(key)
            cells.append("-" if value is None else
                         f"{value:.4f}" if key == "kl_per_token" else f"{100 * value:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="surgery run work directories")
    parser.add_argument("--out", default="results/behaviour")
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--fast", action="store_true", help="the fast subset of every task")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    rows = [measure(workdir, args) for workdir in args.runs]
    print(table(rows))


if __name__ == "__main__":
    main()

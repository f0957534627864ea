"""Behaviour beyond perplexity: every task, dense against surgical, for trained surgery runs.

For each run work directory (a finished `ultrametric run` / `ultrametric train`), restores the
surgical model of its latest checkpoint, runs the behaviour tasks on it and on its own dense
base model (the same weights with base attention: one copy in memory), writes
<out>/<run name>/tasks.json and tasks.png, and prints one Markdown table of all runs with the
attention density of each run's eval.json.

  python experiments/behaviour.py --out results/behaviour RUN_DIR [RUN_DIR ...]
  python experiments/behaviour.py --fast --out /tmp/behaviour RUN_DIR      # the fast subset
  python experiments/behaviour.py --parallel --out results/behaviour RUN_DIR

--parallel runs each task in its own process, side by side, and merges their reports: on one
accelerator the tasks are bound by compiling (a 30-layer surgical model compiles for tens of
seconds per shape, one CPU core each), so five processes finish in about a third of the time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from ultrametric_jax.run.checkpoint import RunCheckpointReader
from ultrametric_jax.run.export import checkpoint_dir_of, tokenizer_source
from ultrametric_jax.run.pipeline import restore_run
from ultrametric_jax.run.tasks import parse_task_names, run_tasks
from ultrametric_jax.run.tasks.chat import chat_template_from_gguf
from ultrametric_jax.run.tasks.report import TASKS_JSON, merge_reports, write_task_report

COLUMNS = (("fidelity", "surgical", "greedy_agreement", "greedy agreement"),
           ("fidelity", "surgical", "kl_per_token", "KL nats/token"),
           ("fidelity_long", "surgical", "greedy_agreement", "long-prompt agreement"),
           ("fidelity_long", "surgical", "kl_per_token", "long-prompt KL"),
           ("humaneval", "dense", "pass_at_1", "HumanEval dense"),
           ("humaneval", "surgical", "pass_at_1", "HumanEval surgical"),
           ("instructions", "dense", "prompt_accuracy", "instructions dense"),
           ("instructions", "surgical", "prompt_accuracy", "instructions surgical"),
           ("retrieval", "dense", "accuracy", "pass key dense"),
           ("retrieval", "surgical", "accuracy", "pass key surgical"))


def run_name(workdir: str) -> str:
    return os.path.basename(os.path.normpath(workdir))


def run_density(workdir: str):
    eval_json = os.path.join(workdir, "eval.json")
    if not os.path.exists(eval_json):
        return None
    with open(eval_json) as f:
        return json.load(f)["surgical"]["density"]


def latest_step(workdir: str):
    reader = RunCheckpointReader(checkpoint_dir_of(workdir)[0])
    try:
        return reader.latest_step()
    finally:
        reader.close()


def task_command(workdir: str, task: str, out: str, args) -> list[str]:
    """This script on one run and one task, writing under `out`."""
    cmd = [sys.executable, os.path.abspath(__file__), workdir, "--tasks", task, "--out", out]
    if args.fast:
        cmd.append("--fast")
    if args.batch_size is not None:
        cmd += ["--batch-size", str(args.batch_size)]
    return cmd


def measure_parallel(workdir: str, args, spawn=subprocess.Popen) -> dict:
    """Every task in its own process (logs in <out>/<run>/parts/<task>.log), then one merged
    tasks.json and tasks.png. spawn: how a command starts (subprocess.Popen's signature)."""
    name = run_name(workdir)
    parts_dir = os.path.join(args.out, name, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    tasks = parse_task_names(args.tasks)
    procs = {}
    for task in tasks:
        with open(os.path.join(parts_dir, f"{task}.log"), "w") as log:
            procs[task] = spawn(task_command(workdir, task, os.path.join(parts_dir, task), args),
                                stdout=log, stderr=subprocess.STDOUT)
    failed = [task for task, p in procs.items() if p.wait() != 0]
    if failed:
        raise SystemExit(f"{name}: task(s) {', '.join(failed)} failed; see "
                         f"{os.path.join(parts_dir, failed[0] + '.log')}")
    parts = []
    for task in tasks:
        with open(os.path.join(parts_dir, task, name, TASKS_JSON)) as f:
            parts.append(json.load(f))
    report = merge_reports(parts)
    report["files"] = list(write_task_report(report, os.path.join(args.out, name)))
    print(f"{name}: {report['seconds']:.0f} s ({len(tasks)} tasks side by side)")
    for line in report["summary"].values():
        print("  " + line)
    return {"name": name, "step": latest_step(workdir), "density": run_density(workdir),
            "report": report}


def measure(workdir: str, args) -> dict:
    restored = restore_run(checkpoint_dir_of(workdir)[0])
    base = restored.base_model["path"]
    tokenizer, tokenizer_dir = tokenizer_source(base)
    tokenizer = tokenizer or tokenizer_dir
    template = chat_template_from_gguf(base) if base.endswith(".gguf") else None
    name = run_name(workdir)
    start = time.perf_counter()
    report = run_tasks(args.tasks, restored.model, restored.model, tokenizer, fast=args.fast,
                       out_dir=os.path.join(args.out, name), chat_template=template,
                       batch_size=args.batch_size)
    print(f"{name}: {time.perf_counter() - start:.0f} s")
    for line in report["summary"].values():
        print("  " + line)
    return {"name": name, "step": restored.step, "density": run_density(workdir),
            "report": report}


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
    parser.add_argument("--parallel", action="store_true",
                        help="one process per task, side by side, then one merged report")
    args = parser.parse_args()
    rows = [(measure_parallel if args.parallel else measure)(workdir, args)
            for workdir in args.runs]
    print(table(rows))


if __name__ == "__main__":
    main()

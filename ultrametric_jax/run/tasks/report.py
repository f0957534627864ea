"""Writing a behaviour-task report: tasks.json and tasks.png (one panel per task, dense
against surgical for the numbers its result names under "headline")."""
from __future__ import annotations

import json
import os

import numpy as np

TASKS_JSON = "tasks.json"
TASKS_PNG = "tasks.png"


def write_task_report(report: dict, out_dir: str) -> tuple[str, str]:
    """<out_dir>/tasks.json and <out_dir>/tasks.png; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, TASKS_JSON)
    png_path = os.path.join(out_dir, TASKS_PNG)
    partial = json_path + ".tmp"   # rewritten after every task: never leave half a file
    with open(partial, "w") as f:
        json.dump({**report, "files": [json_path, png_path]}, f, indent=2)
    os.replace(partial, json_path)
    plot_tasks(report, png_path)
    return json_path, png_path


def plot_tasks(report: dict, path: str) -> None:
    import matplotlib  # heavy, and needed only when a figure is written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 0.6, 3.8),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        result = report["tasks"][name]
        keys = result["headline"]
        x = np.arange(len(keys))
        for offset, side, color in ((-0.2, "dense", "tab:blue"), (0.2, "surgical", "tab:red")):
            values = [result[side][k] for k in keys]
            bars = ax.bar(x + offset, values, width=0.4, color=color, label=side)
            ax.bar_label(bars, labels=[f"{100 * v:.0f}%" for v in values], fontsize=7)
        ax.set_xticks(x, [k.replace("_", " ") for k in keys], fontsize=8)
        ax.set_ylim(0, 1.3)
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.suptitle("behaviour, dense against surgical" + (" (fast subset)" if report["fast"]
                                                        else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge_reports(reports) -> dict:
    """One report from the reports of separate runs over disjoint tasks of the same models
    (e.g. one process per task): tasks and summaries in the given order; `seconds` is the
    longest part's (the parts run side by side). ValueError when two parts hold the same
    task or they disagree on the fast subset."""
    reports = list(reports)
    if not reports:
        raise ValueError("no task report to merge")
    if len({bool(r["fast"]) for r in reports}) > 1:
        raise ValueError("cannot merge task reports of the fast subset with full ones")
    tasks, summary, pending = {}, {}, []
    for r in reports:
        for name, result in r["tasks"].items():
            if name in tasks:
                raise ValueError(f"task {name!r} appears in more than one report")
            tasks[name], summary[name] = result, r["summary"][name]
        pending += r.get("pending", [])
    merged = {"fast": bool(reports[0]["fast"]), "tasks": tasks, "summary": summary,
              "seconds": max(r["seconds"] for r in reports)}
    if pending:
        merged["pending"] = pending
    return merged

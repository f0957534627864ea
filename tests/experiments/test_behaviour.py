"""experiments/behaviour.py: the module loads (its imports resolve), its table prints each
run's numbers from the task report, as percentages of the values given here by hand, and
--parallel merges one report per task into one."""
import argparse
import importlib.util
import json
import pathlib
import types

import pytest

from ultrametric_jax.run.tasks.report import merge_reports, write_task_report

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("behaviour", ROOT / "experiments" / "behaviour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_prints_each_column_from_the_report():
    behaviour = load()
    tasks = {"fidelity": {"surgical": {"greedy_agreement": 0.8125, "kl_per_token": 0.01234}},
             "fidelity_long": {"surgical": {"greedy_agreement": 0.375, "kl_per_token": 0.1}},
             "humaneval": {"dense": {"pass_at_1": 0.0625}, "surgical": {"pass_at_1": 0.0}},
             "retrieval": {"dense": {"accuracy": 1.0}, "surgical": {"accuracy": 0.5}}}
    row = {"name": "run_a", "step": 120, "density": 0.333, "report": {"tasks": tasks}}
    lines = behaviour.table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == len(behaviour.COLUMNS) + 4
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["run_a", "120", "33.3%"]
    assert cells[3:] == ["81.2%", "0.0123", "37.5%", "0.1000", "6.2%", "0.0%", "-", "-",
                         "100.0%", "50.0%"]


def part(task, seconds, value, fast=False):
    result = {"dense": {"score": 1.0}, "surgical": {"score": value}, "headline": ["score"],
              "seconds": seconds}
    return {"fast": fast, "tasks": {task: result}, "summary": {task: f"{task}: {value}"},
            "seconds": seconds}


def test_merge_reports_keeps_order_and_the_longest_part():
    merged = merge_reports([part("b", 3.0, 0.5), part("a", 7.5, 0.25)])
    assert list(merged["tasks"]) == ["b", "a"] and merged["seconds"] == 7.5
    assert merged["summary"] == {"b": "b: 0.5", "a": "a: 0.25"} and not merged["fast"]
    assert merged["tasks"]["a"]["surgical"]["score"] == 0.25
    with pytest.raises(ValueError, match="task 'a' appears in more than one report"):
        merge_reports([part("a", 1, 0.1), part("a", 2, 0.2)])
    with pytest.raises(ValueError, match="fast subset with full ones"):
        merge_reports([part("a", 1, 0.1), part("b", 2, 0.2, fast=True)])


def test_parallel_runs_one_process_per_task_and_merges(tmp_path, monkeypatch):
    behaviour = load()
    workdir = tmp_path / "run_x"
    workdir.mkdir()
    (workdir / "eval.json").write_text(json.dumps({"surgical": {"density": 0.25}}))
    monkeypatch.setattr(behaviour, "latest_step", lambda w: 40)
    values = {"fidelity": (11.0, 0.75), "retrieval": (4.0, 0.5)}
    commands = []

    def spawn(cmd, stdout, stderr):       # stands in for a process running one task
        commands.append(cmd)
        task, out = cmd[cmd.index("--tasks") + 1], cmd[cmd.index("--out") + 1]
        write_task_report(part(task, *values[task]), str(pathlib.Path(out) / "run_x"))
        return types.SimpleNamespace(wait=lambda: 0)

    args = argparse.Namespace(tasks="fidelity,retrieval", out=str(tmp_path / "out"),
                              fast=False, batch_size=8)
    row = behaviour.measure_parallel(str(workdir), args, spawn=spawn)
    assert [c[c.index("--tasks") + 1] for c in commands] == ["fidelity", "retrieval"]
    assert all(c[c.index("--batch-size") + 1] == "8" and "--fast" not in c for c in commands)
    saved = json.loads((tmp_path / "out" / "run_x" / "tasks.json").read_text())
    assert list(saved["tasks"]) == ["fidelity", "retrieval"] and saved["seconds"] == 11.0
    assert saved["tasks"]["retrieval"]["surgical"]["score"] == 0.5
    assert (tmp_path / "out" / "run_x" / "tasks.png").stat().st_size > 0
    assert (row["step"], row["density"]) == (40, 0.25)

    def failing(cmd, stdout, stderr):
        return types.SimpleNamespace(wait=lambda: 1)

    with pytest.raises(SystemExit, match="task\\(s\\) fidelity, retrieval failed"):
        behaviour.measure_parallel(str(workdir), args, spawn=failing)

"""experiments/behaviour.py: the module loads (its imports resolve) and its table prints each
run's numbers from the task report, as percentages of the values given here by hand."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("behaviour", ROOT / "experiments" / "behaviour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_prints_each_column_from_the_report():
    behaviour = load()
    tasks = {"fidelity": {"surgical": {"greedy_agreement": 0.8125, "kl_per_token": 0.01234}},
             "humaneval": {"dense": {"pass_at_1": 0.0625}, "surgical": {"pass_at_1": 0.0}},
             "retrieval": {"dense": {"accuracy": 1.0}, "surgical": {"accuracy": 0.5}}}
    row = {"name": "run_a", "step": 120, "density": 0.333, "report": {"tasks": tasks}}
    lines = behaviour.table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == len(behaviour.COLUMNS) + 4
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["run_a", "120", "33.3%"]
    assert cells[3:] == ["81.2%", "0.0123", "6.2%", "0.0%", "-", "-", "100.0%", "50.0%"]

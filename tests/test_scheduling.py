"""tests/conftest.py's grouping of the suite for pytest-xdist (scripts/test.sh: --dist loadgroup
--no-loadscope-reorder): each file is one group, the files that load the real SmolLM2 share
one and those reading the trained toy run another, and the listed longest groups come first."""
import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
FILES = ["io/test_tokenizer.py", "experiments/test_needle.py", "io/test_gguf.py",
         "run/test_generate.py"]


def test_files_are_grouped_and_the_shared_units_come_first():
    class Collected:
        items = []

        def pytest_collection_finish(self, session):
            self.items = list(session.items)

    plugin = Collected()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider",
                        *(os.path.join(TESTS, f) for f in FILES)], plugins=[plugin])
    assert code == 0
    groups = {}
    for item in plugin.items:
        marks = [m.args[0] for m in item.iter_markers("xdist_group")]
        assert len(marks) == 1, (item.nodeid, marks)
        groups.setdefault(os.path.relpath(str(item.path), TESTS), set()).add(marks[0])
    # the fixtures each file's tests ask for decide: SmolLM2 (gguf, generate), the toy run
    # (needle), neither (tokenizer: its file is its group)
    assert groups == {"io/test_gguf.py": {"smollm2"}, "run/test_generate.py": {"smollm2"},
                      "experiments/test_needle.py": {"toy_run"},
                      "io/test_tokenizer.py": {"io/test_tokenizer.py"}}
    order = [next(iter(groups[os.path.relpath(str(i.path), TESTS)])) for i in plugin.items]
    first = [g for k, g in enumerate(order) if g not in order[:k]]
    assert first == ["smollm2", "toy_run", "io/test_tokenizer.py"]  # LONGEST_FIRST's order
    assert order == sorted(order, key=first.index)  # every group whole, in one stretch

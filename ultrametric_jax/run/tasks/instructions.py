"""Instruction following: chat prompts with constraints that code can check (a word count, a
required or forbidden word, a JSON object, a numbered list, a closing phrase), answered
greedily by both models through the chat template and scored by the same checks.

prompt_accuracy is the share of prompts whose every constraint holds, constraint_accuracy the
share of all constraints that hold, <kind>_accuracy the same per kind of constraint.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Sequence

import numpy as np

from ultrametric_jax.run.tasks.chat import chat_prompt
from ultrametric_jax.run.tasks.registry import Task, TaskContext

WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
NUMBERED_ITEM = re.compile(r"^\s*(\d+)[.)]\s+\S")
MAX_NEW_TOKENS, FAST_MAX_NEW_TOKENS = 160, 64


def count_words(text: str) -> int:
    """Words: runs of letters or digits, joined by apostrophes or hyphens."""
    return len(WORD.findall(text))


@dataclasses.dataclass(frozen=True)
class WordCount:
    min_words: int = 0
    max_words: int | None = None
    kind = "word_count"

    def check(self, text: str) -> bool:
        n = count_words(text)
        return n >= self.min_words and (self.max_words is None or n <= self.max_words)


@dataclasses.dataclass(frozen=True)
class IncludesWord:
    word: str
    kind = "keyword"

    def check(self, text: str) -> bool:
        return re.search(rf"\b{re.escape(self.word)}\b", text, re.IGNORECASE) is not None


@dataclasses.dataclass(frozen=True)
class ExcludesWord:
    word: str
    kind = "forbidden_word"

    def check(self, text: str) -> bool:
        return re.search(rf"\b{re.escape(self.word)}\b", text, re.IGNORECASE) is None


def strip_code_fence(text: str) -> str:
    """The text inside a ``` fence (with or without a language tag), else the text."""
    text = text.strip()
    match = re.fullmatch(r"```[\w-]*\n(.*?)\n?```", text, re.DOTALL)
    return match.group(1).strip() if match else text


@dataclasses.dataclass(frozen=True)
class JsonObject:
    keys: tuple = ()
    kind = "json_object"

    def check(self, text: str) -> bool:
        """The whole reply (inside a code fence, if any) is a JSON object with the keys."""
        try:
            value = json.loads(strip_code_fence(text))
        except ValueError:
            return False
        return isinstance(value, dict) and all(k in value for k in self.keys)


@dataclasses.dataclass(frozen=True)
class NumberedList:
    items: int
    kind = "numbered_list"

    def check(self, text: str) -> bool:
        """Exactly `items` lines numbered 1., 2., ... (or 1), 2), ...) in order."""
        numbers = [int(m.group(1)) for line in text.splitlines()
                   if (m := NUMBERED_ITEM.match(line))]
        return numbers == list(range(1, self.items + 1))


@dataclasses.dataclass(frozen=True)
class EndsWith:
    phrase: str
    kind = "ends_with"

    def check(self, text: str) -> bool:
        return text.strip().endswith(self.phrase)


@dataclasses.dataclass(frozen=True)
class Instruction:
    prompt: str
    constraints: tuple


# The first FAST_INSTRUCTIONS (one per kind of format, short replies) form the fast subset.
INSTRUCTIONS = (
    Instruction("What is the capital of Japan? Answer in fewer than 10 words.",
                (WordCount(max_words=9), IncludesWord("Tokyo"))),
    Instruction('Describe a fictional person as a JSON object with the keys "name" and "age". '
                "Output only the JSON object.", (JsonObject(("name", "age")),)),
    Instruction("Name five fruits as a numbered list.", (NumberedList(5),)),
    Instruction("List three benefits of regular exercise as a numbered list (1., 2., 3.), one "
                "item per line.", (NumberedList(3),)),
    Instruction("Write a short poem about the sea in at most 40 words. Include the word "
                "'blue'.", (WordCount(max_words=40), IncludesWord("blue"))),
    Instruction("Explain what a computer is in at least 30 words.", (WordCount(min_words=30),)),
    Instruction("Describe a cat in one or two sentences without using the word 'cute'.",
                (ExcludesWord("cute"), WordCount(max_words=50))),
    Instruction("Give four tips for sleeping better as a numbered list.", (NumberedList(4),)),
    Instruction('Write a JSON object with a single key "colors" whose value is a list of three '
                "colors. Output only the JSON object.", (JsonObject(("colors",)),)),
    Instruction("Write one sentence about the moon that ends with the exact phrase "
                "'Good night.'", (EndsWith("Good night."),)),
    Instruction("In at most 25 words, say why sleep matters. Mention the word 'memory'.",
                (WordCount(max_words=25), IncludesWord("memory"))),
    Instruction("Write a birthday card greeting that includes the word 'wonderful' and ends "
                "with 'Love, Sam'.", (IncludesWord("wonderful"), EndsWith("Love, Sam"))),
)
FAST_INSTRUCTIONS = 3


def score_replies(instructions: Sequence[Instruction], replies: Sequence[str]) -> dict:
    """prompt_accuracy, constraint_accuracy and <kind>_accuracy of the replies."""
    results = [[c.check(r) for c in ins.constraints] for ins, r in zip(instructions, replies)]
    flat = [(c.kind, ok) for ins, res in zip(instructions, results)
            for c, ok in zip(ins.constraints, res)]
    numbers = {"prompt_accuracy": float(np.mean([all(r) for r in results])),
               "constraint_accuracy": float(np.mean([ok for _, ok in flat]))}
    for kind in dict.fromkeys(k for k, _ in flat):
        numbers[f"{kind}_accuracy"] = float(np.mean([ok for k, ok in flat if k == kind]))
    numbers["prompts"] = len(results)
    return numbers


def chosen_instructions(fast: bool) -> Sequence[Instruction]:
    return INSTRUCTIONS[:FAST_INSTRUCTIONS] if fast else INSTRUCTIONS


def chat_prompts(ctx: TaskContext) -> list[list[int]]:
    """Token ids of the chosen instructions as one-turn chats."""
    return [ctx.encode(chat_prompt(ctx.tokenizer, ins.prompt, ctx.chat_template))
            for ins in chosen_instructions(ctx.fast)]


def run(ctx: TaskContext) -> dict:
    chosen = chosen_instructions(ctx.fast)
    steps = FAST_MAX_NEW_TOKENS if ctx.fast else MAX_NEW_TOKENS
    prompts = chat_prompts(ctx)
    result, replies = {}, {}
    with ctx.bar(2 * len(chosen), "instructions") as bar:
        for c in ctx.both:
            rows = ctx.greedy(c, prompts, steps, tick=bar.update)
            replies[c.name] = [ctx.decode(r) for r in rows]
            result[c.name] = score_replies(chosen, replies[c.name])
    result["max_new_tokens"] = steps
    result["replies"] = [{"prompt": ins.prompt, "dense": d, "surgical": s}
                         for ins, d, s in zip(chosen, replies["dense"], replies["surgical"])]
    return result


def summary(result: dict) -> str:
    d, s = result["dense"], result["surgical"]
    return (f"instructions: prompts followed dense {100 * d['prompt_accuracy']:.1f}% -> "
            f"surgical {100 * s['prompt_accuracy']:.1f}% "
            f"({100 * (s['prompt_accuracy'] - d['prompt_accuracy']):+.1f} points), constraints "
            f"{100 * d['constraint_accuracy']:.1f}% -> {100 * s['constraint_accuracy']:.1f}% "
            f"({s['prompts']} prompts)")


TASK = Task("instructions", "chat prompts with constraints checked by code",
            run, summary, headline=("prompt_accuracy", "constraint_accuracy"))

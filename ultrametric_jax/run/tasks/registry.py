"""The behaviour-task registry and `run_tasks`, which runs the dense and the surgical model
through each named task and collects JSON-able results, one summary line per task, and (with
out_dir) tasks.json and tasks.png.

A task is a function of a `TaskContext` returning a dict with at least "dense" and "surgical"
(flat dicts of numbers, the same keys on both sides); the registry adds "difference"
(surgical - dense for every number), "headline" (the keys its panel of the figure shows) and
"seconds". Register new tasks with `register_task`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ultrametric_jax.errors import UserError
from ultrametric_jax.io.tokenizer import as_tokenizer, decode, encode
from ultrametric_jax.run.host_memory import release_compiled
from ultrametric_jax.run.metrics import progress_bar
from ultrametric_jax.run.tasks import decoding
from ultrametric_jax.run.tasks.decoding import Contestant, contestants
from ultrametric_jax.run.tasks.report import write_task_report

# In fast mode every decoding call fills a cache of this length (when its prompts fit) and every
# scoring batch is padded to it, so that the tasks share one compiled decode step and one
# scoring forward per model: compiling dominates a fast CPU run.
FAST_CACHE_LEN = 256
# Token strings that end a turn or a document in Llama-family vocabularies (SmolLM2's included).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


class TaskError(UserError, ValueError):
    """A task cannot run as asked; the message names the task and the problem."""


@dataclasses.dataclass
class TaskContext:
    """What a task receives: both contestants and the shared settings."""
    dense: Contestant
    surgical: Contestant
    tokenizer: Any                  # as given: a tokenizers.Tokenizer or a transformers one
    fast: bool
    batch_size: int
    eos_ids: frozenset
    max_context: int                # the longest prompt + continuation the model takes
    progress: bool = True
    chat_template: Optional[str] = None
    _decoded: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def both(self) -> tuple[Contestant, Contestant]:
        return self.dense, self.surgical

    def greedy(self, contestant: Contestant, prompts: Sequence[Sequence[int]],
               new_tokens: int, tick: Optional[Callable[[int], Any]] = None,
               batch_size: Optional[int] = None) -> list[list[int]]:
        """Greedy continuations of at least new_tokens tokens (cut after an EOS), computed
        once per contestant, prompts and length and shared by the tasks that ask again."""
        if self.fast:
            new_tokens = decoding.fill_cache_bucket(prompts, new_tokens, FAST_CACHE_LEN)
        key = (contestant.name, tuple(map(tuple, prompts)), new_tokens)
        if key not in self._decoded:
            self._decoded[key] = decoding.greedy(contestant, prompts, new_tokens,
                                                 eos_ids=self.eos_ids,
                                                 batch_size=batch_size or self.batch_size)
        if tick is not None:
            tick(len(prompts))
        return self._decoded[key]

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the tokens before the first EOS."""
        ids = list(ids)
        ends = [i for i, t in enumerate(ids) if t in self.eos_ids]
        return decode(self.tokenizer, ids[:ends[0]] if ends else ids)

    @property
    def min_width(self) -> int:
        """The least width of a scoring batch (fast: one compiled forward for all tasks)."""
        return FAST_CACHE_LEN if self.fast else 0

    @property
    def knows_chat(self) -> bool:
        """Whether prompts can go through a chat format: a template was given, the tokenizer
        has one, or its vocabulary has ChatML's turn tokens."""
        return bool(self.chat_template or getattr(self.tokenizer, "chat_template", None)
                    or as_tokenizer(self.tokenizer).token_to_id("<|im_start|>") is not None)

    def bar(self, total: int, desc: str):
        return progress_bar(total, desc=desc, enabled=self.progress)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str
    run: Callable[[TaskContext], dict]
    summary: Callable[[dict], str]              # one line from the task's result
    headline: Sequence[str]                     # the keys of "dense"/"surgical" to plot (0..1)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def parse_task_names(spec: str | Sequence[str]) -> list[str]:
    """Task names from "a,b" or a list; "all" selects every registered task."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(TASKS)
    if not names:
        raise TaskError(f"no task named; choose from {', '.join(TASKS)} (or all)")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise TaskError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)} (or all)")
    return list(dict.fromkeys(names))


def end_token_ids(model, tokenizer) -> frozenset:
    """The model's EOS ids and the vocabulary's end-of-turn tokens."""
    eos = model.config.eos_token_id
    ids = set() if eos is None else {int(e) for e in np.atleast_1d(eos)}
    tok = as_tokenizer(tokenizer)
    ids |= {tok.token_to_id(t) for t in END_TOKENS if tok.token_to_id(t) is not None}
    return frozenset(ids)


def differences(dense: dict, surgical: dict) -> dict:
    return {k: surgical[k] - dense[k] for k in dense
            if isinstance(dense[k], (int, float)) and isinstance(surgical.get(k), (int, float))}


def run_tasks(names: str | Sequence[str], dense_model, surgical_model, tokenizer, *,
              fast: bool = True, progress: bool = True, out_dir: Optional[str] = None,
              batch_size: Optional[int] = None, chat_template: Optional[str] = None) -> dict:
    """Runs the named tasks ("fidelity,humaneval" or a list; "all") on the dense and the
    surgical model. fast: the small subset of every task (under a minute on a CPU for
    SmolLM2-135M), else the full sets. Returns {"fast", "tasks": {name: result}, "summary":
    {name: line}, "seconds"}; with out_dir also writes tasks.json and tasks.png there.

    The dense model may be the surgical model itself (it then runs with base attention).
    chat_template: a Jinja chat template for the instruction prompts when the tokenizer has
    none of its own (default: SmolLM2's ChatML).
    """
    names = parse_task_names(names)
    dense, surgical = contestants(dense_model, surgical_model)
    if batch_size is not None and batch_size < 1:
        raise TaskError(f"batch_size must be >= 1, got {batch_size}")
    ctx = TaskContext(dense, surgical, tokenizer, fast, batch_size or (4 if fast else 16),
                      end_token_ids(surgical_model, tokenizer),
                      int(surgical_model.config.max_position_embeddings), progress,
                      chat_template)
    start = time.perf_counter()
    results, summary = {}, {}
    for i, name in enumerate(names):
        task, t0 = TASKS[name], time.perf_counter()
        if i:
            release_compiled()     # tasks share no programs: keep one task's at a time
        result = task.run(ctx)
        result["difference"] = differences(result["dense"], result["surgical"])
        result["headline"] = list(task.headline)
        result["seconds"] = time.perf_counter() - t0
        results[name], summary[name] = result, task.summary(result)
        report = {"fast": fast, "tasks": results, "summary": summary,
                  "seconds": time.perf_counter() - start}
        if out_dir is not None:   # after every task: a long run stopped later keeps these
            report["files"] = list(write_task_report(
                {**report, "pending": list(names[i + 1:])}, out_dir))
    return report

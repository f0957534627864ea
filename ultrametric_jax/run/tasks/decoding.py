"""The dense and the surgical model through one decoding and scoring path.

A `Contestant` is a model plus the mode it runs in: the surgical model in evaluation mode
(hard routes), the dense model as it is, or, when the dense model itself carries a topology
(for instance the very same object as the surgical one), with every layer computing the base
model's attention (`base_model_mode`), so one copy of the weights serves both sides.

Greedy decoding goes through the KV-cache `generate`; teacher-forced scoring through one
compiled forward per batch shape, right-padded to a multiple of generate.CACHE_BUCKET so that
nearby lengths share one compile.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrametric_jax.run.generate import CACHE_BUCKET, generate
from ultrametric_jax.surgery.inject import base_model_mode, evaluation_mode, surgical_layers

DENSE, SURGICAL = "dense", "surgical"


@dataclasses.dataclass
class Contestant:
    name: str                                     # DENSE or SURGICAL
    model: Any
    mode: Callable[[], contextlib.AbstractContextManager]


def contestants(dense_model, surgical_model) -> tuple[Contestant, Contestant]:
    """(dense, surgical) contestants; the surgical model must carry a topology."""
    if not surgical_layers(surgical_model):
        raise ValueError("the surgical model carries no ultrametric topology: apply "
                         "inject_topology (or load a surgery run) first")
    if surgical_layers(dense_model):
        @contextlib.contextmanager
        def dense_mode():
            with evaluation_mode(dense_model), base_model_mode(dense_model):
                yield
    else:
        dense_mode = contextlib.nullcontext
    return (Contestant(DENSE, dense_model, dense_mode),
            Contestant(SURGICAL, surgical_model, lambda: evaluation_mode(surgical_model)))


def until_eos(tokens: Iterable[int], eos_ids: frozenset) -> list[int]:
    """The tokens up to and including the first EOS."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def fill_cache_bucket(prompts: Sequence[Sequence[int]], new_tokens: int, cache_len: int) -> int:
    """The number of new tokens, at least new_tokens, that makes generate's cache for these
    prompts cache_len long (when they fit): decoding calls of equal batch and cache length
    share one compiled step."""
    width = -(-max(len(p) for p in prompts) // CACHE_BUCKET) * CACHE_BUCKET
    return max(new_tokens, cache_len - width)


def greedy(contestant: Contestant, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
           eos_ids: frozenset, batch_size: int, tick: Optional[Callable[[int], Any]] = None
           ) -> list[list[int]]:
    """Greedy continuation of every prompt (token lists cut after their first EOS), decoded in
    batches of prompts of similar lengths.

    Every batch has one shape: as many rows as the first (a short last batch repeats its last
    prompt) and the longest prompt's width, so the whole call compiles one prefill and one
    decode loop. A compile of a 30-layer surgical model costs tens of seconds; the padded
    rows and columns cost far less."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    eos = sorted(eos_ids) or None
    rows_per_batch = min(batch_size, len(prompts))
    width = max(len(p) for p in prompts)
    with contestant.mode():
        for part in chunks(len(order), batch_size):
            rows = order[part]
            batch = [prompts[i] for i in rows]
            batch += [batch[-1]] * (rows_per_batch - len(batch))
            # The dense KV cache (cluster ids stored beside the keys) decodes a surgical model
            # exactly as the route cache does, and takes a whole batch of mixed prompt
            # lengths in one compiled step; the route cache runs one batch per length.
            new = generate(contestant.model, batch, max_new_tokens, temperature=0.0,
                           eos_token_id=eos, cache="dense", width=width)
            for i, tokens in zip(rows, new):
                out[i] = until_eos(tokens, eos_ids)
            if tick is not None:
                tick(len(rows))
    return out


@nnx.jit
def _log_probs(model, ids, mask):
    return jax.nn.log_softmax(model(ids, attention_mask=mask), axis=-1)


@nnx.jit
def _kl_from(model, ids, mask, ref_log_probs):
    """KL(ref || model) [B,S] per position."""
    log_probs = _log_probs(model, ids, mask)
    return jnp.sum(jnp.exp(ref_log_probs) * (ref_log_probs - log_probs), axis=-1)


def _right_padded(rows: Sequence[Sequence[int]], min_width: int = 0):
    width = max(min_width, -(-max(len(r) for r in rows) // CACHE_BUCKET) * CACHE_BUCKET)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = True
    return jnp.asarray(ids), jnp.asarray(mask)


def teacher_forced_kl(reference: Contestant, other: Contestant,
                      prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                      *, batch_size: int, min_width: int = 0) -> list[np.ndarray]:
    """Per row, KL(reference || other) in nats of the next-token distributions that predict
    each continuation token, both models reading prompt + continuation: float64 [len(cont)].
    Rows are right-padded to a multiple of CACHE_BUCKET, and to min_width at least."""
    out = []
    for part in chunks(len(prompts), batch_size):
        rows = [list(p) + list(c[:-1]) for p, c in zip(prompts[part], continuations[part])]
        ids, mask = _right_padded(rows, min_width)
        with reference.mode():
            ref = _log_probs(reference.model, ids, mask)
        with other.mode():
            kl = _kl_from(other.model, ids, mask, ref)
        kl = np.asarray(kl, np.float64)
        for i, (p, c) in enumerate(zip(prompts[part], continuations[part])):
            out.append(kl[i, len(p) - 1:len(p) - 1 + len(c)])
    return out

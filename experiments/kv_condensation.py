"""KV-cache condensation: the far history of every attention layer replaced by per-cluster
summaries (surgery.condense), against a sink + window cache of the same size, the full cache
and the surgical model's own mask, in perplexity and pass-key accuracy.

  python experiments/kv_condensation.py --run-dir RUN [--config.seq_len=2048 ...]
  python experiments/kv_condensation.py --toy           # CPU: a tiny random run built here

RUN is a surgery run's --workdir (or its checkpoints/ directory); the surgical model of its
newest checkpoint is restored (restore_run). Every cache runs over the whole sequence, every
query seeing its own cache (as when decoding with it from the first token):

  dense              every earlier key (the base model: base_model_mode);
  surgical           the run's own mask (sink + window + same cluster at the cut level);
  window+C           sink + (window + C) most recent keys, exact;
  condensed_all@C    sink + window exact + the C kept summaries of the far history
                     j <= i - window, every one read by every query;
  condensed_own@C    the same cache, a query reading only its own cluster's summary.

The clusters are the surgical model's hard route ids at the cut level, computed per layer from
that layer's own input under the cache being measured (per query head: the keys of a kv head
are shared by its query heads, each grouping them by its own routes). Perplexity is over the
last eval_len tokens of each held-out row (the rest is history); the needle is the pass-key
prompt of run/tasks/retrieval.py, replies decoded greedily (full recomputation per new token)
and scored by its is_correct. Writes <out>/<name>.json and .png; prints a Markdown table last.

Which read rule the preprint implies (its section 4.11): its cache stores the condensed
super-tokens in place of the far history and is read by ordinary attention, so every query
reads every summary: condensed_all. condensed_own is the surgical mask's own rule carried over
(a query sees far keys of its own cluster only). The preprint's medoid is the most recent key
(config medoid="recent") and its decay scales that key by exp(-lambda Var(positions)) with a
plain mean value; here the decay weights the values (config gamma), as specified for this
experiment.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ring_pruning import load_config  # noqa: E402
from ultrametric_jax.io.tokenizer import decode, encode  # noqa: E402
from ultrametric_jax.model import llama  # noqa: E402
from ultrametric_jax.run.data import corpus_tokenizer, pack_documents  # noqa: E402
from ultrametric_jax.run.data_corpus import load_corpus, split_documents  # noqa: E402
from ultrametric_jax.run.tasks import retrieval  # noqa: E402
from ultrametric_jax.surgery import tree as um  # noqa: E402
from ultrametric_jax.surgery.condense import condensed_attention  # noqa: E402
from ultrametric_jax.surgery.inject import (base_model_mode, set_attention_impl,  # noqa: E402
                                            surgical_layers)
from run_dir_cli import parse_run_args, run_parser, restore_or_build  # noqa: E402

CONFIG = ROOT / "configs" / "kv_condensation.py"
COMPLETE_NUMBER = re.compile(r"\d+\D")
SLOTS = {"dense": "all", "surgical": "sink+window+own cluster"}


# ----------------------------------------------------------------------------- the caches

class CacheKnobs(nnx.Variable):
    """(window, capacity, own_cluster) of the cache a CacheAttention runs: state, not
    structure, so that every cache runs through one compiled model."""


class CacheAttention(nnx.Module):
    """A surgical layer's projections and router with condensed_attention: sink + window exact
    + summaries of the far history (capacity 0: the plain sink + window cache)."""

    def __init__(self, surgical, *, num_clusters, max_capacity, gamma, keep, medoid):
        self.surgical = surgical
        self.num_clusters, self.max_capacity = num_clusters, max_capacity
        self.gamma, self.keep, self.medoid = gamma, keep, medoid
        self.knobs = CacheKnobs(jnp.zeros(3, jnp.int32))

    def __call__(self, x, positions, attention_mask=None, cache=None):
        if cache is not None or attention_mask is not None:
            raise ValueError("the condensed caches run whole sequences of real tokens: no "
                             "KV cache, no padding mask")
        s = self.surgical
        if positions is None:
            positions = llama.default_positions(x)
        q, k, v = llama.project_qkv(s.config, s.q_proj, s.k_proj, s.v_proj, x, positions)
        cfg = s.surgery_config
        clusters = um.cluster_ids(um.hard_digits(s.router(x)), cfg.arity, cfg.cut_level)
        window, capacity, own = self.knobs[...]
        out = condensed_attention(q, k, v, clusters, window=window,
                                  sink_tokens=cfg.sink_tokens, capacity=capacity,
                                  gamma=self.gamma, num_clusters=self.num_clusters,
                                  own_cluster=own.astype(bool), keep=self.keep,
                                  medoid=self.medoid, scale=s.scale,
                                  max_capacity=self.max_capacity)
        return s.o_proj(out.reshape(*out.shape[:2], -1))


def cache_specs(config, surgery):
    """[(name, kind, window, capacity, own)] of every cache, in table order."""
    window = config.window or surgery.window
    specs = [("dense", "dense", None, None, None), ("surgical", "surgical", None, None, None)]
    for c in config.capacities:
        specs += [(f"window+{c}", "cache", window + c, 0, 0),
                  (f"condensed_all@{c}", "cache", window, c, 0),
                  (f"condensed_own@{c}", "cache", window, c, 1)]
    return specs


@contextlib.contextmanager
def cache_model(model, config, surgery):
    """Within the context every layer runs a CacheAttention (knobs set per cache)."""
    layers = surgical_layers(model)
    if len(layers) != len(model.model.layers):
        raise SystemExit("the run's model carries no ultrametric topology")
    num_clusters = surgery.arity ** surgery.cut_level
    for layer, attn in zip(model.model.layers, layers):
        layer.self_attn = CacheAttention(attn, num_clusters=num_clusters,
                                         max_capacity=max(config.capacities),
                                         gamma=config.gamma, keep=config.keep,
                                         medoid=config.medoid)
    try:
        yield [layer.self_attn for layer in model.model.layers]
    finally:
        for layer, attn in zip(model.model.layers, layers):
            layer.self_attn = attn


@contextlib.contextmanager
def running(model, config, surgery, spec):
    """The model computing with cache `spec`."""
    _, kind, window, capacity, own = spec
    if kind == "dense":
        with base_model_mode(model):
            yield model
    elif kind == "surgical":
        set_attention_impl(model, "dense")          # the masked path: any length, exact
        yield model
    else:
        with cache_model(model, config, surgery) as attns:
            for attn in attns:
                attn.knobs[...] = jnp.asarray([window, capacity, own], jnp.int32)
            yield model


# ----------------------------------------------------------------------------- measures

@nnx.jit(static_argnums=2)
def _token_nll(model, tokens, eval_len):
    """float32 [B, eval_len]: -log p of the last eval_len tokens."""
    logits = model(tokens)[:, -eval_len - 1:-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, -eval_len:, None], axis=-1)[..., 0]


def perplexity(model, rows, eval_len, batch):
    nll = np.concatenate([np.asarray(_token_nll(model, jnp.asarray(rows[i:i + batch]),
                                                eval_len), np.float64)
                          for i in range(0, len(rows), batch)])
    return dict(ppl=float(np.exp(nll.mean())), nll_per_sequence=nll.mean(axis=1).tolist())


@nnx.jit
def _next_tokens(model, tokens, lengths):
    """int32 [B]: the argmax after each row's first `lengths` tokens (the rest is padding,
    after them: causal attention never reads it)."""
    logits = model(tokens)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last, axis=-1).astype(jnp.int32)


def greedy(model, prompts, max_new, tokenizer, pad_id):
    """Reply token lists (greedy, full recomputation per token); stops once every reply holds
    a complete number (what is_correct reads) or after max_new tokens."""
    width = max(map(len, prompts)) + max_new
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    replies = [[] for _ in prompts]
    for _ in range(max_new):
        new = np.asarray(_next_tokens(model, jnp.asarray(tokens), jnp.asarray(lengths)))
        for row, t in enumerate(new):
            tokens[row, lengths[row]] = t
            replies[row].append(int(t))
        lengths += 1
        if all(COMPLETE_NUMBER.search(decode(tokenizer, r)) for r in replies):
            break
    return replies


def needle_cases(config, tokenizer):
    """[(prompt ids, key, depth, key's distance from the prompt end in tokens)]."""
    n = config.needle
    rng = np.random.default_rng(config.seed)
    enc = lambda text: encode(tokenizer, text)  # noqa: E731
    cases = []
    for depth in n.depths:
        for _ in range(n.trials):
            key = str(rng.integers(10000, 100000))
            ids, before = retrieval.passkey_prompt(enc, key, n.context_tokens, depth)
            at = len(enc(retrieval.INTRO + retrieval.FILLER * before))
            cases.append((ids, key, depth, len(ids) - at))
    return cases


def needle(model, cases, config, tokenizer, pad_id):
    replies = greedy(model, [c[0] for c in cases], config.needle.max_new_tokens, tokenizer,
                     pad_id)
    texts = [decode(tokenizer, r) for r in replies]
    ok = [retrieval.is_correct(t, c[1]) for t, c in zip(texts, cases)]
    return dict(accuracy=float(np.mean(ok)), correct=ok, replies=texts, reply_ids=replies)


# ----------------------------------------------------------------------------- inputs

def held_out_rows(restored, config):
    """int32 [sequences, seq_len]: full held-out rows of the run's corpus (BOS first)."""
    tok = corpus_tokenizer(restored.base_model["path"], restored.model.config)
    data = restored.run.data
    docs = load_corpus(data.corpus, max_chars=data.max_chars, chunk_chars=data.chunk_chars)
    packed = pack_documents(split_documents(docs, data.val_fraction)[1], tok, config.seq_len)
    rows = packed.tokens[packed.mask.all(axis=1)]
    if len(rows) < config.sequences:
        raise SystemExit(f"the held-out documents of {data.corpus!r} fill {len(rows)} rows of "
                         f"{config.seq_len} tokens; config.sequences={config.sequences} needs "
                         "more: lower sequences or seq_len")
    return rows[:config.sequences], tok


def check_config(config, model, surgery):
    window = config.window or surgery.window
    if not 0 < config.eval_len < config.seq_len:
        raise SystemExit(f"config.eval_len={config.eval_len} must lie in (0, seq_len="
                         f"{config.seq_len})")
    if not config.capacities or min(config.capacities) < 1:
        raise SystemExit(f"config.capacities={config.capacities}: give capacities >= 1")
    longest = max(config.seq_len, config.needle.context_tokens + config.needle.max_new_tokens
                  if config.needle.enabled else 0)
    if longest > model.config.max_position_embeddings:
        raise SystemExit(f"{longest} tokens exceed the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    if window + max(config.capacities) >= config.seq_len - config.eval_len:
        raise SystemExit(f"window {window} + capacity {max(config.capacities)} reaches past "
                         f"the history ({config.seq_len - config.eval_len} tokens): nothing "
                         "would be condensed")


# ----------------------------------------------------------------------------- figure, table

def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    caches = result["caches"]
    caps = result["config"]["capacities"]
    has_needle = "needle" in caches["dense"]
    fig, axes = plt.subplots(1, 2 if has_needle else 1, figsize=(12 if has_needle else 6, 4.2),
                             squeeze=False)
    metrics = [("ppl", "perplexity of the last part")]
    if has_needle:
        metrics.append(("needle", "pass-key accuracy"))
    for ax, (metric, label) in zip(axes[0], metrics):
        value = (lambda e: e["ppl"]) if metric == "ppl" else (lambda e: e["needle"]["accuracy"])
        for prefix, style in (("window+", "o-"), ("condensed_all@", "s-"),
                              ("condensed_own@", "^-")):
            ax.plot(caps, [value(caches[f"{prefix}{c}"]) for c in caps], style,
                    label=prefix.rstrip("+@"))
        for name, style in (("dense", "k--"), ("surgical", "r:")):
            ax.axhline(value(caches[name]), linestyle=style[1:], color=style[0], label=name)
        ax.set(xlabel="capacity C (slots beyond sink + window)", ylabel=label, xscale="log")
        ax.set_xticks(caps, labels=[str(c) for c in caps])
        ax.minorticks_off()  # the log axis' own minor labels would overprint the capacities
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: window {result['window']}, sink {result['sink']}, "
                 f"{result['num_clusters']} clusters, S={result['config']['seq_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result):
    caches = result["caches"]
    needle = "needle" in caches["dense"]
    head = ["cache", "slots per head", "ppl", "ppl vs dense"] + (["pass key"] if needle else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = caches["dense"]["ppl"]
    for name, entry in caches.items():
        cells = [name, entry["slots"], f"{entry['ppl']:.3f}",
                 f"{100 * (entry['ppl'] / dense - 1):+.1f}%"]
        if needle:
            cells.append(f"{100 * entry['needle']['accuracy']:.0f}%")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = run_parser(__doc__.splitlines()[0], CONFIG, ROOT / "results" / "kv_condensation")
    return parse_run_args(parser, argv, has_run=lambda args: args.run_dir)


def restore(args):
    return restore_or_build(args.run_dir, args.toy, "kv_condensation_")


def main(argv=None):
    args, overrides = parse_args(argv)
    config = load_config(args.config, args.toy, overrides)
    restored, run_dir = restore(args)
    model, surgery = restored.model, restored.surgery
    check_config(config, model, surgery)
    rows, tok = held_out_rows(restored, config)
    cases = needle_cases(config, tok.tokenizer) if config.needle.enabled else []
    window = config.window or surgery.window
    result = dict(config=config.to_dict(), run_dir=os.path.abspath(run_dir), step=restored.step,
                  model=os.path.basename(restored.base_model["path"].rstrip("/")),
                  window=window, sink=surgery.sink_tokens, cut_level=surgery.cut_level,
                  num_clusters=surgery.arity ** surgery.cut_level, rows=rows.tolist(),
                  needle_prompts=[dict(key=c[1], depth=c[2], key_distance=c[3],
                                       tokens=len(c[0]), ids=c[0]) for c in cases],
                  caches={})
    for spec in cache_specs(config, surgery):
        name, kind, win, capacity, own = spec
        start = time.perf_counter()
        with running(model, config, surgery, spec):
            entry = perplexity(model, rows, config.eval_len, config.batch)
            if cases:
                entry["needle"] = needle(model, cases, config, tok.tokenizer, tok.pad_id)
        entry.update(kind=kind, window=win, capacity=capacity, own_cluster=own,
                     slots=(SLOTS[kind] if kind != "cache"
                            else surgery.sink_tokens + win + capacity),
                     seconds=time.perf_counter() - start)
        result["caches"][name] = entry
        print(f"{name}: ppl {entry['ppl']:.3f}"
              + (f", pass key {entry['needle']['accuracy']:.2f}" if cases else "")
              + f" ({entry['seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "toy" if args.toy else config.name
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{stem}.png")
    print(f"\nresults: {out / (stem + '.json')}, {out / (stem + '.png')}")
    print(f"\nKV-cache condensation, {result['model']} step {restored.step}: last "
          f"{config.eval_len} of {config.seq_len} tokens x {config.sequences} held-out rows; "
          f"window {window}, sink {surgery.sink_tokens}, {result['num_clusters']} clusters, "
          f"gamma {config.gamma}, keep {config.keep}, medoid {config.medoid}"
          + (f"; pass key: {len(cases)} prompts of <= {config.needle.context_tokens} tokens"
             if cases else ""))
    print(table(result))
    return result


if __name__ == "__main__":
    main()

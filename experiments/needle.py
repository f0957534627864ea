"""Needle in a haystack: greedy pass-key retrieval at several context lengths and depths, dense
against surgical, for one or more surgery runs, and per layer and head whether the query can
attend to the needle under the run's routes.

  python experiments/needle.py --run-dir RUN [--run-dir RUN2] [--config.lengths=1024,2048 ...]
  python experiments/needle.py --toy              # CPU: a tiny random run built here

Prompts and scoring are run/tasks/retrieval.py's (passkey_prompt, is_correct; the "compact"
template at toy size, whose fixed text fits 128 byte-level tokens). Replies are decoded greedily
through the tasks' KV-cache decoding (run/tasks/decoding.py): "dense" is the run's base model
(base attention, the same weights; computed once per base model), "surgical" the run's model
with its hard routes.

Reachability. The needle is the tokens overlapping the needle sentence (retrieval.needle_chars),
the query the prompt's last token (the one whose attention produces the first reply token).
From the surgical model's hard route digits on the prompt (extract_routes(digits=True), per
layer and query head), the tree distance of a needle token j to the query q is L minus the
length of their shared digit prefix; q can attend to j when that distance is <= d_max (same
cluster at the cut), or q - j < window, or j < sink. Per (prompt, layer, head) the JSON holds
the least distance over the needle tokens, whether any needle token is reachable and the share
of them that is; the figure shows accuracy against depth and length, and per layer the share
of heads that reach the needle.

Writes <out>/<name>.json and .png (and with --toy or --save-routes <name>.routes.npz: every
prompt's leaf ids per layer and head); prints a Markdown table last.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ring_pruning import load_config  # noqa: E402
from ultrametric_jax.io.tokenizer import as_tokenizer, decode, encode  # noqa: E402
from ultrametric_jax.run.data import corpus_tokenizer  # noqa: E402
from ultrametric_jax.run.metrics import progress_bar  # noqa: E402
from ultrametric_jax.run.pipeline import restore_run  # noqa: E402
from ultrametric_jax.run.tasks import decoding, retrieval  # noqa: E402
from ultrametric_jax.run.tasks.registry import end_token_ids  # noqa: E402
from ultrametric_jax.surgery.inject import extract_routes  # noqa: E402
from ultrametric_jax.surgery.tree import cluster_ids  # noqa: E402
from run_dir_cli import parse_run_args, run_parser  # noqa: E402

CONFIG = ROOT / "configs" / "needle.py"
TEMPLATES = {"standard": retrieval.STANDARD, "compact": retrieval.COMPACT}


# ----------------------------------------------------------------------------- prompts

def make_cases(config, tokenizer, max_context):
    """[dict(length, depth, key, ids, needle=[start, end))] in (length, depth, trial) order."""
    if config.template not in TEMPLATES:
        raise SystemExit(f"config.template={config.template!r}: choose from {list(TEMPLATES)}")
    template = TEMPLATES[config.template]
    lengths = retrieval.context_lengths(config.lengths, max_context, config.max_new_tokens)
    enc = lambda text: encode(tokenizer, text)  # noqa: E731
    rng = np.random.default_rng(config.seed)
    cases = []
    for n in lengths:
        for depth in config.depths:
            for _ in range(config.trials):
                key = str(rng.integers(10000, 100000))
                try:
                    ids, before = retrieval.passkey_prompt(enc, key, n, depth, template)
                except ValueError as e:
                    raise SystemExit(f"length {n}: {e} (a shorter template: "
                                     "--config.template=compact)") from None
                cases.append(dict(length=n, depth=depth, key=key, ids=ids,
                                  needle=needle_tokens(tokenizer, ids, key, before, template)))
    return lengths, cases


def needle_tokens(tokenizer, ids, key, before, template):
    """[start, end): the prompt's tokens that overlap the needle sentence's characters."""
    text = decode(tokenizer, ids)
    encoding = as_tokenizer(tokenizer).encode(text, add_special_tokens=False)
    if list(encoding.ids) != list(ids):
        raise SystemExit("the tokenizer does not round-trip the pass-key prompt: cannot "
                         "locate the needle's tokens")
    lo, hi = retrieval.needle_chars(key, before, template)
    inside = [t for t, (a, b) in enumerate(encoding.offsets) if a < hi and b > lo]
    return [inside[0], inside[-1] + 1]


# ----------------------------------------------------------------------------- measures

def replies(contestant, cases, config, eos_ids, tokenizer):
    """Greedy reply texts, one length at a time (batch bounded by tokens), with a progress
    bar over the prompts (long contexts decode for minutes)."""
    out = [None] * len(cases)
    with progress_bar(len(cases), desc=f"needle, {contestant.name}") as bar:
        for n in sorted({c["length"] for c in cases}):
            idx = [i for i, c in enumerate(cases) if c["length"] == n]
            batch = max(1, config.tokens_per_batch // n)
            got = decoding.greedy(contestant, [cases[i]["ids"] for i in idx],
                                  config.max_new_tokens, eos_ids=eos_ids, batch_size=batch,
                                  tick=bar.update)
            for i, tokens in zip(idx, got):
                ends = [t for t, x in enumerate(tokens) if x in eos_ids]
                out[i] = dict(ids=tokens, text=decode(tokenizer, tokens[:ends[0]] if ends
                                                      else tokens))
    for entry, case in zip(out, cases):
        entry["correct"] = retrieval.is_correct(entry["text"], case["key"])
    return out


def reach(model, case, surgery):
    """Per layer and head: least tree distance from the needle to the query, whether any
    needle token is reachable and the share that is; and the leaf ids [layers, H, S]."""
    # Right-padded to the nominal length (causal: the real tokens' routes are unchanged), so
    # that the prompts of one length share one compiled forward.
    seq = len(case["ids"])
    ids = np.zeros((1, max(case["length"], seq)), np.int32)
    ids[0, :seq] = case["ids"]
    mask = (np.arange(ids.shape[1]) < seq)[None].astype(np.int32)
    routes = extract_routes(model, jnp.asarray(ids), jnp.asarray(mask), digits=True)
    digits = np.asarray(routes.digits)[:, 0, :, :seq]                 # [layers, H, S, L]
    levels = digits.shape[-1]
    # The same forward's cluster ids are the digits cut at the cut level.
    assert np.array_equal(np.asarray(cluster_ids(jnp.asarray(digits), surgery.arity,
                                                 surgery.cut_level)),
                          np.asarray(routes.cluster_ids)[:, 0, :, :seq])
    q = len(case["ids"]) - 1
    start, end = case["needle"]
    j = np.arange(start, end)
    shared = np.cumprod(digits[:, :, start:end] == digits[:, :, q:q + 1], axis=-1).sum(-1)
    distance = levels - shared                                         # [layers, H, needle]
    ok = ((distance <= surgery.max_distance) | (q - j < surgery.window)
          | (j < surgery.sink_tokens))
    leaf = np.zeros(digits.shape[:-1], np.int64)
    for level in range(levels):
        leaf = leaf * surgery.arity + digits[..., level]
    return dict(min_distance=distance.min(-1).tolist(), reach_any=ok.any(-1).tolist(),
                reach_share=ok.mean(-1).tolist()), leaf


def accuracy_grid(entries, cases, lengths, depths):
    return [[float(np.mean([e["correct"] for e, c in zip(entries, cases)
                            if c["length"] == n and c["depth"] == d])) for d in depths]
            for n in lengths]


# ----------------------------------------------------------------------------- figure, table

def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths, lengths = result["depths"], result["lengths"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    curves = [(f"dense ({d['base']})", d["accuracy"], "--") for d in result["dense"]]
    curves += [(f"surgical {r['name']}", r["accuracy"], "-") for r in result["runs"]]
    for label, grid, style in curves:
        grid = np.array(grid)
        axes[0].plot([100 * d for d in depths], 100 * grid.mean(axis=0), "o" + style,
                     label=label)
        axes[1].plot(lengths, 100 * grid.mean(axis=1), "o" + style, label=label)
    axes[0].set(xlabel="needle depth (% of the context)", ylabel="pass-key accuracy (%)",
                title="accuracy vs depth (mean over lengths)", ylim=(-5, 105))
    axes[1].set(xlabel="context length (tokens)", ylabel="pass-key accuracy (%)",
                xscale="log", title="accuracy vs length (mean over depths)", ylim=(-5, 105))
    axes[1].set_xticks(lengths, labels=[str(n) for n in lengths])
    axes[1].minorticks_off()   # the log axis's own minor labels would overprint these
    for run in result["runs"]:
        for n, share in zip(lengths, run["reach_by_length"]):
            axes[2].plot(range(len(share["heads_reaching"])),
                         100 * np.array(share["heads_reaching"]), "o-", ms=3,
                         label=f"{run['name']}, {n} tokens")
    axes[2].set(xlabel="layer", ylabel="heads whose query reaches the needle (%)",
                title="reachable (tree, window or sink), mean over prompts", ylim=(-5, 105))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"Needle in a haystack: {result['model']}, template {result['template']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result):
    head = ["length", "dense"] + [f"surgical {r['name']}" for r in result["runs"]] + [
        f"heads reaching the needle, {r['name']}" for r in result["runs"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = np.array(result["dense"][0]["accuracy"])
    for i, n in enumerate(result["lengths"]):
        cells = [str(n), f"{100 * dense[i].mean():.0f}%"]
        cells += [f"{100 * np.mean(r['accuracy'][i]):.0f}%" for r in result["runs"]]
        cells += [f"{100 * np.mean(r['reach_by_length'][i]['heads_reaching']):.1f}%"
                  for r in result["runs"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = run_parser(__doc__.splitlines()[0], CONFIG, ROOT / "results" / "needle",
                        several_runs=True)
    parser.add_argument("--save-routes", action="store_true",
                        help="save every prompt's leaf ids (--toy: always)")
    return parse_run_args(parser, argv, has_run=lambda args: args.run_dir)


def run_label(run):
    density = "-" if run["density"] is None else f"{100 * run['density']:.1f}%"
    return f"{run['name']} (step {run['step']}, density {density})"


def density_of(run_dir):
    path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["surgical"]["density"]


def main(argv=None):
    from bench_model_routes import build_toy_run, checkpoints_of, perturb_routers
    args, overrides = parse_args(argv)
    config = load_config(args.config, args.toy, overrides)
    run_dirs = args.run_dir or [build_toy_run(tempfile.mkdtemp(prefix="needle_"))]
    result = dict(config=config.to_dict(), template=config.template, depths=list(config.depths),
                  dense=[], runs=[])
    arrays, cases = {}, None
    for r, run_dir in enumerate(run_dirs):
        restored = restore_run(checkpoints_of(run_dir))
        model, surgery = restored.model, restored.surgery
        if args.toy:   # two toy training steps leave the routes collapsed: scatter them
            perturb_routers(restored.model)
        base = restored.base_model["path"]
        tok = corpus_tokenizer(base, model.config).tokenizer
        if cases is None:
            lengths, cases = make_cases(config, tok, int(model.config.max_position_embeddings))
            result.update(lengths=lengths, model=os.path.basename(base.rstrip("/")),
                          cases=[dict(length=c["length"], depth=c["depth"], key=c["key"],
                                      needle=c["needle"], ids=c["ids"]) for c in cases])
        eos = end_token_ids(model, tok)
        dense, surgical = decoding.contestants(model, model)
        if base not in [d["path"] for d in result["dense"]]:
            got = replies(dense, cases, config, eos, tok)
            result["dense"].append(dict(path=base, base=os.path.basename(base.rstrip("/")),
                                        replies=got, accuracy=accuracy_grid(
                                            got, cases, lengths, config.depths)))
            print(f"dense: accuracy {100 * np.mean(result['dense'][-1]['accuracy']):.0f}%",
                  flush=True)
        got = replies(surgical, cases, config, eos, tok)
        per_case = []
        for i, case in enumerate(cases):
            entry, leaf = reach(model, case, surgery)
            per_case.append(entry)
            if args.toy or args.save_routes:
                arrays[f"run{r}_case{i}"] = leaf
        name = os.path.basename(os.path.normpath(run_dir))
        result["runs"].append(dict(
            name=name if name != "run" else f"run{r}", run_dir=os.path.abspath(run_dir),
            step=restored.step, base=base, density=density_of(run_dir),
            levels=surgery.num_levels, arity=surgery.arity, d_max=surgery.max_distance,
            window=surgery.window, sink=surgery.sink_tokens, replies=got,
            accuracy=accuracy_grid(got, cases, lengths, config.depths), reach=per_case,
            reach_by_length=[dict(
                length=n,
                heads_reaching=np.mean([np.mean(e["reach_any"], axis=1) for e, c in
                                        zip(per_case, cases) if c["length"] == n],
                                       axis=0).tolist(),
                min_distance=np.mean([np.mean(e["min_distance"], axis=1) for e, c in
                                      zip(per_case, cases) if c["length"] == n],
                                     axis=0).tolist())
                for n in lengths]))
        print(f"{result['runs'][-1]['name']}: surgical accuracy "
              f"{100 * np.mean(result['runs'][-1]['accuracy']):.0f}%", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "toy" if args.toy else config.name
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    if arrays:
        np.savez_compressed(out / f"{stem}.routes.npz", **arrays)
    plot(result, out / f"{stem}.png")
    print(f"\nresults: {out / (stem + '.json')}, {out / (stem + '.png')}")
    print(f"\nNeedle in a haystack, {result['model']}: {len(cases)} prompts "
          f"({len(lengths)} lengths x {len(config.depths)} depths x {config.trials}), "
          f"greedy, {config.max_new_tokens} new tokens; runs: "
          + ", ".join(map(run_label, result["runs"])))
    print(table(result))
    return result


if __name__ == "__main__":
    main()

"""The tree's arity p: held-out perplexity (dense and surgical), attention density and routing
entropy per level for p in configs/arity.py's arities, (a) at a matched number of clusters and
density target, (b) in the preprint's own setting (L from the sequence length, d_max = L // 2).

  python experiments/arity.py --jobs 4          # GPU: configs/arity.py
  python experiments/arity.py --toy             # CPU: tiny random Llama
  python experiments/arity.py --config.parts=matched --config.arities=2,4

The matched tree: the cut k = L - d_max whose p**k is closest in ratio to config.clusters
(|log p**k - log clusters| least, the smaller k on a tie), L = max(levels_for(p, seq_len), k),
d_max = L - k. One `ultrametric run` per (part, p) in OUT/<part>_p<p>/ (see sweep_runs.py),
`--jobs` at a time; every number is read from the runs' eval.json. Routing entropy at level l
is in bits over the depth-(l + 1) nodes (evaluate.node_entropy_bits), beside its maximum
(l + 1) log2 p.

Writes OUT/arity.json (toy.json with --toy) and a PNG; prints the tables last.
"""
from __future__ import annotations

import json
import math
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sweep_runs import (CONFIGS, collect_runs, corpora, flags, sweep_setup,  # noqa: E402
                        toy_model)
from ultrametric_jax.surgery.config import levels_for  # noqa: E402

CONFIG = CONFIGS / "arity.py"
PARTS = ("matched", "preprint")


def matched_tree(arity: int, clusters: int, seq_len: int) -> dict:
    """levels, d_max and clusters per head p**(L - d_max) closest in ratio to `clusters`."""
    if clusters < 1:
        raise SystemExit(f"config.clusters must be >= 1, got {clusters}")
    below = max(1, int(math.floor(math.log(clusters, arity) + 1e-9)))
    # The ratio in exact fractions: at a tie (clusters = p**(k + 1/2)) floats would pick by
    # rounding; the smaller tree wins it.
    cut = min((below, below + 1), key=lambda k: (max(Fraction(arity ** k, clusters),
                                                     Fraction(clusters, arity ** k)), k))
    levels = max(levels_for(arity, seq_len), cut)
    return dict(arity=arity, levels=levels, d_max=levels - cut, clusters=arity ** cut)


def preprint_tree(arity: int, seq_len: int) -> dict:
    levels = levels_for(arity, seq_len)
    d_max = levels // 2
    return dict(arity=arity, levels=levels, d_max=d_max, clusters=arity ** (levels - d_max))


def plan(config, out: Path) -> list[tuple[str, Path, list[str], dict]]:
    """(run name, work directory, run flags, tree) of every (part, p)."""
    unknown = [p for p in config.parts if p not in PARTS]
    if unknown or not config.parts:
        raise SystemExit(f"config.parts must be a subset of {PARTS}, got {config.parts}")
    bad = [p for p in config.arities if p < 2]
    if bad or not config.arities:
        raise SystemExit(f"config.arities must be integers >= 2, got {config.arities}")
    common = [f"--config.train.seq_len={config.seq_len}",
              f"--config.surgery.max_len={config.seq_len}",
              f"--config.surgery.tau_steps={config.steps}",
              f"--config.surgery.lambda_ramp_steps={config.steps // 5}"]
    if config.toy_model:
        common.append(f"--config.model.path={toy_model(out)}")
    common += flags(config.common)
    runs = []
    for part in config.parts:
        for p in config.arities:
            if part == "matched":
                tree = matched_tree(p, config.clusters, config.seq_len)
                extra = [f"--config.objective.density_target={config.matched_density}"]
            else:
                tree = preprint_tree(p, config.seq_len)
                extra = flags(config.preprint)
            extra += [f"--config.surgery.arity={p}", f"--config.surgery.levels={tree['levels']}",
                      f"--config.surgery.d_max={tree['d_max']}"]
            name = f"{part}_p{p}"
            runs.append((name, out / name, common + extra, dict(part=part, **tree)))
    return runs


def rows_of(results: dict, trees: dict) -> list[dict]:
    rows = []
    for name, result in results.items():
        tree = trees[name]
        p = tree["arity"]
        for corpus, r in corpora(result).items():
            s = r["surgical"]
            entropy = s["routing_entropy_bits_per_level"]
            ceiling = [(level + 1) * math.log2(p) for level in range(len(entropy))]
            rows.append(dict(run=name, corpus=corpus, step=result["step"], **tree,
                             dense_perplexity=r["dense"]["perplexity"],
                             perplexity=s["perplexity"], density=s["density"],
                             tree_density=s["tree_density"], dense_layers=s["dense_layers"],
                             entropy_bits=entropy, entropy_max_bits=ceiling,
                             entropy_share=[h / m for h, m in zip(entropy, ceiling)]))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = list(dict.fromkeys(r["part"] for r in rows))
    fig, axes = plt.subplots(len(parts), 3, figsize=(15, 4 * len(parts)), squeeze=False)
    for ax_row, part in zip(axes, parts):
        mine = [r for r in rows if r["part"] == part]
        for corpus in dict.fromkeys(r["corpus"] for r in mine):
            rs = sorted((r for r in mine if r["corpus"] == corpus), key=lambda r: r["arity"])
            ps = [r["arity"] for r in rs]
            ax_row[0].plot(ps, [100 * (r["perplexity"] / r["dense_perplexity"] - 1) for r in rs],
                           "o-", label=corpus)
            ax_row[1].plot(ps, [100 * r["density"] for r in rs], "o-", label=corpus)
        for r in (r for r in mine if r["corpus"] == "held out"):
            depth = [(level + 1) / len(r["entropy_share"]) for level in
                     range(len(r["entropy_share"]))]
            ax_row[2].plot(depth, r["entropy_share"], "o-",
                           label=f"p={r['arity']} (L={r['levels']}, d_max={r['d_max']})")
        ax_row[0].set(xlabel="arity p", ylabel="perplexity change vs dense (%)", xscale="log",
                      title=f"{part}: held-out perplexity")
        ax_row[1].set(xlabel="arity p", ylabel="total attention density (%)", xscale="log",
                      title=f"{part}: density")
        ax_row[2].set(xlabel="depth / cut depth", ylabel="entropy / its maximum",
                      title=f"{part}: routing entropy per level (held out)", ylim=(0, 1.05))
        for ax in ax_row[:2]:
            ps = sorted({r["arity"] for r in mine})
            ax.set_xticks(ps, labels=[str(p) for p in ps])
            ax.minorticks_off()
        for ax in ax_row:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_tables(rows: list[dict]) -> None:
    print("\n| part | p | L | d_max | clusters | corpus | dense ppl | surgical ppl | change "
          "| density | tree | routing entropy per level, bits (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        change = 100 * (r["perplexity"] / r["dense_perplexity"] - 1)
        entropy = " ".join(f"{h:.2f}({m:.1f})" for h, m in zip(r["entropy_bits"],
                                                               r["entropy_max_bits"]))
        print(f"| {r['part']} | {r['arity']} | {r['levels']} | {r['d_max']} | {r['clusters']} "
              f"| {r['corpus']} | {r['dense_perplexity']:.2f} | {r['perplexity']:.2f} "
              f"| {change:+.1f}% | {100 * r['density']:.1f}% | {100 * r['tree_density']:.1f}% "
              f"| {entropy} |")


def main(argv=None):
    args, config, out, base = sweep_setup(argv, __doc__.splitlines()[0], CONFIG)
    runs = plan(config, out)
    trees = {name: tree for name, _, _, tree in runs}
    results, unfinished = collect_runs([run[:3] for run in runs], base_config=base,
                                       steps=config.steps, jobs=args.jobs, report=args.report)
    rows = rows_of(results, trees)
    stem = "toy" if args.toy else "arity"
    result = dict(config=config.to_dict(), trees=trees,
                  runs={n: str(out / n) for n in results}, unfinished=unfinished, rows=rows)
    text = json.dumps(result, indent=1)
    (out / f"{stem}.json").write_text(text)
    result = json.loads(text)          # what the file holds (tuples become lists)
    plot(rows, out / f"{stem}.png")
    print(f"\nresults: {out / (stem + '.json')}, {out / (stem + '.png')}")
    print_tables(rows)
    return result


if __name__ == "__main__":
    main()

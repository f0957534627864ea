"""Where each recipe lands: held-out perplexity change against total attention density, per
corpus, from the evaluation reports (eval.json) already stored under results/.

  python experiments/quality_frontier.py                       # writes results/quality_frontier/
  python experiments/quality_frontier.py --root DIR --out OUT  # the same relative paths under DIR

Nothing is trained or evaluated here: every number is read from the reports that
ultrametric_jax/run/evaluate.py wrote (`ultrametric run` / `ultrametric eval`). One point per
(report, corpus): the training corpus's held-out split ("plays": Shakespeare's plays no
training batch sees) and each `by_corpus` entry, named by its basename ("stdlib": Python's
sources; "/tmp/docs" -> "docs": the Python documentation's reST sources). For each point:

  perplexity_change = surgical perplexity / dense perplexity - 1, both from the same report:
                      the dense model went through the same evaluation code on the same held-out
                      batches. Reports of different recipes may hold different held-out samples
                      (batch counts differ: the dense perplexities differ), so compare the
                      changes, not the perplexities, across reports.
  density           = surgical.density: the share of the causal pairs the evaluated mask
                      allows (tree or key selection, plus sink and window), over all layers.
  per_layer_density_min / _max = the range of surgical.density_per_layer.
  dense_layers      = surgical.dense_layers: layers whose *tree* keeps every causal pair. The
                      key-selector recipes evaluate a collapsed (all-dense) tree and sparsify
                      through the selectors, so they report 30 of 30 there although every layer
                      is sparse.
  seq_len           = surgery.max_len (tokens per held-out row).

The recipes (RECIPES: label, paths relative to the root, globs allowed; marker) and what was
checked when they were assigned (BENCHMARKS.md's commands, the runs' config.json and
metrics.jsonl where present):
- CE + balance (routers): results/quality_1k/ce_balance_eval.json (1k, no KD, no recall, no
  density target).
- distillation + budget (routers): CE + KD + recall with a dual-ascent density budget on the
  Gumbel-sampled routes: results/quality_1k/distill_eval.json (1k, 20% per layer), the 1k
  quality sweep (results/quality_sweep/*/eval.json, one knob per setting; config.json says
  kd_weight 1, recall_weight 1, budget dual) and the 2k runs new2k_layer / new2k_global (their
  metrics.jsonl logs kd and recall).
- CE + balance + feedback budget (routers): results/quality_2k/fb25, fb45 (2k). BENCHMARKS.md's
  command for them sets kd_weight=0 recall_weight=0 budget_routes=feedback, and their
  metrics.jsonl logs no kd and no recall term: they are not distillation runs.
- key selectors, rank 32 / rank 16: the collapse-initialised tree (step 0, every layer dense in
  the tree) with the low-rank key selectors fitted to a target density (1k on the CPU, 2k, 4k and
  8k on the H200), and the 1k selector sweep (results/quality_sweep_select: target, window and
  sink settings at rank 32, and rank 16).
- trained routes + key selectors, rank 32: results/key_selection_gpu/routes_s2k_r32 (2k: routers
  trained with CE + KD + recall and a 50% per-layer target, then the rank-32 selectors).
Each report is checked against its label where the files allow: surgery.key_rank must equal the
recipe's rank (0: no selectors), and a sibling config.json, when there is one, must agree on
whether the objective distils (objective.kd_weight > 0). A mismatch is printed as a WARNING (the
point is still drawn under the table's label). A listed file that is absent is skipped with a
note; a root without any of them is an error.

Writes OUT/quality_frontier.json (a list of points) and OUT/quality_frontier.png (one panel per
corpus: marker per recipe, colour per sequence length); prints the table last.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_runs import corpora  # noqa: E402

HELD_OUT = "held out"           # corpora()'s name of the training corpus's held-out split

ROOT = Path(__file__).resolve().parents[1]
IN_DOMAIN = "plays"
PANELS = ("plays", "stdlib", "docs")          # drawn first, in this order; others after


class Recipe(NamedTuple):
    label: str
    paths: tuple[str, ...]      # relative to the root; glob patterns allowed
    marker: str
    key_rank: int = 0           # surgery.key_rank the reports must carry (0: no selectors)
    distils: bool | None = None  # objective.kd_weight > 0 in a sibling config.json, if any


ROUTERS_1K = "results/quality_1k"
SELECT_GPU = "results/key_selection_gpu"
SELECT_SWEEP = "results/quality_sweep_select"
RECIPES = (
    Recipe("CE + balance (routers)", (f"{ROUTERS_1K}/ce_balance_eval.json",), "o",
           distils=False),
    Recipe("distillation + budget (routers)",
           (f"{ROUTERS_1K}/distill_eval.json", "results/quality_sweep/*/eval.json",
            "results/quality_2k/new2k_layer/eval.json",
            "results/quality_2k/new2k_global/eval.json"), "s", distils=True),
    Recipe("CE + balance + feedback budget (routers)",
           ("results/quality_2k/fb25/eval.json", "results/quality_2k/fb45/eval.json"), "D",
           distils=False),
    Recipe("key selectors, rank 32",
           ("results/key_selection_cpu/s1k_r32/eval.json", f"{SELECT_GPU}/s2k_r32/eval.json",
            f"{SELECT_GPU}/s4k_r32/eval.json", f"{SELECT_GPU}/s8k_r32/eval.json",
            *(f"{SELECT_SWEEP}/{name}/eval.json" for name in
              ("default", "target_50", "target_10", "target_05", "window_16", "window_128",
               "sink_0"))), "^", key_rank=32),
    Recipe("key selectors, rank 16",
           (f"{SELECT_GPU}/s2k_r16/eval.json", f"{SELECT_GPU}/s4k_r16/eval.json",
            f"{SELECT_SWEEP}/rank_16/eval.json"), "v", key_rank=16),
    Recipe("trained routes + key selectors, rank 32",
           (f"{SELECT_GPU}/routes_s2k_r32/eval.json",), "*", key_rank=32, distils=True),
)


# ----------------------------------------------------------------------------- collect

def corpus_name(name: str) -> str:
    """The panel of one of sweep_runs.corpora's names: the training corpus's held-out split
    is "plays", "stdlib" stays, "/tmp/docs" -> "docs" (the basename of a by_corpus key)."""
    return IN_DOMAIN if name == HELD_OUT else Path(name.rstrip("/")).name or name


def corpus_rank(corpus: str) -> tuple:
    return (PANELS.index(corpus), "") if corpus in PANELS else (len(PANELS), corpus)


def report_paths(root: Path, recipe: Recipe) -> tuple[list[Path], list[str]]:
    """(existing report files, patterns that matched nothing) of one recipe under root."""
    found, missing = [], []
    for pattern in recipe.paths:
        hits = sorted(p for p in root.glob(pattern) if p.is_file())
        found += [p for p in hits if p not in found]
        if not hits:
            missing.append(pattern)
    return found, missing


def label_warnings(recipe: Recipe, report: dict, path: Path) -> list[str]:
    """What in the report (and its sibling config.json) contradicts the recipe's label."""
    out = []
    rank = int(report.get("surgery", {}).get("key_rank") or 0)
    if rank != recipe.key_rank:
        out.append(f"surgery.key_rank is {rank}, the recipe says {recipe.key_rank}")
    config = path.parent / "config.json"
    if recipe.distils is not None and config.is_file():
        kd = json.loads(config.read_text()).get("objective", {}).get("kd_weight")
        if kd is not None and (kd > 0) != recipe.distils:
            out.append(f"config.json has objective.kd_weight={kd}, the recipe "
                       f"{'distils' if recipe.distils else 'does not distil'}")
    return out


def point(recipe: Recipe, rel: str, report: dict, corpus: str, entry: dict) -> dict:
    dense, surgical = entry["dense"]["perplexity"], entry["surgical"]["perplexity"]
    s = entry["surgical"]
    per_layer = s.get("density_per_layer") or []
    return dict(recipe=recipe.label, path=rel, step=report.get("step"),
                seq_len=int(report["surgery"]["max_len"]), corpus=corpus,
                density=s["density"], tree_density=s.get("tree_density"),
                perplexity_change=surgical / dense - 1, dense_perplexity=dense,
                surgical_perplexity=surgical, dense_layers=s.get("dense_layers"),
                per_layer_density_min=min(per_layer) if per_layer else None,
                per_layer_density_max=max(per_layer) if per_layer else None)


def collect(root: Path, recipes=RECIPES, log=None) -> list[dict]:
    """Every (report, corpus) point of the recipes' reports under root, sorted by recipe (in
    table order), sequence length, corpus (plays, stdlib, docs, others) and path."""
    root, log = Path(root), log or sys.stderr
    points = []
    for recipe in recipes:
        found, missing = report_paths(root, recipe)
        for pattern in missing:
            print(f"skipped (absent): {recipe.label}: {pattern}", file=log)
        for path in found:
            report = json.loads(path.read_text())
            rel = path.relative_to(root).as_posix()
            for warning in label_warnings(recipe, report, path):
                print(f"WARNING: {rel} ({recipe.label}): {warning}", file=log)
            for name, entry in corpora(report).items():
                points.append(point(recipe, rel, report, corpus_name(name), entry))
    if not points:
        raise SystemExit(f"no evaluation report of any recipe under {root} (looked for "
                         f"{[p for r in recipes for p in r.paths]})")
    order = {r.label: i for i, r in enumerate(recipes)}
    points.sort(key=lambda p: (order[p["recipe"]], p["seq_len"], corpus_rank(p["corpus"]),
                               p["path"]))
    return points


# ----------------------------------------------------------------------------- report

def length_label(seq_len: int) -> str:
    return f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)


def table(points: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"
    lines = ["| recipe | report | S | corpus | density % | change % | per-layer density % "
             "| dense layers (tree) |", "|---|---|---|---|---|---|---|---|"]
    for p in points:
        run = p["path"].removeprefix("results/").removesuffix("/eval.json")
        lines.append(f"| {p['recipe']} | {run} | {length_label(p['seq_len'])} | {p['corpus']} "
                     f"| {pct(p['density'])} | {100 * p['perplexity_change']:+.1f} "
                     f"| {pct(p['per_layer_density_min'])}-{pct(p['per_layer_density_max'])} "
                     f"| {p['dense_layers']} |")
    return "\n".join(lines)


def plot(points: list[dict], path: Path, recipes=RECIPES) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    corpora = sorted({p["corpus"] for p in points}, key=corpus_rank)
    lengths = sorted({p["seq_len"] for p in points})
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    colour = {s: palette[i % len(palette)] for i, s in enumerate(lengths)}
    marker = {r.label: r.marker for r in recipes}
    present = [r for r in recipes if any(p["recipe"] == r.label for p in points)]

    fig, axes = plt.subplots(1, len(corpora), figsize=(5.2 * len(corpora), 4.8),
                             squeeze=False, sharey=True)
    for ax, corpus in zip(axes[0], corpora):
        mine = [p for p in points if p["corpus"] == corpus]
        ax.axhline(0, color="k", lw=1)
        for p in mine:
            ax.scatter(100 * p["density"], 100 * p["perplexity_change"],
                       marker=marker[p["recipe"]], s=70 if marker[p["recipe"]] == "*" else 42,
                       color=colour[p["seq_len"]], edgecolors="k", linewidths=0.5, zorder=3)
        ax.set(xlim=(0, 100), xlabel="total attention density (% of causal pairs)",
               title=f"{corpus} ({len(mine)} points)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity change vs dense (%)")
    handles = [Line2D([], [], ls="", marker=r.marker, color="0.5", markeredgecolor="k",
                      ms=9 if r.marker == "*" else 7, label=r.label) for r in present]
    handles += [Line2D([], [], ls="", marker="o", color=colour[s], markeredgecolor="k",
                       label=f"{length_label(s)} tokens") for s in lengths]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.suptitle("SmolLM2-135M: held-out perplexity change against total attention density "
                 "(dense through the same evaluation code, on the same batches)", fontsize=10)
    rows = -(-len(handles) // 5)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * rows, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT),
                        help="read the recipes' reports under this folder (same relative paths)")
    parser.add_argument("--out", default=str(ROOT / "results" / "quality_frontier"))
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    points = collect(Path(args.root))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_frontier.json").write_text(json.dumps(points, indent=1))
    plot(points, out / "quality_frontier.png")
    print(table(points))
    print(f"\nresults: {out / 'quality_frontier.json'}, {out / 'quality_frontier.png'}")
    return points


if __name__ == "__main__":
    main()

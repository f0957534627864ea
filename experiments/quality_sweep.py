"""Held-out perplexity against total attention density over the recipe's knobs (density
target, d_max, window, sink), per domain, beside the dense model and the sink + window mask
alone at the same density.

  python experiments/quality_sweep.py --jobs 4                     # GPU: configs/quality_sweep.py
  python experiments/quality_sweep.py --toy                        # CPU: tiny random Llama
  python experiments/quality_sweep.py --config.only=default,d_max_3 --config.steps=150

One `ultrametric run` per setting of the config (OUT/<setting>/, see sweep_runs.py: a finished
run is skipped, an interrupted one resumes), `--jobs` of them at a time. Every number comes from
the runs' eval.json: the dense model and the surgical model per corpus (the training corpus's
held-out split and every eval.extra_corpora entry), and, with eval.window_baseline, the dense
model under the sink + window mask alone at each corpus's surgical density
(ultrametric_jax.run.window_baseline). sweep_dmax.py is the one-knob form of this sweep.

Writes OUT/quality_sweep.json (toy.json with --toy) and a PNG (one panel per corpus); prints
the table last.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_runs import (CONFIGS, collect_runs, corpora, flags, plot_per_corpus,  # noqa: E402
                        selected, sweep_setup, toy_model)

CONFIG = CONFIGS / "quality_sweep.py"


def plan(config, out: Path) -> list[tuple[str, Path, list[str]]]:
    """(setting, work directory, run flags) of every selected setting."""
    common = [f"--config.surgery.tau_steps={config.steps}",
              f"--config.surgery.lambda_ramp_steps={config.steps // 5}"]
    if config.toy_model:
        common.append(f"--config.model.path={toy_model(out)}")
    common += flags(config.common)
    return [(name, out / name, common + flags(config.settings[name]))
            for name in selected(list(config.settings.keys()), config.only)]


def rows_of(results: dict, config) -> list[dict]:
    """One row per (setting, corpus) from the eval.json files."""
    rows = []
    for name, result in results.items():
        for corpus, r in corpora(result).items():
            s = r["surgical"]
            row = dict(setting=name, overrides=config.settings[name].to_dict(), corpus=corpus,
                       step=result["step"], dense_perplexity=r["dense"]["perplexity"],
                       perplexity=s["perplexity"], density=s["density"],
                       tree_density=s["tree_density"], dense_layers=s["dense_layers"],
                       surgery={k: result["surgery"][k] for k in
                                ("arity", "levels", "max_len", "d_max", "window",
                                 "sink_tokens")})
            if "window_only" in r:
                w = r["window_only"]
                row["window_only"] = {k: w[k] for k in ("perplexity", "density", "window",
                                                        "sink", "target_density")}
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    def draw(ax, mine):
        mine = sorted(mine, key=lambda r: r["density"])
        ax.plot([100 * r["density"] for r in mine], [r["perplexity"] for r in mine], "o",
                color="tab:red", label="surgical (its whole mask)")
        for r in mine:
            ax.annotate(r["setting"], (100 * r["density"], r["perplexity"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        local = sorted((r["window_only"] for r in mine if "window_only" in r),
                       key=lambda w: w["density"])
        if local:
            ax.plot([100 * w["density"] for w in local], [w["perplexity"] for w in local],
                    "s", color="tab:blue", ms=5, label="sink + window alone (same density)")
        return mine[0]["dense_perplexity"]

    plot_per_corpus(rows, path, draw, "total attention density (% of causal pairs)")


def print_table(rows: list[dict]) -> None:
    print("\n| setting | corpus | steps | dense ppl | surgical ppl | change | density | tree "
          "| window-only ppl (window) | window-only density |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        change = 100 * (r["perplexity"] / r["dense_perplexity"] - 1)
        w = r.get("window_only")
        local = (f"{w['perplexity']:.2f} ({w['window']}) | {100 * w['density']:.1f}%"
                 if w else "- | -")
        print(f"| {r['setting']} | {r['corpus']} | {r['step']} | {r['dense_perplexity']:.2f} "
              f"| {r['perplexity']:.2f} | {change:+.1f}% | {100 * r['density']:.1f}% "
              f"| {100 * r['tree_density']:.1f}% | {local} |")


def main(argv=None):
    args, config, out, base = sweep_setup(argv, __doc__.splitlines()[0], CONFIG)
    results, unfinished = collect_runs(plan(config, out), base_config=base, steps=config.steps,
                                       jobs=args.jobs, report=args.report)
    rows = rows_of(results, config)
    stem = "toy" if args.toy else "quality_sweep"
    result = dict(config=config.to_dict(), runs={n: str(out / n) for n in results},
                  unfinished=unfinished, rows=rows)
    text = json.dumps(result, indent=1)
    (out / f"{stem}.json").write_text(text)
    result = json.loads(text)          # what the file holds (tuples become lists)
    plot(rows, out / f"{stem}.png")
    print(f"\nresults: {out / (stem + '.json')}, {out / (stem + '.png')}")
    print_table(rows)
    return result


if __name__ == "__main__":
    main()

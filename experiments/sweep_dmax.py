"""Held-out perplexity against attention density for several surgery settings.

Runs `ultrametric run` once per setting (each in its own work directory, so an interrupted
sweep resumes where it stopped), then collects every eval.json into one table and one figure:
dense baseline perplexity, surgical perplexity and density per setting.

  python experiments/sweep_dmax.py --out results/sweep_dmax --d-max 2 3 4 --steps 80
  python experiments/sweep_dmax.py --out results/sweep_lambda --lambda-max 0.1 1 4 --steps 80

Any other `--config.x.y=v` flags are passed through to every run.
experiments/quality_sweep.py generalises this sweep (any knob, several corpora, the sink +
window baseline, runs side by side).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(os.path.dirname(HERE), "configs", "smollm2_shakespeare.py")


def settings(args) -> list[tuple[str, list[str]]]:
    out = [(f"d_max={d}", [f"--config.surgery.d_max={d}"]) for d in args.d_max or []]
    out += [(f"lambda_max={lam:g}", [f"--config.surgery.lambda_max={lam}"])
            for lam in args.lambda_max or []]
    if not out:
        raise SystemExit("give at least one setting: --d-max ... and/or --lambda-max ...")
    return out


def run_one(name: str, flags: list[str], args, passthrough: list[str]) -> dict:
    workdir = os.path.join(args.out, name.replace("=", "_"))
    cmd = [sys.executable, "-m", "ultrametric_jax", "run", "--config", args.config,
           "--workdir", workdir, f"--config.train.steps={args.steps}", *flags, *passthrough]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(workdir, "eval.json")) as f:
        return json.load(f)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    dense = rows[0]["dense_perplexity"]
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense baseline ({dense:.2f})")
    xs = [100 * r["density"] for r in rows]
    ys = [r["perplexity"] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:red", label="surgical")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("attention density (% of causal pairs)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("perplexity against density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="sweep directory (one work directory per setting)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--d-max", type=int, nargs="*")
    p.add_argument("--lambda-max", type=float, nargs="*")
    args, passthrough = p.parse_known_args()
    rows = []
    for name, flags in settings(args):
        result = run_one(name, flags, args, passthrough)
        s = result["surgical"]
        rows.append({"setting": name, "step": result["step"],
                     "dense_perplexity": result["dense"]["perplexity"],
                     "perplexity": s["perplexity"], "density": s["density"],
                     "tree_density": s["tree_density"], "dense_layers": s["dense_layers"]})
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, os.path.join(args.out, "sweep.png"))
    print(f"\n{'setting':<16}{'steps':>6}{'dense ppl':>11}{'surgical ppl':>14}{'change':>9}"
          f"{'density':>9}{'tree':>8}{'dense layers':>14}")
    for r in rows:
        change = 100 * (r["perplexity"] / r["dense_perplexity"] - 1)
        print(f"{r['setting']:<16}{r['step']:>6}{r['dense_perplexity']:>11.2f}"
              f"{r['perplexity']:>14.2f}{change:>+8.1f}%{100 * r['density']:>8.1f}%"
              f"{100 * r['tree_density']:>7.1f}%{r['dense_layers']:>14}")


if __name__ == "__main__":
    main()

"""Evaluation of a surgery run: dense-baseline vs surgical perplexity on held-out text,
attention density per layer (tree only and total) and routing entropy per level, written as
JSON and as a PNG (loss curves and density per layer).

Densities are counted here from the hard cluster ids, independently of the attention code:
among the causal pairs (j <= i) of real tokens, `tree` counts pairs in the same cluster and
`total` those allowed by tree, sink or window. Routing entropy at level l is the entropy, in
bits, of how tokens spread over the tree's nodes at depth l + 1 (mean over layers and heads); it
is reported for the levels above the cut, the ones that shape the mask (max (l + 1) log2 p).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.losses import token_cross_entropy
from ultrametric_jax.run.metrics import TOTAL_LABEL, draw_layer_density, read_metrics
from ultrametric_jax.surgery.inject import evaluation_mode, forward_with_aux
from ultrametric_jax.surgery.tree import pair_counts

RESULTS_JSON = "eval.json"
RESULTS_PNG = "eval.png"


# ----------------------------------------------------------------------------- counting

def node_entropy_bits(clusters: np.ndarray, valid: np.ndarray, arity: int, cut_level: int
                      ) -> np.ndarray:
    """[cut_level] mean over heads of the entropy (bits) of token occupancy of depth-(l+1)
    nodes; clusters int [B, H, S] at the cut level, pooled over the batch."""
    clusters = np.asarray(clusters, np.int64)
    v = np.broadcast_to(np.asarray(valid, bool)[:, None, :], clusters.shape)
    out = np.zeros(cut_level)
    heads = clusters.shape[1]
    for level in range(cut_level):
        nodes = clusters // arity ** (cut_level - level - 1)
        for h in range(heads):
            _, counts = np.unique(nodes[:, h][v[:, h]], return_counts=True)
            prob = counts / counts.sum()
            out[level] += float(-(prob * np.log2(prob)).sum()) / heads
    return out


# ----------------------------------------------------------------------------- forward passes

@nnx.jit
def _cross_entropy(model, input_ids, mask):
    return token_cross_entropy(model(input_ids, attention_mask=mask), input_ids, mask), None


@functools.partial(nnx.jit, static_argnames=("window", "sink_tokens"))
def _cross_entropy_and_routes(model, input_ids, mask, *, window, sink_tokens):
    """((CE sum, count), (clusters [layers,B,H,S], per-layer (tree, allowed, causal) pair
    counts [3, layers], with key selectors also their (visited, causal) 64 x 64 tiles:
    [5, layers]))."""
    logits, aux = forward_with_aux(model, input_ids, mask)
    clusters = aux["clusters"]
    counts = pair_counts(clusters, window, sink_tokens, mask.astype(bool)[None, :, None, :])
    per_layer = jnp.stack([jnp.sum(c, axis=(1, 2)) for c in counts])
    if "allowed_pairs_per_layer" in aux:          # key selectors narrow the tree's pairs
        per_layer = jnp.concatenate([per_layer.at[1].set(aux["allowed_pairs_per_layer"]),
                                     jnp.stack([aux["visited_blocks_per_layer"],
                                                aux["causal_blocks_per_layer"]])])
    return token_cross_entropy(logits, input_ids, mask), (clusters, per_layer)


def _held_out_loss(forward, model, batches: Sequence[dict], visit=None) -> dict:
    """Loss, perplexity and token count of forward(model, input_ids, mask) -> ((CE sum, count),
    extra) over the batches; visit(extra, mask), if given, sees every batch. The sums stay on
    the device: one host sync at the end."""
    total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    for batch in batches:
        mask = np.asarray(batch["attention_mask"], bool)
        (s, c), extra = forward(model, jnp.asarray(batch["input_ids"]), jnp.asarray(mask))
        total, count = total + s, count + c.astype(jnp.int32)
        if visit is not None:
            visit(extra, mask)
    loss = float(total) / int(count)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count)}


def perplexity(model, batches: Sequence[dict]) -> dict:
    """Perplexity of a (dense or surgical, evaluation-mode) model over held-out batches."""
    return _held_out_loss(_cross_entropy, model, batches)


def evaluate_surgical(model, batches: Sequence[dict], surgery: SurgeryConfig) -> dict:
    """Perplexity, density per layer (tree / total) and routing entropy of the hard routes
    (evaluation mode; the model's mode is restored afterwards); with key selectors also the
    block density: of the 64 x 64 tiles holding a causal pair, the share holding an allowed
    one."""
    layers = len(model.model.layers)
    # tree, allowed, causal pairs per layer (and with key selectors visited, causal tiles)
    counts = np.zeros((5 if surgery.key_rank else 3, layers), np.float64)
    entropy = np.zeros(surgery.cut_level)

    def visit(routes, mask):
        clusters, per_layer = (np.asarray(a) for a in jax.device_get(routes))
        counts[:] += per_layer
        for layer in range(layers):
            entropy[:] += node_entropy_bits(clusters[layer], mask, surgery.arity,
                                            surgery.cut_level) / (layers * len(batches))

    forward = functools.partial(_cross_entropy_and_routes, window=surgery.window,
                                sink_tokens=surgery.sink_tokens)
    with evaluation_mode(model):
        result = _held_out_loss(forward, model, batches, visit)
    tree, allowed, causal = counts[:3]
    density = allowed / np.maximum(causal, 1)
    tree_density = tree / np.maximum(causal, 1)
    if surgery.key_rank:    # the share of causal 64 x 64 tiles a block-sparse kernel would visit
        visited, tiles = counts[3:]
        result = {**result, "block_density": float(visited.sum() / max(tiles.sum(), 1)),
                  "block_density_per_layer": (visited / np.maximum(tiles, 1)).tolist()}
    return {**result,
            "density": float(allowed.sum() / max(causal.sum(), 1)),
            "tree_density": float(tree.sum() / max(causal.sum(), 1)),
            "density_per_layer": density.tolist(),
            "tree_density_per_layer": tree_density.tolist(),
            "routing_entropy_bits_per_level": entropy.tolist(),
            "dense_layers": int(np.sum(tree_density >= 1.0))}


# ----------------------------------------------------------------------------- reports

@dataclasses.dataclass
class EvalReport:
    dense: dict
    surgical: dict
    step: Optional[int]
    surgery: Optional[dict] = None      # the SurgeryConfig the numbers were computed with
    # corpus -> {"dense": ..., "surgical": ...} for the out-of-domain held-out corpora
    by_corpus: dict = dataclasses.field(default_factory=dict)
    tasks: Optional[dict] = None        # task name -> its one-line summary (run/tasks)
    # The sink + window mask alone at the surgical density (run/window_baseline), or None
    window_only: Optional[dict] = None
    # The key selectors' fit (pipeline.fit_selection), or None without selectors
    selection: Optional[dict] = None

    def to_dict(self) -> dict:
        d = {"step": self.step, "dense": self.dense, "surgical": self.surgical}
        if self.surgery is not None:
            d["surgery"] = self.surgery
        if self.tasks:
            d["tasks"] = self.tasks
        if self.window_only is not None:
            d["window_only"] = self.window_only
        if self.selection is not None:
            d["selection"] = self.selection
        if self.by_corpus:
            d["by_corpus"] = {name: dict(r, perplexity_change=r["surgical"]["perplexity"]
                                         / r["dense"]["perplexity"] - 1)
                              for name, r in self.by_corpus.items()}
        if self.dense:
            d["perplexity_change"] = self.surgical["perplexity"] / self.dense["perplexity"] - 1
        return d

    def summary(self) -> str:
        s = self.surgical
        lines = [f"step {self.step}: held-out perplexity"]
        if self.dense:
            change = 100 * (s["perplexity"] / self.dense["perplexity"] - 1)
            lines[0] += f" dense {self.dense['perplexity']:.2f} -> surgical " \
                        f"{s['perplexity']:.2f} ({change:+.1f}%)"
        else:
            lines[0] += f" surgical {s['perplexity']:.2f}"
        lines.append(f"attention density {100 * s['density']:.1f}% (tree only "
                     f"{100 * s['tree_density']:.1f}%); {s['dense_layers']} of "
                     f"{len(s['density_per_layer'])} layers fully dense in the tree")
        if self.selection is not None:
            f = self.selection
            lines.append(f"key selectors at rank {f['key_rank']}: p >= "
                         f"exp({f['log_threshold']:.3f}), density {100 * f['density']:.1f}% on "
                         f"{f['calibration_rows']} training rows (target "
                         f"{100 * f['target_density']:.0f}%); held out, the mask touches "
                         f"{100 * s.get('block_density', float('nan')):.1f}% of the causal "
                         "64 x 64 tiles")
        for name, r in self.by_corpus.items():
            dense, surgical = r["dense"]["perplexity"], r["surgical"]["perplexity"]
            lines.append(f"{name}: perplexity dense {dense:.2f} -> surgical {surgical:.2f} "
                         f"({100 * (surgical / dense - 1):+.1f}%) at density "
                         f"{100 * r['surgical']['density']:.1f}%")
        for name, r in [("held out", {"window_only": self.window_only})] + list(
                self.by_corpus.items()):
            if r.get("window_only") is not None:
                w = r["window_only"]
                lines.append(f"{name}: sink + window alone (window {w['window']}, sink "
                             f"{w['sink']}) perplexity {w['perplexity']:.2f} at density "
                             f"{100 * w['density']:.1f}%")
        lines += list((self.tasks or {}).values())
        return "\n".join(lines)


def write_report(report: EvalReport, workdir: str) -> tuple[str, str]:
    """<workdir>/eval.json and <workdir>/eval.png; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    json_path = os.path.join(workdir, RESULTS_JSON)
    with open(json_path, "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    png_path = os.path.join(workdir, RESULTS_PNG)
    plot_report(report, read_metrics(os.path.join(workdir, "metrics.jsonl"), "train"), png_path)
    return json_path, png_path


def _draw_training(ax_loss, ax_train, report: EvalReport, train_records: list[dict]) -> None:
    steps = [r["step"] for r in train_records]
    for key, label in (("loss", "total loss"), ("ce", "cross-entropy"),
                       ("balance_loss", "balance loss")):
        ax_loss.plot(steps, [r.get(key, np.nan) for r in train_records], label=label)
    for key, label in (("density", "total"), ("tree_density", "tree only")):
        ax_train.plot(steps, [r.get(key, np.nan) for r in train_records], label=label)
    ax_train.set_ylim(0, 1.05)
    ax_train.set_xlabel("step")
    ax_train.set_title("attention density while training (Gumbel routes)")
    ax_train.legend(fontsize=8)
    if report.dense:
        ax_loss.axhline(report.dense["loss"], color="k", ls="--", lw=1, label="dense held-out CE")
    ax_loss.axhline(report.surgical["loss"], color="r", ls=":", lw=1,
                    label="surgical held-out CE")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training losses")
    ax_loss.legend(fontsize=8)


def plot_report(report: EvalReport, train_records: list[dict], path: str) -> None:
    # matplotlib takes a second to import: only when a figure is drawn, with a file backend.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    total_label = ("total (tree and key selection, + sink + window)" if report.selection
                   else TOTAL_LABEL)
    title = f"held-out density per layer, hard routes (step {report.step})"
    if not train_records:       # nothing trained (train.steps = 0): the held-out panel alone
        fig, ax_density = plt.subplots(figsize=(8, 4.5))
        if report.dense:
            title += (f"\nperplexity dense {report.dense['perplexity']:.2f} -> surgical "
                      f"{report.surgical['perplexity']:.2f} at density "
                      f"{report.surgical['density']:.1%}")
    else:
        fig, (ax_loss, ax_train, ax_density) = plt.subplots(1, 3, figsize=(17, 4.5))
        _draw_training(ax_loss, ax_train, report, train_records)
    draw_layer_density(ax_density, report.surgical["density_per_layer"],
                       report.surgical["tree_density_per_layer"], title, total_label)
    ax_density.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Run metrics: a JSONL log (always), TensorBoard scalars and figures (when a writer is
installed: tensorboardX, which needs neither torch nor TensorFlow, else torch's) and a tqdm
progress bar.

Each JSONL line is {"step": int, "split": str, <name>: float, ...}. A resumed run first drops
lines of steps after its restored checkpoint, so the log never holds two histories. Only JAX
process 0 writes: on a pod every process runs the same loop on the same run directory.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import warnings
from typing import Iterable, Mapping, Optional, Sequence

import jax

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
# SummaryWriter modules, in order of preference: tensorboardX needs neither torch nor TensorFlow.
TENSORBOARD_WRITERS = ("tensorboardX", "torch.utils.tensorboard")


def _scalar(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")


def read_metrics(path: str, split: Optional[str] = None) -> list[dict]:
    """The records of a metrics.jsonl (optionally of one split); a torn last line is ignored."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if split is None or record.get("split") == split:
                out.append(record)
    return out


def tensorboard_installed() -> bool:
    """Whether a TensorBoard writer may be importable (checked without importing torch)."""
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboardX", "tensorboard"))


def _tensorboard_writer(logdir: str):
    """A SummaryWriter (tensorboardX's, else torch's), or None."""
    for module in TENSORBOARD_WRITERS:
        try:
            return importlib.import_module(module).SummaryWriter(logdir)
        except Exception:  # missing or broken optional dependency: JSONL only
            continue
    warnings.warn("no TensorBoard SummaryWriter could be created (pip install "
                  "'ultrametric_jax[tensorboard]' brings tensorboardX); metrics go to "
                  "metrics.jsonl only", RuntimeWarning)
    return None


TOTAL_LABEL = "total (tree + sink + window)"


def draw_layer_density(ax, density: Sequence[float], tree_density: Sequence[float],
                       title: str, total_label: str = TOTAL_LABEL) -> None:
    """Bars of the attention density per layer (total, and the tree alone) on a matplotlib
    axis: the figure TensorBoard gets and the last panel of eval.png. The larger series is
    drawn wide behind the narrower one (key selectors make the total the smaller)."""
    layers = range(len(density))
    series = [(density, "tab:blue", total_label), (tree_density, "tab:orange", "tree only")]
    series.sort(key=lambda s: -sum(s[0]))
    for (values, color, label), width in zip(series, (0.8, 0.5)):
        ax.bar(layers, values, color=color, width=width, label=label)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of causal pairs attended")
    ax.set_title(title)
    ax.legend(fontsize=8)


def layer_density_figure(density: Sequence[float], tree_density: Sequence[float], step: int):
    """A bar chart of the attention density per layer (total and tree only)."""
    import matplotlib  # heavy, and needed only when a figure is written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    draw_layer_density(ax, density, tree_density, f"density per layer, hard routes (step {step})")
    fig.tight_layout()
    return fig


class MetricsWriter:
    """Appends scalars to <workdir>/metrics.jsonl and, when available, to TensorBoard.

    Writes only on JAX process 0 (process_index defaults to jax.process_index()); on any other
    process every method does nothing.
    """

    def __init__(self, workdir: str, *, tensorboard: Optional[bool] = None,
                 process_index: Optional[int] = None):
        self.path = os.path.join(workdir, METRICS_FILE)
        if process_index is None:
            process_index = jax.process_index()
        self.enabled = process_index == 0
        if tensorboard is None:
            tensorboard = tensorboard_installed()
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                self._tb = _tensorboard_writer(os.path.join(workdir, TENSORBOARD_SUBDIR))

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps > step (left by a run that was interrupted)."""
        if not self.enabled:
            return
        records = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _scalar(v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"{split}/{name}", _scalar(value), int(step))

    def write_layer_density(self, step: int, density: Sequence[float],
                            tree_density: Sequence[float], split: str = "eval") -> None:
        """The density-per-layer figure, to TensorBoard (the JSONL log holds scalars only)."""
        if self._tb is not None:
            self._tb.add_figure(f"{split}/density_per_layer",
                                layer_density_figure(density, tree_density, step), int(step),
                                close=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
    """A tqdm bar on stderr; refreshes rarely when stderr is not a terminal."""
    from tqdm.auto import tqdm
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5 if interactive else 30.0, file=sys.stderr)


def format_scalars(scalars: Mapping[str, float], keys: Iterable[str]) -> dict:
    """Short strings for a progress-bar postfix."""
    return {k: f"{float(scalars[k]):.4g}" for k in keys if k in scalars}

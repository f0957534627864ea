"""Run metrics: a JSONL log (always), TensorBoard scalars (when tensorboard is importable) and
a tqdm progress bar.

Each JSONL line is {"step": int, "split": str, <name>: float, ...}. A resumed run first drops
lines of steps after its restored checkpoint, so the log never holds two histories.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import warnings
from typing import Iterable, Mapping, Optional

METRICS_FILE = "metrics.jsonl"


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


def _tensorboard_writer(logdir: str):
    """A SummaryWriter (torch's or tensorboardX's, both need tensorboard), or None."""
    for module in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            return importlib.import_module(module).SummaryWriter(logdir)
        except Exception:  # missing or broken optional dependency: JSONL only
            continue
    warnings.warn("tensorboard is installed but no SummaryWriter (torch or tensorboardX) "
                  "could be created; metrics go to metrics.jsonl only", RuntimeWarning)
    return None


class MetricsWriter:
    """Appends scalars to <workdir>/metrics.jsonl and, when available, to TensorBoard."""

    def __init__(self, workdir: str, *, tensorboard: Optional[bool] = None):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        if tensorboard is None:
            tensorboard = importlib.util.find_spec("tensorboard") is not None
        self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard")) if tensorboard \
            else None

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps > step (left by a run that was interrupted)."""
        records = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        record = {"step": int(step), "split": split}
        record.update({k: _scalar(v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"{split}/{name}", _scalar(value), int(step))

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

"""Shared by the experiments that train one surgery per setting (quality_sweep.py, arity.py),
and by mask_oracles.py for its config and figure:
the experiment config with --config.KEY=VALUE overrides, one `ultrametric run` per setting in
its own work directory (a finished one is skipped, an interrupted one resumes from its
checkpoint), N of them at a time, and their eval.json files read back.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ----------------------------------------------------------------------------- config

def load_config(path, variant: str, overrides: list[str]):
    """get_config(variant) of the experiment config at `path`, with --config.KEY=VALUE
    overrides (ints, floats, bools, strings; tuples as comma-separated items)."""
    config = runpy.run_path(str(path))["get_config"](variant)
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise SystemExit(f"unrecognised argument {item!r} (overrides are "
                             "--config.KEY=VALUE)")
        key, _, text = item[len("--config."):].partition("=")
        current = config
        for part in key.split("."):
            if not hasattr(current, "keys") or part not in current:
                raise SystemExit(f"unknown config key {key!r}")
            current = current[part]
        config.update_from_flattened_dict({key: parse_value(key, current, text)})
    return config


def parse_value(key, current, text):
    if isinstance(current, tuple):
        kind = type(current[0]) if current else str
        return tuple(kind(x) for x in text.split(",") if x)
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise SystemExit(f"--config.{key}={text!r}: expected true or false")
        return text.lower() == "true"
    try:
        return type(current)(text)
    except (TypeError, ValueError):
        raise SystemExit(f"--config.{key}={text!r}: expected a {type(current).__name__}") from None


def flags(overrides) -> list[str]:
    """--config.a.b=v flags of a (nested) dict of run-config overrides; None stays None."""
    def walk(prefix, value):
        if hasattr(value, "items"):
            for key, inner in value.items():
                yield from walk(f"{prefix}{key}.", inner)
        else:
            text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            yield f"--config.{prefix[:-1]}={text}"
    return list(walk("", overrides))


def selected(names, only: str) -> list[str]:
    """names, or the comma-separated subset `only` of them (in the given order)."""
    if not only:
        return list(names)
    wanted = [x.strip() for x in only.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in names]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown} in --config.only (known: {list(names)})")
    return wanted


def toy_model(out: Path) -> str:
    """The tiny random Llama of configs/tiny_random.py, written once under `out`."""
    path = out / "tiny_model"
    if not (path / "config.json").exists():
        runpy.run_path(str(CONFIGS / "tiny_random.py"))["write_model"](str(path))
    return str(path)


# ----------------------------------------------------------------------------- runs

def finished(workdir: Path, steps: int):
    """The eval.json of a run that trained `steps` steps, or None."""
    try:
        result = json.loads((workdir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("step") == steps else None


class Children:
    """The runs in flight: a SIGTERM or SIGINT to the sweep (a time limit, Ctrl-C) ends them
    too, so that none is left holding the accelerator; their checkpoints let the next sweep
    resume them. A run still alive `grace_s` seconds after its SIGTERM is killed: a time limit
    must end the sweep, whatever a run does with the signal."""

    def __init__(self, grace_s: float = 20.0):
        self.procs, self.lock, self.stopping = set(), threading.Lock(), False
        self.grace_s = grace_s

    def start(self, cmd, **kwargs):
        with self.lock:
            if self.stopping:
                raise RuntimeError("the sweep is stopping")
            proc = subprocess.Popen(cmd, **kwargs)
            self.procs.add(proc)
        return proc

    def done(self, proc):
        with self.lock:
            self.procs.discard(proc)

    def stop(self, signum, _frame):
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
            for proc in procs:
                proc.terminate()
        deadline = time.monotonic() + self.grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise SystemExit(f"stopped by signal {signum}; run the same command again to resume")


def parse_sweep_args(description: str, config_path, argv, runs: bool = True):
    """(args, overrides) of a sweep script: --toy, --config, --out, --jobs, --report and the
    --config.KEY=VALUE flags left over."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--toy", action="store_true", help="CPU size: the tiny random Llama")
    parser.add_argument("--config", default=str(config_path))
    parser.add_argument("--out", default=None,
                        help="sweep directory (default results/<config.name>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one accelerator)")
    if runs:        # only sweeps of `ultrametric run`s have runs to report on
        parser.add_argument("--report", action="store_true",
                            help="start no run: tabulate the runs finished so far and name the "
                            "others (a sweep cut short by a time limit)")
    args, rest = parser.parse_known_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args, rest


def sweep_setup(argv, description: str, config_path, runs: bool = True):
    """(args, config, out directory, base config path) of a sweep script's command line; runs:
    the script starts `ultrametric run`s (and so takes --report)."""
    args, overrides = parse_sweep_args(description, config_path, argv, runs)
    config = load_config(args.config, "toy" if args.toy else "", overrides)
    out = Path(args.out or ROOT / "results" / config.name)
    out.mkdir(parents=True, exist_ok=True)
    base = config.base_config if Path(config.base_config).is_absolute() else str(
        CONFIGS / config.base_config)
    return args, config, out, base


def collect_runs(runs: list[tuple[str, Path, list[str]]], *, base_config: str, steps: int,
                 jobs: int, report: bool) -> tuple[dict, list[str]]:
    """(results, unfinished): run_all's results and [], or with report the eval.json of the
    runs already finished at `steps` and the names of the others, none of them started."""
    if not report:
        return run_all(runs, base_config=base_config, steps=steps, jobs=jobs), []
    results = {}
    for name, workdir, _ in runs:
        done = finished(workdir, steps)
        if done is not None:
            results[name] = done
    unfinished = [name for name, _, _ in runs if name not in results]
    if not results:
        raise SystemExit(f"--report: none of the {len(runs)} runs has finished {steps} steps "
                         f"(an eval.json at step {steps}) under {runs[0][1].parent}")
    if unfinished:
        print(f"--report: not finished, left out: {', '.join(unfinished)}", flush=True)
    return results, unfinished


def run_all(runs: list[tuple[str, Path, list[str]]], *, base_config: str, steps: int,
            jobs: int) -> dict:
    """{name: eval.json} of `ultrametric run --config base_config --workdir W FLAGS...` for
    every (name, W, FLAGS), `jobs` at a time; each run's output goes to W/run.log. A run
    already finished at `steps` is not run again. Raises SystemExit naming the failed runs
    (after the others have finished)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if jobs > 1:
        # Concurrent runs share one accelerator: no process may preallocate most of it.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.3f}")

    def one(name, workdir, extra):
        done = finished(workdir, steps)
        if done is not None:
            print(f"[{name}] finished earlier: {workdir / 'eval.json'}", flush=True)
            return done
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ultrametric_jax", "run", "--config", base_config,
               "--workdir", str(workdir), f"--config.train.steps={steps}", *extra]
        (workdir / "command.txt").write_text(" ".join(cmd) + "\n")
        start = time.time()
        with open(workdir / "run.log", "a") as log:
            proc = children.start(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            print(f"[{name}] $ {' '.join(cmd)}", flush=True)
            try:
                rc = proc.wait()
            finally:
                children.done(proc)
        done = finished(workdir, steps)
        if rc != 0 or done is None:
            raise RuntimeError(f"[{name}] failed (exit {rc}); see {workdir / 'run.log'}")
        print(f"[{name}] done in {time.time() - start:.0f} s", flush=True)
        return done

    children = Children()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, children.stop)
    results, failed = {}, []
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = {pool.submit(one, *run): run[0] for run in runs}
            for future in concurrent.futures.as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except RuntimeError as e:
                    print(e, flush=True)
                    failed.append(futures[future])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed}")
    return {name: results[name] for name, _, _ in runs}


def corpora(result: dict) -> dict:
    """corpus name -> {"dense", "surgical", "window_only"?} of one eval.json, the training
    corpus's held-out split first (named "held out")."""
    out = {"held out": {"dense": result["dense"], "surgical": result["surgical"],
                        **({"window_only": result["window_only"]}
                           if "window_only" in result else {})}}
    out.update(result.get("by_corpus", {}))
    return out


# ----------------------------------------------------------------------------- figures

def plot_per_corpus(rows: list[dict], path: Path, draw, xlabel: str) -> None:
    """One panel per corpus of rows (dicts with "corpus"): draw(ax, that corpus's rows) adds
    the points and returns the dense perplexity, drawn as a dashed line. Saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["corpus"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, corpus in zip(axes[0], names):
        dense = draw(ax, [r for r in rows if r["corpus"] == corpus])   # returns the dense ppl
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.2f})")
        ax.set(xlabel=xlabel, ylabel="held-out perplexity", title=Path(corpus).name or corpus)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Topological ring attention: the (head, device-pair) KV transfers that routes make useless
when the sequence is split over N devices, and a ring that skips them.

  python experiments/ring_pruning.py                      # GPU host: every local device
  python experiments/ring_pruning.py --toy                # CPU: 8 host devices, small sizes
  python experiments/ring_pruning.py --run-dir RUN        # also a trained run's own routes
  python experiments/ring_pruning.py --config.run.seq_len=16384 --config.run.backward=false

(a) Analysis. Routes are digit strings per (head, token), cut at k = L - d_max into cluster
ids. With the sequence in N contiguous chunks, a (head, query chunk a, key chunk b < a)
transfer is prunable exactly when no route pair lies across it (same cluster, causal, outside
the sink and the window: those reach every device without the ring, see pallas_kernels/ring.py).
The block tree distance of a cell is L minus the longest digit prefix any of its route-eligible
pairs share; pruning every cell whose distance exceeds a threshold t loses nothing for t >= d_max (t = d_max
is the exact criterion, a larger t prunes less) and drops allowed pairs below it (reported as the share of all allowed pairs lost: the cost that
perplexity would pay). Shares are over the causal cells (b < a): the plain ring also sends the
N (N - 1) / 2 chunks above the diagonal, reported beside them.

(b) Run. pallas_kernels.ring.ring_attention over every local device (N = 8 with --toy, on host
CPU devices), for each of config.run.kinds: the plain ring, the causal plan and the exact route
plan, each checked against the masked dense reference and timed (median), beside the same
attention on one device (the ring code on a one-device mesh: one masked block of S x S).
The plan is the union over heads (what ring_attention can skip); the analysis's per-head
shares say what per-kv-head transfers would add.

Writes OUT/ring_pruning.json (toy.json with --toy), the routes (.npz) and a PNG; prints the
tables last.
"""
from __future__ import annotations

import os
import sys

if "--toy" in sys.argv[1:] and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import timed  # noqa: E402
from pallas_kernels import ring  # noqa: E402
from pallas_kernels.reference import dense_attention  # noqa: E402

CONFIG = ROOT / "configs" / "ring_pruning.py"


# ----------------------------------------------------------------------------- routes

def synthetic_digits(kind, heads, seq, arity, levels, scatter_share, rng):
    """int32 [H, S, L] digit strings (digit 0 the root)."""
    leaves = arity ** levels
    random_leaf = rng.integers(0, leaves, size=(heads, seq))
    # Leaves in position order, cut at a different place per head (contiguous_clusters' idea).
    shift = rng.integers(0, max(seq // arity ** (levels // 2), 1), size=(heads, 1))
    ordered = np.minimum((np.arange(seq) + shift) * leaves // seq, leaves - 1)
    if kind == "contiguous":
        leaf = ordered
    elif kind == "mixed":
        leaf = np.where(rng.random((heads, seq)) < scatter_share, random_leaf, ordered)
    elif kind == "scattered":
        leaf = random_leaf
    else:
        raise SystemExit(f"unknown route kind {kind!r} (contiguous, mixed, scattered)")
    return unpack(leaf, arity, levels)


def unpack(leaf, arity, levels):
    """Leaf ids [..., S] -> digits [..., S, L], digit 0 most significant."""
    powers = arity ** np.arange(levels - 1, -1, -1)
    return ((np.asarray(leaf)[..., None] // powers) % arity).astype(np.int32)


def cut_ids(digits, arity, cut):
    """The first `cut` digits packed in base arity: [..., S, L] -> int64 [..., S]."""
    ids = np.zeros(digits.shape[:-1], np.int64)
    for level in range(cut):
        ids = ids * arity + digits[..., level]
    return ids


def run_digits(run_dir, seq_len):
    """(int32 [layers, H, S, L] leaf digits of a trained run on its held-out text, surgery)."""
    from bench_model_routes import checkpoints_of
    from ultrametric_jax.run.pipeline import restore_run
    return restored_digits(restore_run(checkpoints_of(run_dir)), seq_len)


def restored_digits(restored, seq_len):
    """run_digits of a restored run: read from the same evaluation forward as the run's own
    routes (every layer as trained)."""
    from bench_model_routes import text_tokens
    from ultrametric_jax.surgery.inject import extract_routes
    tokens, _ = text_tokens(restored, None, seq_len)
    digits = extract_routes(restored.model, tokens[None], digits=True).digits
    return np.asarray(digits, np.int32)[:, 0], restored.surgery


# ----------------------------------------------------------------------------- analysis

def analyse(digits, *, arity, d_max, window, sink, n):
    """Prunable shares of digits [H, S, L] split in n chunks (see the module docstring)."""
    heads, seq, levels = digits.shape
    cut = levels - d_max
    counts = np.stack([
        ring.route_pair_counts(ids[None], ids[None], n, window=window, sink_tokens=sink)[0]
        for ids in (cut_ids(digits, arity, lvl) for lvl in range(levels + 1))])  # [L+1,H,N,N]
    cross = np.tri(n, k=-1, dtype=bool)
    # The longest shared prefix of a cell's route-eligible pairs; -1 when it has none.
    prefix = np.where(counts > 0, np.arange(levels + 1)[:, None, None, None], -1).max(axis=0)
    distance = levels - prefix                                         # L + 1: no pair at all
    allowed = allowed_pairs_total(cut_ids(digits, arity, cut), window, sink)
    route = counts[cut]

    def shares(pruned):
        cells = pruned[:, cross]                                       # [H, cells]
        return dict(head_share=float(cells.mean()),
                    device_pair_share=float(cells.all(axis=0).mean()),
                    dropped_pair_share=float(route[:, cross][cells].sum() / allowed))

    exact = shares(route == 0)
    assert exact["dropped_pair_share"] == 0.0
    return dict(n=n, cells=int(heads * cross.sum()), device_pairs=int(cross.sum()),
                exact=exact, per_head_exact=(route == 0)[:, cross].mean(axis=1).tolist(),
                thresholds=[dict(t=t, **shares(distance > t)) for t in range(levels + 1)])


def allowed_pairs_total(ids, window, sink):
    """All allowed pairs of cluster ids [H, S] (route pairs, window, sink)."""
    from ultrametric_jax.surgery.tree import pair_counts
    _, allowed, _ = pair_counts(jnp.asarray(ids, jnp.int32), window, sink)
    return float(np.sum(np.asarray(allowed, np.float64)))


def analysis(config, digits_by_kind):
    a = config.analysis
    out = {}
    for kind, (digits, params) in digits_by_kind.items():
        per_n = []
        for n in a.chunks:
            layers = digits if digits.ndim == 4 else digits[None]
            rows = [analyse(d, n=n, **params) for d in layers]
            per_n.append(rows[0] if len(rows) == 1 else layer_mean(rows))
        out[kind] = per_n
    return out


def layer_mean(rows):
    """One entry from per-layer entries: shares averaged over layers."""
    mean = lambda key, items: float(np.mean([x[key] for x in items]))  # noqa: E731
    keys = ("head_share", "device_pair_share", "dropped_pair_share")
    return dict(n=rows[0]["n"], cells=rows[0]["cells"], device_pairs=rows[0]["device_pairs"],
                layers=len(rows), exact={k: mean(k, [r["exact"] for r in rows]) for k in keys},
                per_layer_exact=[r["exact"]["head_share"] for r in rows],
                thresholds=[dict(t=t["t"], **{k: mean(k, [r["thresholds"][i] for r in rows])
                                              for k in keys})
                            for i, t in enumerate(rows[0]["thresholds"])])


# ----------------------------------------------------------------------------- run

def ring_run(config, kind, rng):
    """The ring on every local device for `kind` routes: checks, times, chunk transfers."""
    r = config.run
    devices = jax.devices()
    n = len(devices)
    digits = synthetic_digits(kind, r.q_heads, r.seq_len, 2, r.levels,
                              config.analysis.scatter_share, rng)
    ids = jnp.asarray(cut_ids(digits, 2, r.levels - r.d_max)[None], jnp.int32)   # [1, H, S]
    ids = jnp.broadcast_to(ids, (r.batch,) + ids.shape[1:])
    dtype = jnp.dtype(r.dtype)
    keys = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    q = jax.random.normal(keys[0], (r.batch, r.seq_len, r.q_heads, r.head_dim), dtype)
    k, v = (jax.random.normal(kk, (r.batch, r.seq_len, r.kv_heads, r.head_dim), dtype)
            for kk in keys[1:3])
    ct = jax.random.normal(keys[3], q.shape, dtype)
    opts = dict(window=r.window, sink_tokens=r.sink)
    exact = ring.pruning_plan(ids, ids, n, **opts)
    variants = {"one_device": (Mesh(np.array(devices[:1]), ("seq",)), None),
                "plain_ring": (Mesh(np.array(devices), ("seq",)), None),
                "causal_ring": (Mesh(np.array(devices), ("seq",)), ring.causal_plan(n)),
                "pruned_ring": (Mesh(np.array(devices), ("seq",)), exact)}
    ref = None
    if r.check:
        ref = jax.jit(lambda q, k, v: dense_attention(q, k, v, ids, ids, q_offset=0,
                                                      scale=None, return_lse=False, **opts))(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    out = dict(devices=n, device_kind=devices[0].device_kind, kind=kind,
               shape=dict(B=r.batch, S=r.seq_len, Hq=r.q_heads, Hkv=r.kv_heads, D=r.head_dim,
                          dtype=dtype.name),
               plan=exact.astype(int).tolist(), transfers=transfers(n, exact), variants={})
    for name, (mesh, plan) in variants.items():
        fwd = jax.jit(lambda q, k, v, mesh=mesh, plan=plan: ring.ring_attention(
            q, k, v, ids, ids, mesh=mesh, plan=plan, **opts))
        entry = dict(fwd_ms=1e3 * timed(fwd, q, k, v, reps=r.reps, min_batch_s=0.01))
        if r.backward:
            fb = jax.jit(lambda q, k, v, ct, fwd=fwd: jax.vjp(fwd, q, k, v)[1](ct))
            entry["fwd_bwd_ms"] = 1e3 * timed(fb, q, k, v, ct, reps=r.reps, min_batch_s=0.01)
        if ref is not None:
            got = np.asarray(fwd(q, k, v), np.float64)
            entry["max_rel_err"] = float(np.abs(got - np.asarray(ref)).max()
                                         / np.abs(np.asarray(ref)).max())
        out["variants"][name] = entry
    return out


def transfers(n, plan):
    """Chunk transfers (k, v and k cluster ids of one chunk each) of the three rings."""
    kept = int(plan[np.tri(n, k=-1, dtype=bool)].sum())
    steps = sum(any(plan[b + t, b] for b in range(n - t)) for t in range(1, n))
    return dict(plain_ring=n * (n - 1), causal_ring=n * (n - 1) // 2, pruned_ring=kept,
                plain_steps=n - 1, pruned_steps=int(steps))


# ----------------------------------------------------------------------------- figure, tables

def plot(result, path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = list(result["analysis"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in kinds:
        rows = result["analysis"][kind]
        ns = [row["n"] for row in rows]
        axes[0].plot(ns, [100 * row["exact"]["head_share"] for row in rows], "o-",
                     label=f"{kind}: per head")
        axes[0].plot(ns, [100 * row["exact"]["device_pair_share"] for row in rows], "s--",
                     label=f"{kind}: device pair")
        last = rows[-1]
        axes[1].plot([100 * t["dropped_pair_share"] for t in last["thresholds"]],
                     [100 * t["head_share"] for t in last["thresholds"]], "o-",
                     label=f"{kind} (N={last['n']})")
    axes[0].set(xlabel="devices N", ylabel="prunable causal transfers (%)", xscale="log",
                title="exact pruning")
    chunks = result["config"]["analysis"]["chunks"]
    axes[0].set_xticks(chunks, labels=[str(x) for x in chunks])
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set(xlabel="allowed pairs dropped (%)", ylabel="prunable (head, pair) cells (%)",
                title="threshold on block tree distance")
    for run in result.get("runs", [])[:1]:
        names = list(run["variants"])
        axes[2].bar(names, [run["variants"][x]["fwd_ms"] for x in names], label="forward")
        if "fwd_bwd_ms" in run["variants"][names[0]]:
            axes[2].bar(names, [run["variants"][x]["fwd_bwd_ms"] for x in names], alpha=0.4,
                        label="forward + backward")
        axes[2].set(ylabel="ms", title=f"{run['devices']} x {run['device_kind']}, "
                                         f"S={run['shape']['S']}, {run['kind']} routes")
        axes[2].tick_params(axis="x", labelsize=8)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_tables(result):
    print("\nprunable causal transfers (exact criterion), per (head, pair) / per device pair")
    print(f"{'routes':>12} " + " ".join(f"{'N=' + str(row['n']):>16}"
                                         for row in next(iter(result['analysis'].values()))))
    for kind, rows in result["analysis"].items():
        print(f"{kind:>12} " + " ".join(
            f"{100 * r['exact']['head_share']:7.1f}%/{100 * r['exact']['device_pair_share']:5.1f}%"
            .rjust(16) for r in rows))
    print("\nthreshold t on block tree distance at the largest N: prunable cells / allowed "
          "pairs dropped")
    for kind, rows in result["analysis"].items():
        cells = ", ".join(f"t={t['t']}: {100 * t['head_share']:.0f}%/"
                          f"{100 * t['dropped_pair_share']:.1f}%" for t in rows[-1]["thresholds"])
        print(f"{kind:>12}  {cells}")
    for run in result.get("runs", []):
        s = run["shape"]
        print(f"\nring on {run['devices']} x {run['device_kind']} ({run['kind']} routes, "
              f"B={s['B']} S={s['S']} Hq={s['Hq']} Hkv={s['Hkv']} D={s['D']} {s['dtype']}); "
              f"chunk transfers: {run['transfers']}")
        print(f"{'variant':>12} {'fwd ms':>10} {'fwd+bwd ms':>11} {'max rel err':>12}")
        for name, e in run["variants"].items():
            print(f"{name:>12} {e['fwd_ms']:10.3f} {e.get('fwd_bwd_ms', float('nan')):11.3f} "
                  f"{e.get('max_rel_err', float('nan')):12.2e}")


# ----------------------------------------------------------------------------- main

def load_config(path, toy, overrides):
    config = runpy.run_path(str(path))["get_config"]("toy" if toy else "")
    for item in overrides:
        key, _, text = item[len("--config."):].partition("=")
        current = config
        for part in key.split("."):
            if part not in current:
                raise SystemExit(f"unknown config key {key!r}")
            current = current[part]
        if isinstance(current, tuple):
            value = tuple(type(current[0])(x) for x in text.split(","))
        elif isinstance(current, bool):
            if text.lower() not in ("true", "false"):
                raise SystemExit(f"--config.{key}={text!r}: expected true or false")
            value = text.lower() == "true"
        else:
            try:
                value = type(current)(text)
            except ValueError:
                raise SystemExit(f"--config.{key}={text!r}: expected a "
                                 f"{type(current).__name__}") from None
        config.update_from_flattened_dict({key: value})
    return config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="small sizes, 8 CPU devices")
    parser.add_argument("--run-dir", default="", help="a surgery run's --workdir: its routes too")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", default=str(ROOT / "results" / "ring_pruning"))
    parser.add_argument("--skip-run", action="store_true", help="the analysis only")
    args, rest = parser.parse_known_args(argv)
    bad = [x for x in rest if not x.startswith("--config.") or "=" not in x]
    if bad:
        parser.error(f"unrecognised arguments {bad} (overrides are --config.KEY=VALUE)")
    return args, rest


def main(argv=None):
    args, overrides = parse_args(argv)
    config = load_config(args.config, args.toy, overrides)
    a = config.analysis
    rng = np.random.default_rng(config.seed)
    params = dict(arity=a.arity, d_max=a.d_max, window=a.window, sink=a.sink)
    digits = {kind: (synthetic_digits(kind, a.heads, a.seq_len, a.arity, a.levels,
                                      a.scatter_share, rng), params) for kind in a.kinds}
    if args.run_dir:
        run_d, surgery = run_digits(args.run_dir, a.run_seq_len)
        digits["trained run"] = (run_d, dict(arity=surgery.arity, d_max=surgery.max_distance,
                                             window=surgery.window, sink=surgery.sink_tokens))
    start = time.perf_counter()
    result = dict(config=config.to_dict(), run_dir=os.path.abspath(args.run_dir) or None,
                  analysis=analysis(config, digits))
    result["analysis_s"] = time.perf_counter() - start
    if not args.skip_run:
        result["runs"] = [ring_run(config, kind, rng) for kind in config.run.kinds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "toy" if args.toy else "ring_pruning"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=list))
    np.savez_compressed(out / f"{stem}.routes.npz", **{k: d for k, (d, _) in digits.items()})
    plot(result, out / f"{stem}.png")
    print_tables(result)
    print(f"\nresults: {out / (stem + '.json')}, {out / (stem + '.png')}")
    return result


if __name__ == "__main__":
    main()

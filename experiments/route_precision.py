"""How far a lower compute precision moves the surgical model: its logits and its routes in
bfloat16, through the masked dense path and through the kernels, against the float32 masked
dense path of the same checkpoint.

  python3 experiments/route_precision.py RUN_DIR [--seq-len 256] [--dtype bfloat16]
  python3 experiments/route_precision.py --toy            # CPU: a tiny random run built here

Each layer routes from its own hidden states, so a rounding difference upstream can move a
token to another cluster, and with it a whole row of the mask: the paths are then no longer
comparable pair for pair. This separates that from a kernel error. For each path (float32
dense = the reference; DTYPE dense; DTYPE kernels) on the first S held-out tokens: the largest
logit difference over the reference's largest |logit|, the KL divergence from the reference's
next-token distribution (nats per token), and the share of cluster ids, per layer and overall,
that differ from the reference's. Float32 kernels come too: they must equal the reference (no
route moved), which is what the tests of the kernels assert. Writes JSON (and the cluster ids,
with --save-logits the logits too, .npz) to --out and prints a table. Without a GPU the
kernels run in Pallas interpret mode.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model_routes import (build_toy_run, checkpoints_of, perturb_routers,  # noqa: E402
                                text_tokens)
from ultrametric_jax.run.pipeline import restore_run  # noqa: E402
from ultrametric_jax.surgery.inject import forward_with_aux, set_attention_impl  # noqa: E402

REFERENCE = ("float32", "dense")


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare(reference, other):
    """{logits_rel_diff, kl_nats, ids_differ, ids_differ_per_layer} of (logits [S, V] float64,
    clusters [layers, H, S]) against the reference's."""
    (ref_logits, ref_ids), (logits, ids) = reference, other
    ref_lp, lp = log_softmax(ref_logits), log_softmax(logits)
    return dict(
        logits_rel_diff=float(np.abs(logits - ref_logits).max()
                              / max(1.0, np.abs(ref_logits).max())),
        kl_nats=float((np.exp(ref_lp) * (ref_lp - lp)).sum(-1).mean()),
        ids_differ=float((ids != ref_ids).mean()),
        ids_differ_per_layer=[float(x) for x in (ids != ref_ids).mean(axis=(1, 2))])


def run(args, run_dir):
    on_gpu = jax.default_backend() == "gpu"
    # backend="auto" off a GPU is XLA's masked attention, the reference itself: interpret the
    # Pallas kernels instead.
    backend = args.backend or ("auto" if on_gpu else "gpu")
    if backend == "auto" and not on_gpu:
        raise SystemExit("--backend auto without a GPU runs XLA's masked attention, the "
                         "reference itself: give --backend gpu (Pallas, interpreted)")
    kernel = dict(layout="sorted", backend=backend, interpret=not on_gpu,
                  block_q=args.block, block_k=args.block)
    paths, arrays, meta = {}, {}, {}
    for dtype in ("float32", args.dtype):
        restored = restore_run(checkpoints_of(run_dir), dtype=dtype)
        if args.toy:
            perturb_routers(restored.model)      # the same seed: the same routers each time
        tokens, source = text_tokens(restored, args.text, args.seq_len)
        meta = dict(step=restored.step, text=source,
                    layers=restored.model.config.num_hidden_layers)
        for impl in ("dense", "kernel"):
            set_attention_impl(restored.model, impl, **(kernel if impl == "kernel" else {}))
            logits, aux = forward_with_aux(restored.model, jnp.asarray(tokens[None]))
            paths[(dtype, impl)] = (np.asarray(logits[0], np.float64),
                                    np.asarray(aux["clusters"][:, 0]))
            if args.toy or args.save_logits:    # S x vocabulary each: large at full size
                arrays[f"{dtype}_{impl}_logits"] = paths[(dtype, impl)][0]
            arrays[f"{dtype}_{impl}_clusters"] = paths[(dtype, impl)][1]
            print(f"{dtype} {impl}: done", flush=True)
    result = dict(run_dir=str(run_dir), seq_len=args.seq_len, dtype=args.dtype, block=args.block,
                  backend=backend, device=jax.devices()[0].device_kind, jax=jax.__version__,
                  **meta,
                  reference="float32 masked dense", paths={})
    for key, value in paths.items():
        if key != REFERENCE:
            result["paths"][" ".join(key)] = compare(paths[REFERENCE], value)
    result["paths"][f"{args.dtype} kernel vs {args.dtype} dense"] = compare(
        paths[(args.dtype, "dense")], paths[(args.dtype, "kernel")])
    out = Path(args.out)
    out = out if out.suffix == ".json" else out / ("toy.json" if args.toy else "precision.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    np.savez_compressed(out.with_suffix(".npz"), **arrays)
    print(f"wrote {out}, {out.with_suffix('.npz')}\n")
    print(f"{result['layers']} layers, step {result['step']}, S={args.seq_len}, text: "
          f"{result['text']}; against the float32 masked dense path:\n")
    print("| path | max logit diff / max logit | KL, nats/token | cluster ids moved | "
          "worst layer |")
    print("|---|---|---|---|---|")
    for name, r in result["paths"].items():
        worst = int(np.argmax(r["ids_differ_per_layer"]))
        print(f"| {name} | {r['logits_rel_diff']:.2e} | {r['kl_nats']:.2e} | "
              f"{r['ids_differ']:.2%} | {worst} ({r['ids_differ_per_layer'][worst]:.2%}) |")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a surgery run's --workdir")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens (256; --toy 32)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                        help="the lower compute precision compared")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: the run's "
                        "held-out documents)")
    parser.add_argument("--backend", default=None, choices=("auto", "gpu", "triton", "mosaic"),
                        help="the kernels' backend (default auto on a GPU; elsewhere the Pallas "
                        "kernels interpreted)")
    parser.add_argument("--block", type=int, default=None, help="kernel blocks (128; --toy 16)")
    parser.add_argument("--out", default="results/route_precision/")
    parser.add_argument("--save-logits", action="store_true",
                        help="also save every path's logits in the .npz (--toy: always)")
    parser.add_argument("--toy", action="store_true",
                        help="a tiny random run built here, Pallas interpret mode (CPU)")
    args = parser.parse_args(argv)
    if not args.toy and not args.run_dir:
        parser.error("give RUN_DIR (a surgery run's --workdir) or --toy")
    args.seq_len = args.seq_len or (32 if args.toy else 256)
    args.block = args.block or (16 if args.toy else 128)
    if args.seq_len < 2:
        parser.error(f"--seq-len must be >= 2, got {args.seq_len}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.toy and not args.run_dir:
        with tempfile.TemporaryDirectory() as root:
            return run(args, build_toy_run(root))
    return run(args, args.run_dir)


if __name__ == "__main__":
    main()

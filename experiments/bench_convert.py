"""Convert a (large) HF checkpoint to the native format; report wall time and peak RSS.

    python3 experiments/make_synthetic_llama.py --out /tmp/synthetic_llama3_8b
    python3 experiments/bench_convert.py /tmp/synthetic_llama3_8b /tmp/synthetic_llama3_8b_native

Peak RSS is resource.getrusage(RUSAGE_SELF).ru_maxrss; the run fails (exit 1) when it exceeds
--max-rss-gib (default 20), the bound for a model of ~15 GiB streamed tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-rss-gib", type=float, default=20.0)
    parser.add_argument("--verify", action="store_true",
                        help="reload the output and compare sample tensors with the source")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx
    from ultrametric_jax.checkpoint import load_pretrained
    from ultrametric_jax.checkpoint.native import save_native

    start = time.time()
    model = load_pretrained(args.src, dtype=args.dtype, progress=True)
    loaded = time.time()
    rss_after_load = peak_rss_gib()
    save_native(model, args.dst)
    saved = time.time()
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    report = {"src": args.src, "dst": args.dst, "dtype": args.dtype, "params": params,
              "src_bytes": dir_bytes(args.src), "dst_bytes": dir_bytes(args.dst),
              "load_s": round(loaded - start, 1), "save_s": round(saved - loaded, 1),
              "wall_s": round(saved - start, 1), "peak_rss_gib_after_load": round(rss_after_load, 2),
              "peak_rss_gib": round(peak_rss_gib(), 2), "max_rss_gib": args.max_rss_gib}
    if args.verify:
        from ultrametric_jax.checkpoint.hf import SafetensorsReader
        del model
        again = load_pretrained(args.dst, dtype=args.dtype)
        reader = SafetensorsReader(args.src)
        layer = again.model.layers[len(again.model.layers) - 1]
        checks = {"model.embed_tokens.weight": again.model.embed_tokens.embedding.get_value(),
                  f"model.layers.{len(again.model.layers) - 1}.mlp.down_proj.weight":
                      layer.mlp.down_proj.kernel.get_value().T}
        report["verified"] = all(np.array_equal(np.asarray(v), reader.get(k))
                                 for k, v in checks.items())
        report["peak_rss_gib_with_verify"] = round(peak_rss_gib(), 2)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    ok = report["peak_rss_gib"] <= args.max_rss_gib and report.get("verified", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

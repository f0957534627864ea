"""Convert a (large) HF checkpoint to the native format; report wall time and peak RSS.

The conversion is `ultrametric convert SRC DST --to native`'s: it streams one parameter group
(a decoder layer, the embedding, ...) at a time, never building the whole model.

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


def verify(src: str, dst: str, dtype: str) -> bool:
    """Every tensor of dst equals the source's (transposed, cast), one group in memory at a time."""
    import numpy as np
    from ultrametric_jax.io.checkpoints import resolve_dtype
    from ultrametric_jax.io.hf import (SafetensorsReader, abstract_model, hf_name,
                                               param_leaves, prepare_leaf)
    from ultrametric_jax.io.native import iter_native_leaves, native_config
    leaves = param_leaves(abstract_model(native_config(dst), resolve_dtype(dtype)))
    wants = dict(leaves)
    reader = SafetensorsReader(src)
    for path, value in iter_native_leaves(dst, leaves):
        name = hf_name(path)[0]
        expected = prepare_leaf(path, wants[path].get_value(), reader.get(name), src)
        if not np.array_equal(np.asarray(value), np.asarray(expected)):
            print(f"mismatch: {name}", file=sys.stderr)
            return False
    return len(leaves) == len(reader.names())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-rss-gib", type=float, default=20.0)
    parser.add_argument("--verify", action="store_true",
                        help="reload the output and compare every tensor with the source")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    import numpy as np
    from ultrametric_jax.io.checkpoints import convert_checkpoint
    from ultrametric_jax.io.hf import SafetensorsReader

    start = time.time()
    convert_checkpoint(args.src, args.dst, to="native", dtype=args.dtype, progress=True)
    wall = time.time() - start
    reader = SafetensorsReader(args.src)
    params = sum(int(np.prod(reader.shape(n))) for n in reader.names())
    report = {"src": args.src, "dst": args.dst, "dtype": args.dtype, "params": params,
              "src_bytes": dir_bytes(args.src), "dst_bytes": dir_bytes(args.dst),
              "wall_s": round(wall, 1), "peak_rss_gib": round(peak_rss_gib(), 2),
              "max_rss_gib": args.max_rss_gib}
    if args.verify:
        report["verified"] = verify(args.src, args.dst, args.dtype)
        report["peak_rss_gib_with_verify"] = round(peak_rss_gib(), 2)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    ok = report["peak_rss_gib"] <= args.max_rss_gib and report.get("verified", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

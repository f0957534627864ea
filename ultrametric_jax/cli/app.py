"""The `ultrametric` command: `ultrametric SUBCOMMAND [ARGS...]`.

Subcommand modules are imported only when run, so `ultrametric --help` stays instant; each
module exposes `main(argv) -> int`.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "convert": "ultrametric_jax.cli.convert",
    "download": "ultrametric_jax.cli.download",
    "generate": "ultrametric_jax.cli.generate",
    "run": "ultrametric_jax.cli.run",
    "train": "ultrametric_jax.cli.train",
    "eval": "ultrametric_jax.cli.eval",
    "export": "ultrametric_jax.cli.export",
}

# One line each for `ultrametric --help` (kept here so that help imports nothing).
DESCRIPTIONS = {
    "convert": "convert a checkpoint (HF dir, .gguf, native) to the native or HF format",
    "download": "fetch a known model (smollm2) into the local cache",
    "generate": "generate text from a prompt with a model (path or 'smollm2')",
    "run": "run the surgery pipeline of an experiment config",
    "train": "train the injected topology (routers) with the base model frozen",
    "eval": "evaluate perplexity and attention density of a model or surgery checkpoint",
    "export": "export a surgical model (e.g. back to PyTorch / transformers)",
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: ultrametric SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {DESCRIPTIONS.get(name, '')}" for name in SUBCOMMANDS]
    lines += ["", "Run `ultrametric SUBCOMMAND --help` for the options of one subcommand."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from ultrametric_jax import __version__
        print(f"ultrametric_jax {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ultrametric: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name and SUBCOMMANDS[name].startswith(e.name):
            print(f"ultrametric: subcommand {name!r} is not available ({e})", file=sys.stderr)
            return 1
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

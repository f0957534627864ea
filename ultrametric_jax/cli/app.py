"""The `ultrametric` command: `ultrametric SUBCOMMAND [ARGS...] [--debug]`.

Subcommand modules are imported only when run, so `ultrametric --help` stays instant; each
module exposes `main(argv) -> int` and raises what the user can fix as a UserError. The
dispatcher prints such an error, or a file-system error (a full disk, a missing or read-only
file), as one line and exits with 2; anything else is a bug and keeps its traceback. With
--debug every error keeps its traceback.
"""
from __future__ import annotations

import errno
import importlib
import sys

from ultrametric_jax import __version__
from ultrametric_jax.errors import UserError
from ultrametric_jax.run.host_memory import fix_mmap_threshold, limit_malloc_arenas

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

DEBUG_FLAG = "--debug"
# File-system errors that the user's environment causes and can fix.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}
USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                  FileExistsError)


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: ultrametric SUBCOMMAND [ARGS...] [--debug]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {DESCRIPTIONS.get(name, '')}" for name in SUBCOMMANDS]
    lines += ["", "Run `ultrametric SUBCOMMAND --help` for the options of one subcommand.",
              f"{DEBUG_FLAG} shows the traceback of an error instead of its one-line message."]
    return "\n".join(lines)


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def is_user_os_error(e: OSError) -> bool:
    return isinstance(e, USER_OS_ERRORS) or e.errno in USER_ERRNOS


def describe_os_error(e: OSError) -> str:
    """'No space left on device: PATH' for an errno error, its message otherwise."""
    if e.errno is not None and e.strerror:
        where = ": ".join(repr(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{e.strerror}: {where}" if where else e.strerror
    return str(e)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"ultrametric_jax {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    limit_malloc_arenas()          # before jax starts its threads (see run/host_memory.py)
    fix_mmap_threshold()
    if name not in SUBCOMMANDS:
        print(f"ultrametric: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    debug = DEBUG_FLAG in rest
    rest = [a for a in rest if a != DEBUG_FLAG]
    try:
        module = importlib.import_module(SUBCOMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name and SUBCOMMANDS[name].startswith(e.name):
            print(f"ultrametric: subcommand {name!r} is not available ({e})", file=sys.stderr)
            return 1
        raise
    try:
        return int(module.main(rest) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"ultrametric {name}: error: {one_line(e)}", file=sys.stderr)
    except OSError as e:
        if debug or not is_user_os_error(e):
            raise
        print(f"ultrametric {name}: error: {one_line(describe_os_error(e))}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

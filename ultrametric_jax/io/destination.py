"""Output directories that cannot destroy what the user had.

`check_destination` refuses a destination that is the source or inside it, a non-empty one
unless overwriting, and an overwrite that would delete the source. `staged_directory` hands
out a temporary directory beside the destination and renames it into place only once the
writer has finished, so a failed write leaves nothing half-written and an overwrite leaves
no file of the old contents behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterable, Iterator

from ultrametric_jax.errors import ConfigError


def _inside(path: str, root: str) -> bool:
    """Whether real path `path` is `root` or lies below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_destination(dst: str, *, sources: Iterable[str] = (), overwrite: bool = False) -> str:
    """The destination's absolute path, once it is safe to write; a ConfigError otherwise."""
    real_dst = os.path.realpath(dst)
    for src in sources:
        real_src = os.path.realpath(src)
        if _inside(real_dst, real_src):
            raise ConfigError(f"destination {dst} is the source {src} or lies inside it; "
                              "choose another directory")
    if not os.path.lexists(dst):
        return os.path.abspath(dst)
    if not os.path.isdir(dst) or os.path.islink(dst):
        raise ConfigError(f"destination {dst} exists and is not a directory")
    if not os.listdir(dst):
        return os.path.abspath(dst)
    if not overwrite:
        raise ConfigError(f"destination {dst} is not empty; choose a new directory or pass "
                          "--overwrite to replace its contents")
    for src in sources:
        if _inside(os.path.realpath(src), real_dst):
            raise ConfigError(f"the source {src} lies inside the destination {dst}, which "
                              "--overwrite would delete; choose another destination")
    return os.path.abspath(dst)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_directory(dst: str) -> Iterator[str]:
    """Yield an empty directory beside `dst`; when the block succeeds it becomes `dst`
    (replacing what was there), when it fails it is removed and `dst` is left as it was."""
    dst = os.path.abspath(dst)
    parent, name = os.path.split(dst)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise ConfigError(f"cannot write to destination {dst}: {parent} is not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise ConfigError(f"cannot write to destination {dst}: {e.strerror or e}") from e
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> the user's usual permissions
        if not os.path.lexists(dst):
            os.rename(tmp, dst)
            return
        old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
        os.rename(dst, os.path.join(old, name))
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(os.path.join(old, name), dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Checkpoints of a surgery run: Orbax, keep-last-N, atomic, resumable, corruption-proof.

A checkpoint holds what changes during a run — router parameters, optimiser state, RNG state —
as one flat dict of arrays, plus a JSON record: step, data-iterator state, the identity of the
frozen base model (paths and sha256 of its files, never a copy of the weights), the tree
structure and a sha256 of every array's bytes. Orbax writes each step to a temporary directory
and renames it when complete, so a killed run leaves no half-written step under its name.

Restoring walks the steps newest first. A step whose files are missing or do not decode, or
whose arrays do not match their recorded checksum, is moved aside to `<directory>.corrupt/`
with a warning and the previous step is tried; a corrupt checkpoint is never returned. Any other
error (a failing disk or network file system, say) is raised and moves nothing. Restored arrays
are placed as the template's are (same devices and sharding).

`RunCheckpointReader` reads given steps of a run directory without ever creating, deleting,
moving or pruning anything in it, so it is safe on the directory of a run still writing.

Each step also records the surgery and model configuration that shaped its state
(`ultrametric_jax.run.provenance` compares them with the current ones).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import time
import warnings
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.run.checkpoint_probe import probe_ocdbt_item
from ultrametric_jax.run.provenance import CheckpointMismatchError

FORMAT_VERSION = 1
# A run directory keeps its checkpoints here.
CHECKPOINT_SUBDIR = "checkpoints"


class CorruptCheckpointError(ValueError):
    """A checkpoint step cannot be read, or its arrays do not match their recorded checksum.

    `step` is the step; `cause` the exception that made it unreadable (None for a checksum
    mismatch); `reason` a one-line description without the step.
    """

    def __init__(self, message: str, *, step: int, reason: str,
                 cause: Optional[BaseException] = None):
        super().__init__(message)
        self.step, self.reason, self.cause = step, reason, cause


# ----------------------------------------------------------------------------- array trees

def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(x) -> np.ndarray:
    """The whole array on the host; PRNG keys as key data. An array spread over several
    processes is gathered to every one of them first (a run's router state is small), so every
    process checksums, and hands Orbax, the same arrays."""
    if _is_key(x):
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def checksum(arrays: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a flat dict of arrays."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def flatten_tree(tree: Any) -> tuple[dict, str]:
    """(flat {"00000": array, ...}, structure string) of a pytree; PRNG keys as raw key data."""
    leaves, treedef = jax.tree.flatten(tree)
    return {f"{i:05d}": _to_storable(x) for i, x in enumerate(leaves)}, str(treedef)


def unflatten_like(template: Any, flat: dict) -> Any:
    """Rebuild `template`'s structure from flat host arrays: each leaf takes its template leaf's
    dtype (PRNG keys re-wrapped in their implementation) and, for a jax.Array, its sharding."""
    leaves, treedef = jax.tree.flatten(template)
    out = []
    for i, ref in enumerate(leaves):
        value = flat[f"{i:05d}"]
        if _is_key(ref):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref))
        else:
            value = np.asarray(value, dtype=ref.dtype)
        out.append(jax.device_put(value, ref.sharding) if isinstance(ref, jax.Array)
                   else jax.numpy.asarray(value))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- manager

@dataclasses.dataclass
class Restored:
    step: int
    state: Any          # the template's structure, filled with the saved arrays
    meta: dict          # data_state, base_model, extra fields given to save()


# What reading a step whose files are missing or damaged raises: a file or item that is not
# there, or bytes that do not decode (JSON, text, array chunks). Other errors, e.g. an OSError
# of a failing disk or network file system, say nothing about the step and are not caught.
DAMAGE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, LookupError,
                 ValueError, EOFError)


def _unreadable(step: int, directory: str, e: Exception) -> CorruptCheckpointError:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return CorruptCheckpointError(f"checkpoint step {step} in {directory} is unreadable "
                                  f"({reason})", step=step, reason=reason, cause=e)


class _StepAccess:
    """Reading of given steps through `self._manager`, which subclasses open."""

    directory: str
    _manager: ocp.CheckpointManager

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int) -> dict:
        """The JSON record of `step`; CorruptCheckpointError if it is missing or damaged."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except DAMAGE_ERRORS as e:
            raise _unreadable(step, self.directory, e) from e

    def restore(self, step: int, template: Any,
                check_meta: Optional[Callable[[dict, str], None]] = None) -> Restored:
        """Step `step` in `template`'s structure, its arrays verified against their checksum.

        check_meta(meta, where), if given, sees the step's record before any array is read
        and may refuse it by raising.
        CheckpointMismatchError: the step holds another state layout than `template`'s.
        CorruptCheckpointError: the step's files are missing or damaged, or its arrays fail
        their checksum.
        """
        meta = self.read_meta(step)
        if check_meta is not None:
            check_meta(meta, f"checkpoint step {step} in {self.directory}")
        flat_template, structure = flatten_tree(template)
        if meta.get("structure") != structure:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds a different state layout "
                "(another surgery or optimiser configuration); use a fresh --workdir")
        try:
            # Damage found here, synchronously, leaves no Orbax read in flight (no noise).
            probe_ocdbt_item(os.path.join(self.directory, str(step), "state"))
            flat = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(flat_template)))["state"]
            flat = {k: np.asarray(v) for k, v in flat.items()}
        except DAMAGE_ERRORS as e:
            raise _unreadable(step, self.directory, e) from e
        if checksum(flat) != meta.get("checksum"):
            reason = "array contents do not match the recorded checksum"
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt: its arrays do not "
                "match their recorded checksum", step=step, reason=reason)
        return Restored(step=step, state=unflatten_like(template, flat), meta=meta)

    def restore_latest(self, template: Any,
                       check_meta: Optional[Callable[[dict, str], None]] = None
                       ) -> Optional[Restored]:
        """The newest step that loads, or None if none does; each corrupt step on the way is
        passed to `_skip`. Errors other than a corrupt step (CheckpointMismatchError, what
        check_meta raises, an I/O error) are raised."""
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, template, check_meta)
            except CorruptCheckpointError as e:
                self._skip(step, e.reason)
        return None

    def _skip(self, step: int, why: str) -> None:
        """What restore_latest does with a corrupt step; each subclass says."""
        raise NotImplementedError

    def close(self) -> None:
        self._manager.close()


class RunCheckpointReader(_StepAccess):
    """Read-only access to the steps of a run directory.

    Never creates, deletes, moves or prunes anything: no root directory is created, temporary
    directories of an unfinished save are left alone, and nothing is quarantined, so it
    is safe on the directory of a run that is still writing.
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        # Every option that could write is off explicitly; the read-only flag is a second guard.
        options = ocp.CheckpointManagerOptions(
            read_only=True, create=False, cleanup_tmp_directories=False, max_to_keep=None,
            save_interval_steps=0, enable_async_checkpointing=False)
        # Orbax logs a warning that the manager is read-only; nothing to act on.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logger.setLevel(level)

    def _skip(self, step: int, why: str) -> None:
        """Warns and leaves the step where it is."""
        warnings.warn(f"skipping corrupt or partial checkpoint step {step} in {self.directory} "
                      f"({why}); left in place", RuntimeWarning, stacklevel=3)


def _is_disk_full(error: Exception) -> bool:
    """Whether an Orbax / TensorStore write error is the file system's ENOSPC (TensorStore
    reports it as a ValueError carrying the OS error code)."""
    text = str(error)
    return f"os_error_code='{errno.ENOSPC}'" in text or os.strerror(errno.ENOSPC) in text


class RunCheckpointer(_StepAccess):
    """Orbax CheckpointManager of one run directory, keeping the last `keep` steps."""

    def __init__(self, directory: str, *, keep: int):
        if keep < 1:
            raise ConfigError(f"invalid checkpoint.keep={keep}: must be >= 1")
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ConfigError(f"checkpoint directory {directory!r} exists and is not a directory")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, *, data_state: dict, base_model: dict,
             **extra) -> None:
        """Write step `step` synchronously (temp dir + rename) and prune to the last `keep`."""
        flat, structure = flatten_tree(state)
        meta = dict(extra, version=FORMAT_VERSION, step=int(step), data_state=data_state,
                    base_model=base_model, structure=structure, checksum=checksum(flat))
        # Orbax logs a failed write with its traceback before raising it; it is raised here.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.CRITICAL)
        try:
            self._manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=True)
            self._manager.wait_until_finished()
        except ValueError as e:
            if not _is_disk_full(e):
                raise
            # The unfinished step's temporary directory only holds space: free it.
            for name in os.listdir(self.directory):
                if name.startswith(f"{int(step)}.orbax-checkpoint-tmp"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            raise OSError(errno.ENOSPC, "No space left on device while writing checkpoint "
                          f"step {step}; the earlier checkpoints are intact",
                          self.directory) from None
        finally:
            absl_logger.setLevel(level)

    def _skip(self, step: int, why: str) -> None:
        """Moves the corrupt step aside, so that the run saves that step afresh."""
        src = os.path.join(self.directory, str(step))
        dst_root = self.directory + ".corrupt"
        os.makedirs(dst_root, exist_ok=True)
        dst = os.path.join(dst_root, f"{step}-{time.time_ns()}")
        warnings.warn(f"skipping corrupt or partial checkpoint step {step} in {self.directory} "
                      f"({why}); moved it to {dst}", RuntimeWarning, stacklevel=3)
        if os.path.exists(src):
            shutil.move(src, dst)
        self._manager.reload()

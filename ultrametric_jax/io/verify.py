"""Checks that loaded weights hold numbers: every float value finite.

A damaged file that still parses (a block of bytes overwritten, uninitialised memory, a NaN
written by a diverged run) shows up as NaN or inf after reading or dequantising; the model
would then answer garbage without a word. Arrays are checked in chunks, so the check costs a
few MiB of memory whatever the tensor's size.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from ultrametric_jax.errors import CheckpointError

_CHUNK = 1 << 22  # elements per np.isfinite call


def _is_float(dtype) -> bool:
    """numpy floats and ml_dtypes' (bfloat16, float8), whose numpy kind is 'V'."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def first_nonfinite(arr) -> tuple[int, int] | None:
    """(count of NaN/inf values, flat index of the first) in a float array, None when finite."""
    arr = np.asarray(arr)
    if not _is_float(arr.dtype) or arr.size == 0:
        return None
    flat = arr.reshape(-1)
    count, first = 0, None
    for start in range(0, flat.size, _CHUNK):
        bad = ~np.isfinite(flat[start:start + _CHUNK])
        n = int(np.count_nonzero(bad))
        if n:
            count += n
            if first is None:
                first = start + int(np.argmax(bad))
    return None if first is None else (count, first)


def check_finite(arr, tensor: str, source: str, after: str = "") -> None:
    """Raise a CheckpointError naming `tensor` and `source` when `arr` holds NaN or inf.

    `after` says what produced the values when it was not the file itself (e.g. a cast).
    """
    found = first_nonfinite(arr)
    if found is None:
        return
    count, first = found
    shape = tuple(np.shape(arr))
    index = tuple(int(i) for i in np.unravel_index(first, shape)) if shape else ()
    how = f" after {after}" if after else ""
    raise CheckpointError(
        f"tensor {tensor} in {source} holds {count} non-finite value(s) (NaN or inf){how}, "
        f"the first at index {index}: the weights are damaged")


def cast_overflows(src_dtype, dst_dtype) -> bool:
    """Whether casting finite src values to dst may give inf (dst has a smaller range)."""
    src, dst = np.dtype(src_dtype), np.dtype(dst_dtype)
    if not (_is_float(src) and _is_float(dst)):
        return False
    return float(ml_dtypes.finfo(dst).max) < float(ml_dtypes.finfo(src).max)

"""Public entry point: argument checks, backend dispatch, padding and the custom VJP."""
from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels.common import pad_axis
from pallas_kernels.config import AttentionConfig, GpuTuning, MosaicTuning
from pallas_kernels.reference import dense_attention
from pallas_kernels.schedule import BlockSchedule, build_schedule
from pallas_kernels.validation import check_attention_args, check_block_size

# "gpu": Pallas kernels lowered through Triton; "triton": the same kernels written in Triton and
# called through jax_triton (triton_backend.py); "mosaic": Pallas' Mosaic GPU lowering for
# Hopper (mosaic_gpu.py); "tpu": Pallas/Mosaic; "xla": the dense reference.
BACKENDS = ("auto", "gpu", "mosaic", "tpu", "triton", "xla")
_MODULES = {"gpu": "pallas_kernels.gpu", "mosaic": "pallas_kernels.mosaic_gpu",
            "tpu": "pallas_kernels.tpu", "triton": "pallas_kernels.triton_backend"}
DEFAULT_BLOCKS = {"gpu": (128, 128), "mosaic": (128, 128), "tpu": (128, 128),
                  "triton": (128, 128)}


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    # jax reports CUDA and ROCm devices alike as "gpu"
    return {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "xla")


def pick_backend(backend: str, q, k, *, window, sink_tokens, block_q, block_k,
                 gpu_tuning=None):
    """(backend, GpuTuning or None for the defaults): resolve_backend's, where "auto" on a GPU
    takes the fastest of the GPU kernels and their tunings for this device and shape class
    (autoselect.py: measured once, then recorded). A gpu_tuning given is used as it is."""
    if gpu_tuning is not None and not isinstance(gpu_tuning, GpuTuning):
        raise TypeError(f"gpu_tuning must be a pallas_kernels.GpuTuning or None, got "
                        f"{type(gpu_tuning).__name__}")
    resolved = resolve_backend(backend)
    if backend != "auto" or resolved != "gpu":
        return resolved, gpu_tuning
    from pallas_kernels.autoselect import choose, split_candidate
    choice = choose(q, k, window=window, sink_tokens=sink_tokens,
                    block_q=block_q or DEFAULT_BLOCKS["gpu"][0],
                    block_k=block_k or DEFAULT_BLOCKS["gpu"][1])
    chosen, tuning = split_candidate(choice, q.dtype)
    return chosen, gpu_tuning or tuning


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attend(q, k, v, qc, kc, sched, backend, cfg):
    return _attend_fwd(q, k, v, qc, kc, sched, backend, cfg)[0]


def kernel_forward(q, k, v, qc, kc, sched, backend, cfg):
    """(out, lse) of the kernels on unpadded inputs and a prepared schedule
    (prepare_schedule): no custom VJP (kernel_backward is its transpose)."""
    mod = importlib.import_module(_MODULES[backend])
    sqp, skp = cfg.num_q_blocks * cfg.block_q, cfg.num_k_blocks * cfg.block_k
    out, lse = mod.forward(pad_axis(q, sqp, 1), pad_axis(k, skp, 1), pad_axis(v, skp, 1),
                           pad_axis(qc, sqp, 2), pad_axis(kc, skp, 2), sched, cfg)
    return out[:, :cfg.q_len], lse[..., :cfg.q_len]


def output_delta(out, dout, dlse=None):
    """delta [B, H, S] = rowsum(dout * out) - dlse: d lse / d s = p, so an LSE cotangent only
    shifts delta."""
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return delta if dlse is None else delta - dlse


def kernel_backward(q, k, v, qc, kc, sched, backend, cfg, dout, lse, delta):
    """(dq, dk, dv) of the kernels' pairs given the softmax's lse and delta (output_delta).
    These may be a larger softmax's (keys of other passes included): the gradients of this
    pass's pairs are then exact for the merged attention, with no merge to differentiate."""
    mod = importlib.import_module(_MODULES[backend])
    sqp, skp = cfg.num_q_blocks * cfg.block_q, cfg.num_k_blocks * cfg.block_k
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows without keys: p = exp(s - inf) = 0
    dq, dk, dv = mod.backward(
        pad_axis(q, sqp, 1), pad_axis(k, skp, 1), pad_axis(v, skp, 1),
        pad_axis(dout.astype(q.dtype), sqp, 1), pad_axis(lse, sqp, 2, jnp.inf),
        pad_axis(delta, sqp, 2), pad_axis(qc, sqp, 2), pad_axis(kc, skp, 2), sched, cfg)
    return dq[:, :cfg.q_len], dk[:, :cfg.kv_len], dv[:, :cfg.kv_len]


def _attend_fwd(q, k, v, qc, kc, sched, backend, cfg):
    out, lse = kernel_forward(q, k, v, qc, kc, sched, backend, cfg)
    return (out, lse), (q, k, v, qc, kc, sched, out, lse)


def _attend_bwd(backend, cfg, res, cotangents):
    q, k, v, qc, kc, sched, out, lse = res
    dout, dlse = cotangents
    grads = kernel_backward(q, k, v, qc, kc, sched, backend, cfg, dout, lse,
                            output_delta(out, dout, dlse))
    return (*grads, *jax.tree.map(lambda x: None, (qc, kc, sched)))


_attend.defvjp(_attend_fwd, _attend_bwd)


def _check_kernel_backend(backend):
    if backend not in _MODULES:
        raise ValueError(f"the kernels' backend must be one of {tuple(_MODULES)}, got {backend!r}")


def _check_gpu_blocks(backend, cfg, dtype):
    if backend in ("gpu", "triton") and min(cfg.block_q, cfg.block_k) < 16:
        raise ValueError(f"GPU block sizes must be >= 16, got block_q={cfg.block_q}, "
                         f"block_k={cfg.block_k}")
    if backend == "triton":  # missing packages or no GPU: say so before tracing a kernel
        from pallas_kernels.triton_backend import unavailable
        reason = unavailable(cfg.interpret)
        if reason:
            raise RuntimeError(reason)
    if backend == "mosaic":  # dtype, blocks and device: said before tracing a kernel
        from pallas_kernels import mosaic_gpu, mosaic_gpu_bwd
        reason = mosaic_gpu.unavailable(cfg, dtype) or (
            mosaic_gpu_bwd.unavailable(cfg) if cfg.mosaic.backward == "mosaic" else None)
        if reason:
            raise ValueError(reason)


def make_config(q, k, *, window, sink_tokens, q_offset, scale, backend, interpret,
                block_q, block_k, gpu_tuning=None, mosaic_tuning=None) -> AttentionConfig:
    _check_kernel_backend(backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cfg = AttentionConfig(q_len=q.shape[1], kv_len=k.shape[1], q_offset=q_offset, window=window,
                          sink_tokens=sink_tokens, scale=scale,
                          block_q=DEFAULT_BLOCKS[backend][0] if block_q is None else block_q,
                          block_k=DEFAULT_BLOCKS[backend][1] if block_k is None else block_k,
                          interpret=bool(interpret),
                          gpu=gpu_tuning or GpuTuning.for_dtype(q.dtype),
                          mosaic=mosaic_tuning or MosaicTuning())
    _check_gpu_blocks(backend, cfg, q.dtype)
    return cfg


def attention_with_schedule(q, k, v, q_clusters, k_clusters, schedule: BlockSchedule, *,
                            backend: str, config: AttentionConfig):
    """The kernels alone, for a schedule built beforehand (build_schedule) with the config's
    window, sink_tokens, q_offset and block sizes. Returns (out, lse); differentiable in q, k
    and v. With config.exclude_same_cluster every scheduled block is run with the token mask."""
    qc, kc, schedule, config = prepare_schedule(q, k, v, q_clusters, k_clusters, schedule,
                                                backend=backend, config=config)
    return _attend(q, k, v, qc, kc, schedule, backend, config)


def prepare_schedule(q, k, v, q_clusters, k_clusters, schedule: BlockSchedule, *,
                     backend: str, config: AttentionConfig):
    """(qc, kc, schedule, config) checked and resolved for kernel_forward / kernel_backward:
    the arguments of attention_with_schedule."""
    _check_kernel_backend(backend)
    _check_gpu_blocks(backend, config, q.dtype)
    qc, kc, window, sink_tokens, q_offset = check_attention_args(
        q, k, v, q_clusters, k_clusters, config.window, config.sink_tokens, config.q_offset)
    if (config.q_len, config.kv_len) != (q.shape[1], k.shape[1]):
        raise ValueError(f"config is for q_len={config.q_len}, kv_len={config.kv_len}, but q and "
                         f"k hold {q.shape[1]} and {k.shape[1]} positions")
    lead, nq, nk = qc.shape[:2], config.num_q_blocks, config.num_k_blocks
    want = BlockSchedule(kv_indices=(*lead, nq, nk), kv_num_blocks=(*lead, nq),
                         kv_num_masked=(*lead, nq), q_indices=(*lead, nk, nq),
                         q_num_blocks=(*lead, nk), q_num_masked=(*lead, nk), density=())
    for name, array, shape in zip(BlockSchedule._fields, schedule, want):
        if tuple(array.shape) != shape:
            raise ValueError(f"schedule.{name} has shape {tuple(array.shape)}, but the config's "
                             f"blocks ({config.block_q} x {config.block_k}) need {shape}")
    config = dataclasses.replace(config, window=window, sink_tokens=sink_tokens,
                                 q_offset=q_offset)
    if config.exclude_same_cluster:  # a "full" block would skip the cluster test: mask them all
        schedule = schedule._replace(kv_num_masked=schedule.kv_num_blocks,
                                     q_num_masked=schedule.q_num_blocks)
    return qc, kc, schedule, config


def block_sparse_attention(q, k, v, q_clusters, k_clusters, *, window, sink_tokens, q_offset=0,
                           scale=None, backend="auto", interpret=False, return_lse=False,
                           block_q=None, block_k=None, gpu_tuning=None):
    """Exact attention restricted to allowed pairs (see masking.allowed_pairs), computed only on
    the key blocks the cluster ids make reachable.

    q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] (Hq a multiple of Hkv; query head h reads kv head
    h // (Hq // Hkv)); q_clusters [B, Hq, Sq] and k_clusters [B, Hq, Sk] integer ids; queries sit
    at positions q_offset .. q_offset + Sq - 1. Returns out [B, Sq, Hq, D] in q's dtype and, with
    return_lse, the natural-log LSE [B, Hq, Sq] float32 (-inf where a row has no allowed key,
    whose output is 0). Differentiable in q, k and v on every backend. gpu_tuning: a GpuTuning
    for the GPU kernels ("gpu", "triton", and the Triton backward of "mosaic"), in place of
    the dtype's defaults or backend="auto"'s measured choice.
    """
    qc, kc, window, sink_tokens, q_offset = check_attention_args(
        q, k, v, q_clusters, k_clusters, window, sink_tokens, q_offset)
    backend, gpu_tuning = pick_backend(backend, q, k, window=window, sink_tokens=sink_tokens,
                                       block_q=block_q, block_k=block_k, gpu_tuning=gpu_tuning)
    if backend == "xla":
        check_block_size("block_q", block_q)
        check_block_size("block_k", block_k)
        return dense_attention(q, k, v, qc, kc, window=window, sink_tokens=sink_tokens,
                               q_offset=q_offset, scale=scale, return_lse=return_lse)
    cfg = make_config(q, k, window=window, sink_tokens=sink_tokens, q_offset=q_offset,
                      scale=scale, backend=backend, interpret=interpret,
                      block_q=block_q, block_k=block_k, gpu_tuning=gpu_tuning)
    sched = build_schedule(qc, kc, window=window, sink_tokens=sink_tokens, q_offset=q_offset,
                           block_q=cfg.block_q, block_k=cfg.block_k)
    out, lse = _attend(q, k, v, qc, kc, sched, backend, cfg)
    return (out, lse) if return_lse else out

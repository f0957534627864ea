"""Public entry point: argument checks, backend dispatch, padding and the custom VJP."""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels.config import AttentionConfig, GpuTuning
from pallas_kernels.masking import LOG2E
from pallas_kernels.reference import reference_attention
from pallas_kernels.schedule import BlockSchedule, build_schedule
from pallas_kernels.validation import check_attention_args, check_block_size

BACKENDS = ("auto", "gpu", "tpu", "xla")
_MODULES = {"gpu": "pallas_kernels.gpu", "tpu": "pallas_kernels.tpu"}
DEFAULT_BLOCKS = {"gpu": (128, 128), "tpu": (128, 128)}


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    return {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform, "xla")


def _pad_seq(x, length, axis, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if length != x.shape[axis] else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attend(q, k, v, qc, kc, sched, backend, cfg):
    return _attend_fwd(q, k, v, qc, kc, sched, backend, cfg)[0]


def _attend_fwd(q, k, v, qc, kc, sched, backend, cfg):
    mod = importlib.import_module(_MODULES[backend])
    sqp, skp = cfg.num_q_blocks * cfg.block_q, cfg.num_k_blocks * cfg.block_k
    out, lse = mod.forward(_pad_seq(q, sqp, 1), _pad_seq(k, skp, 1), _pad_seq(v, skp, 1),
                           _pad_seq(qc, sqp, 2), _pad_seq(kc, skp, 2), sched, cfg)
    out, lse = out[:, :cfg.q_len], lse[..., :cfg.q_len]
    return (out, lse), (q, k, v, qc, kc, sched, out, lse)


def _attend_bwd(backend, cfg, res, cotangents):
    q, k, v, qc, kc, sched, out, lse = res
    dout, dlse = cotangents
    mod = importlib.import_module(_MODULES[backend])
    sqp, skp = cfg.num_q_blocks * cfg.block_q, cfg.num_k_blocks * cfg.block_k
    # d lse / d s = p, so an LSE cotangent only shifts delta.
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) - dlse
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)  # rows without keys: p = 0
    dq, dk, dv = mod.backward(
        _pad_seq(q, sqp, 1), _pad_seq(k, skp, 1), _pad_seq(v, skp, 1),
        _pad_seq(dout.astype(q.dtype), sqp, 1), _pad_seq(lse2, sqp, 2, jnp.inf),
        _pad_seq(delta, sqp, 2), _pad_seq(qc, sqp, 2), _pad_seq(kc, skp, 2), sched, cfg)
    zeros = jax.tree.map(lambda x: None, (qc, kc, sched))
    return (dq[:, :cfg.q_len], dk[:, :cfg.kv_len], dv[:, :cfg.kv_len], *zeros)


_attend.defvjp(_attend_fwd, _attend_bwd)


def make_config(q, k, *, window, sink_tokens, q_offset, scale, backend, interpret,
                block_q, block_k, gpu_tuning=None) -> AttentionConfig:
    block_q = check_block_size("block_q", block_q) or DEFAULT_BLOCKS[backend][0]
    block_k = check_block_size("block_k", block_k) or DEFAULT_BLOCKS[backend][1]
    if backend == "gpu" and min(block_q, block_k) < 16:
        raise ValueError(f"GPU block sizes must be >= 16, got block_q={block_q}, block_k={block_k}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cfg = AttentionConfig(q_len=q.shape[1], kv_len=k.shape[1], q_offset=q_offset, window=window,
                          sink_tokens=sink_tokens, scale=scale, block_q=block_q, block_k=block_k,
                          interpret=bool(interpret),
                          gpu=gpu_tuning or GpuTuning.for_dtype(q.dtype))
    return cfg


def attention_with_schedule(q, k, v, q_clusters, k_clusters, schedule: BlockSchedule, *,
                            backend: str, config: AttentionConfig):
    """The kernels alone, for a schedule built beforehand with the config's block sizes.
    Returns (out, lse); differentiable in q, k and v."""
    return _attend(q, k, v, q_clusters, k_clusters, schedule, backend, config)


def block_sparse_attention(q, k, v, q_clusters, k_clusters, *, window, sink_tokens, q_offset=0,
                           scale=None, backend="auto", interpret=False, return_lse=False,
                           block_q=None, block_k=None):
    """Exact attention restricted to allowed pairs (see masking.allowed_pairs), computed only on
    the key blocks the cluster ids make reachable.

    q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] (Hq a multiple of Hkv; query head h reads kv head
    h // (Hq // Hkv)); q_clusters [B, Hq, Sq] and k_clusters [B, Hq, Sk] integer ids; queries sit
    at positions q_offset .. q_offset + Sq - 1. Returns out [B, Sq, Hq, D] in q's dtype and, with
    return_lse, the natural-log LSE [B, Hq, Sq] float32 (-inf where a row has no allowed key,
    whose output is 0). Differentiable in q, k and v on every backend.
    """
    backend = resolve_backend(backend)
    qc, kc, window, sink_tokens, q_offset = check_attention_args(
        q, k, v, q_clusters, k_clusters, window, sink_tokens, q_offset)
    if backend == "xla":
        check_block_size("block_q", block_q)
        check_block_size("block_k", block_k)
        return reference_attention(q, k, v, qc, kc, window=window, sink_tokens=sink_tokens,
                                   q_offset=q_offset, scale=scale, return_lse=return_lse)
    cfg = make_config(q, k, window=window, sink_tokens=sink_tokens, q_offset=q_offset,
                      scale=scale, backend=backend, interpret=interpret,
                      block_q=block_q, block_k=block_k)
    sched = build_schedule(qc, kc, window=window, sink_tokens=sink_tokens, q_offset=q_offset,
                           block_q=cfg.block_q, block_k=cfg.block_k)
    out, lse = _attend(q, k, v, qc, kc, sched, backend, cfg)
    return (out, lse) if return_lse else out

"""backend="triton": the Triton kernels of triton_kernels.py, called from JAX.

Compiled, they run through jax_triton.triton_call on a CUDA GPU (the route that stays when
Pallas drops its Triton lowering). With interpret=True they run through jax.pure_callback in
triton's interpreter on CPU torch tensors, which needs TRITON_INTERPRET=1 in the environment
before triton is first imported: slow, meant for tests on hosts without a GPU.

Same interface as gpu.py: inputs padded to whole blocks (ops.py), [B, S, heads, D] layout.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import pad_axis
from pallas_kernels.config import AttentionConfig
from pallas_kernels.masking import LOG2E


def unavailable(interpret: bool) -> str | None:
    """Why backend="triton" cannot run here with this interpret flag; None when it can."""
    try:
        from pallas_kernels import triton_kernels
    except ImportError as e:
        return (f"backend='triton' needs the triton package ({e}); install it with "
                "pip install 'ultrametric_jax[gpu]'")
    if interpret:
        if not triton_kernels.INTERPRETED:
            return ("backend='triton' with interpret=True runs triton's interpreter, which needs "
                    "TRITON_INTERPRET=1 in the environment before triton is first imported (this "
                    "process imported it without)")
        try:
            import torch  # noqa: F401  (the interpreter's tensors)
        except ImportError as e:
            return f"backend='triton' with interpret=True needs torch ({e})"
        return None
    if triton_kernels.INTERPRETED:
        return ("triton was imported with TRITON_INTERPRET=1, so its kernels can only be "
                "interpreted: pass interpret=True, or unset TRITON_INTERPRET")
    if jax.default_backend() != "gpu":
        return (f"backend='triton' compiles for a GPU, but jax's default backend is "
                f"{jax.default_backend()!r} (interpret=True runs the kernels in triton's "
                "interpreter on the CPU)")
    try:
        import jax_triton  # noqa: F401
    except ImportError as e:
        return (f"backend='triton' needs jax-triton ({e}); install it with "
                "pip install 'ultrametric_jax[gpu]'")
    return None


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel takes the input arrays, then one pointer per output,
    then the constexprs in meta."""
    kernel: Any
    grid: tuple[int, ...]
    out_shapes: tuple[jax.ShapeDtypeStruct, ...]
    meta: dict
    num_warps: int
    num_stages: int
    name: str
    zeroed: tuple[int, ...] = ()  # outputs zeroed before the kernel runs (it adds into them)


def _meta(cfg: AttentionConfig, q_shape, k_shape, dtype) -> dict:
    from pallas_kernels.triton_kernels import INTERPRETED
    _, sqp, hq, d = q_shape
    skp, hkv = k_shape[1], k_shape[2]
    dtype = jnp.dtype(dtype)
    bd = max(16, 1 << (d - 1).bit_length())  # Triton's dot needs a power of two >= 16
    return dict(HQ=hq, GROUP=hq // hkv, SQP=sqp, SKP=skp, D=d, BD=bd,
                BQ=cfg.block_q, BK=cfg.block_k, NQ=cfg.num_q_blocks, NK=cfg.num_k_blocks,
                Q_OFFSET=cfg.q_offset, WINDOW=cfg.window, SINK=cfg.sink_tokens,
                KV_LEN=cfg.kv_len, C=cfg.scale * LOG2E, EXCLUDE=cfg.exclude_same_cluster,
                IEEE=dtype == jnp.float32, UPCAST=INTERPRETED and dtype.itemsize == 2)


def compute_capability() -> int | None:
    """The major compute capability of jax's first GPU; None without one."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return None
    return int(str(getattr(device, "compute_capability", "0")).split(".")[0])


def _rescale_meta(cfg: AttentionConfig, rows: int, warps: int, bd: int, dtype) -> dict:
    """SLACK and PACK of the tree and band kernels' online softmax (_online_softmax):
    the running max's slack (cfg.gpu.rescale_slack), and PACK > 0, the accumulator elements per
    thread, where the rescale may be skipped per thread. That path reads two rows per thread,
    so it is taken where the accumulator is Hopper's warpgroup fragment with 16 rows of a
    program per warp: compiled for compute capability 9, 2-byte inputs. (Ampere's fragment
    spreads these rows otherwise; the compile test checks the machine code.)"""
    from pallas_kernels.triton_kernels import INTERPRETED
    slack = cfg.gpu.rescale_slack
    per_thread = rows * bd // (32 * warps)
    lazy = (slack > 0 and not INTERPRETED and jnp.dtype(dtype).itemsize == 2
            and rows == 16 * warps and per_thread in (32, 64, 128)
            and compute_capability() == 9)
    return dict(SLACK=slack, PACK=per_thread if lazy else 0)


def forward_launch(cfg: AttentionConfig, q_shape, k_shape, dtype) -> Launch:
    from pallas_kernels.triton_kernels import fwd_kernel
    batch, sqp, hq, _ = q_shape
    meta = _meta(cfg, q_shape, k_shape, dtype)
    meta["TK"] = min(cfg.gpu.fwd_tile_k, cfg.block_k)
    # rescaled every tile: with the per-thread skip this forward measured no faster on the
    # H200 (BENCHMARKS.md), unlike the sorted layout's tree and band passes
    meta.update(SLACK=0, PACK=0)
    return Launch(fwd_kernel, (cfg.num_q_blocks, batch * hq),
                  (jax.ShapeDtypeStruct(tuple(q_shape), dtype),
                   jax.ShapeDtypeStruct((batch, hq, sqp), jnp.float32)),
                  meta, cfg.gpu.fwd_warps, cfg.gpu.fwd_stages, "block_sparse_attention_fwd")


def routed_forward_launch(cfg: AttentionConfig, q_shape, k_shape, dtype) -> Launch:
    """forward_launch for fwd_routed_kernel: its inputs gain OINIT and LSEINIT."""
    from pallas_kernels.triton_kernels import fwd_routed_kernel
    return dataclasses.replace(forward_launch(cfg, q_shape, k_shape, dtype),
                               kernel=fwd_routed_kernel, name="routed_attention_fwd")


def band_forward_launch(cfg: AttentionConfig, q_shape, k_shape, dtype, *,
                        heads_first: bool = True) -> Launch:
    """band_fwd_kernel on self-attention inputs padded to sp positions: its query tile and
    key tile are the largest powers of two up to cfg.gpu's band tiles that divide sp; the sink
    keys run in key tiles too, ahead of the window's. Its programs run hb query heads, the
    largest power of two up to cfg.gpu.band_heads that divides the kv group; when hb falls
    short, the query tile grows by the same factor, so a program keeps band_tile_q *
    band_heads rows. heads_first: the grid's first axis runs over (batch, heads), so a query
    tile's heads run together (False: tiles first)."""
    from pallas_kernels.triton_kernels import band_fwd_kernel
    batch, sp, hq, _ = q_shape
    meta = _self_attention_meta(cfg, q_shape, k_shape, dtype, "band",
                                ("WINDOW", "SINK", "KV_LEN"))
    t = cfg.gpu
    hb = t.band_heads
    while meta["GROUP"] % hb:
        hb //= 2
    bq = _dividing_tile(t.band_tile_q * (t.band_heads // hb), sp)
    tk = _dividing_tile(t.band_tile_k, sp)
    meta.update(BQ=bq, TK=tk, HB=hb, HEADS_FIRST=heads_first, EXCLUDE=not t.band_by_position,
                **_rescale_meta(cfg, hb * bq, t.band_warps, meta["BD"], dtype))
    groups = batch * hq // hb
    grid = (groups, sp // bq) if heads_first else (sp // bq, groups)
    return Launch(band_fwd_kernel, grid,
                  (jax.ShapeDtypeStruct(tuple(q_shape), dtype),
                   jax.ShapeDtypeStruct((batch, hq, sp), jnp.float32)),
                  meta, t.band_warps, t.band_stages, "routed_attention_band_fwd")


def segment_forward_launch(cfg: AttentionConfig, q_shape, k_shape, dtype) -> Launch:
    """segment_fwd_kernel on self-attention inputs padded to sp positions: its query and key
    blocks are the largest powers of two up to cfg.gpu's tree tiles that divide sp."""
    from pallas_kernels.triton_kernels import segment_fwd_kernel
    batch, sp, hq, _ = q_shape
    meta = _self_attention_meta(cfg, q_shape, k_shape, dtype, "tree", ("WINDOW", "SINK"))
    t = cfg.gpu
    bq, bk = _dividing_tile(t.tree_tile_q, sp), _dividing_tile(t.tree_tile_k, sp)
    blocks, rows = sp // bq, batch * hq
    # the first TAIL query blocks of every row run last, heads first (segment_fwd_kernel);
    # one block at least stays in the grid's first part
    tail = min(-(-t.tree_tail // rows), blocks - 1)
    if not t.band_by_position:  # every same-cluster pair: the band pass excludes them
        meta.update(WINDOW=0, SINK=0)
    meta.update(BQ=bq, BK=bk, PREFETCH=bool(t.tree_prefetch), NT=blocks, TAIL=tail,
                NEAR=min(1 << max(meta["WINDOW"] + bq - 2, 0).bit_length(), 256),
                **_rescale_meta(cfg, bq, t.tree_warps, meta["BD"], dtype))
    return Launch(segment_fwd_kernel, (blocks * rows,),
                  (jax.ShapeDtypeStruct(tuple(q_shape), dtype),
                   jax.ShapeDtypeStruct((batch, hq, sp), jnp.float32)),
                  meta, t.tree_warps, t.tree_stages, "routed_attention_tree_fwd")


def _self_attention_meta(cfg: AttentionConfig, q_shape, k_shape, dtype, what: str,
                         extra: tuple) -> dict:
    """The constexprs of a sorted-layout pass over one padded length SP (the common ones and
    extra); what names the pass in the error for keys of another length."""
    batch, sp = q_shape[:2]
    if tuple(k_shape[:2]) != (batch, sp):
        raise ValueError(f"the {what} pass is self-attention over one padded length: q "
                         f"{tuple(q_shape)}, k {tuple(k_shape)}")
    full = _meta(cfg, q_shape, k_shape, dtype)
    meta = {name: full[name] for name in ("HQ", "GROUP", "D", "BD", "C", "IEEE", "UPCAST",
                                          *extra)}
    return dict(meta, SP=sp)


def _dividing_tile(tile: int, sp: int) -> int:
    """The largest power of two <= tile that divides sp (>= 16: sp is whole blocks)."""
    while sp % tile:
        tile //= 2
    if tile < 16:
        raise ValueError(f"no tile of 16 or more positions divides the padded length {sp}")
    return tile


def dq_launch(cfg: AttentionConfig, q_shape, k_shape, dtype) -> Launch:
    from pallas_kernels.triton_kernels import dq_kernel
    batch, sqp, hq, _ = q_shape
    t = cfg.gpu
    meta = _meta(cfg, q_shape, k_shape, dtype)
    meta.update(TQ=min(t.dq_tile_q, cfg.block_q), TK=min(t.dq_tile_k, cfg.block_k),
                SCALE=cfg.scale)
    return Launch(dq_kernel, (sqp // meta["TQ"], batch * hq),
                  (jax.ShapeDtypeStruct(tuple(q_shape), dtype),), meta, t.dq_warps, t.dq_stages,
                  "block_sparse_attention_dq")


# The sink pass: query blocks per program. Every query block reaches the sink keys, so their
# dk/dv are summed over parts of the query list instead of by one program walking all of it.
SINK_CHUNK = 8


def _sink_subs(cfg: AttentionConfig, tk: int) -> int:
    """Key sub-tiles of the blocks that hold sink keys (0 without sinks)."""
    return -(-cfg.sink_tokens // cfg.block_k) * (cfg.block_k // tk)


def dkv_launch(cfg: AttentionConfig, q_shape, k_shape, dtype) -> Launch:
    """dk, dv of every key sub-tile past the sink blocks (those rows come from dkv_sink)."""
    from pallas_kernels.triton_kernels import dkv_kernel
    batch, skp, hkv, _ = k_shape
    t = cfg.gpu
    meta = _meta(cfg, q_shape, k_shape, dtype)
    meta.update(TQ=min(t.dkv_tile_q, cfg.block_q), TK=min(t.dkv_tile_k, cfg.block_k),
                SCALE=cfg.scale)
    meta["FIRST_SUB"] = _sink_subs(cfg, meta["TK"])
    kv = jax.ShapeDtypeStruct(tuple(k_shape), dtype)
    return Launch(dkv_kernel, (skp // meta["TK"] - meta["FIRST_SUB"], batch * hkv), (kv, kv),
                  meta, t.dkv_warps, t.dkv_stages, "block_sparse_attention_dkv")


def dkv_sink_launch(cfg: AttentionConfig, q_shape, k_shape, dtype) -> Launch:
    """Float32 partial dk (scaled), dv of the sink blocks: [parts, B, sink rows, Hkv, D]."""
    from pallas_kernels.triton_kernels import dkv_sink_kernel
    batch, _, hkv, d = k_shape
    t = cfg.gpu
    meta = _meta(cfg, q_shape, k_shape, dtype)
    meta.update(TQ=min(t.dkv_tile_q, cfg.block_q), TK=min(t.dkv_tile_k, cfg.block_k),
                SCALE=cfg.scale, CHUNK=SINK_CHUNK)
    subs = _sink_subs(cfg, meta["TK"])
    meta["SINK_ROWS"] = subs * meta["TK"]
    parts = -(-cfg.num_q_blocks // SINK_CHUNK)
    part = jax.ShapeDtypeStruct((parts, batch, meta["SINK_ROWS"], hkv, d), jnp.float32)
    return Launch(dkv_sink_kernel, (parts, batch * hkv, subs), (part, part), meta, t.dkv_warps,
                  t.dkv_stages, "block_sparse_attention_dkv_sink")


def dkv_dq_launch(cfg: AttentionConfig, q_shape, k_shape, dtype) -> Launch:
    """GpuTuning.dq_atomic: dkv_launch's programs, then dkv_sink_launch's parts, in one launch
    that also adds dq (unscaled) into a zeroed float32 [B, Sqp, Hq, D]. Outputs dk, dv, the
    sink parts (as dkv_sink_launch's) and that dq."""
    from pallas_kernels.triton_kernels import dkv_dq_kernel
    main, sink = dkv_launch(cfg, q_shape, k_shape, dtype), dkv_sink_launch(cfg, q_shape,
                                                                           k_shape, dtype)
    meta = dict(main.meta, CHUNK=sink.meta["CHUNK"], SINK_ROWS=sink.meta["SINK_ROWS"])
    parts = sink.grid[0] * sink.grid[2] if meta["FIRST_SUB"] else 0
    dq = jax.ShapeDtypeStruct(tuple(q_shape), jnp.float32)
    return Launch(dkv_dq_kernel, (main.grid[0] + parts, main.grid[1]),
                  (*main.out_shapes, *sink.out_shapes, dq), meta, main.num_warps,
                  main.num_stages, "block_sparse_attention_dkv_dq", zeroed=(4,))


# ----------------------------------------------------------------------------- counting sort

def _check_sort(bins: int, tile: int) -> None:
    from pallas_kernels.validation import check_block_size
    if check_block_size("the counting sort's bins", bins) < 2:
        raise ValueError(f"the counting sort's bins must be a power of two >= 2, got {bins}")
    if check_block_size("the counting sort's tile", tile) < 16:
        raise ValueError(f"the counting sort's tile must be a power of two >= 16, got {tile}")
    if (bins + 1) * tile >= 2 ** 31:
        raise ValueError(f"the counting sort's keys (id x tile) overflow int32: bins {bins}, "
                         f"tile {tile}")


def count_launch(rows: int, n_ids: int, n: int, bins: int, tile: int,
                 num_ids: int = 0) -> Launch:
    from pallas_kernels.triton_sort import cluster_count_kernel
    _check_sort(bins, tile)
    tiles = -(-n // tile)
    return Launch(cluster_count_kernel, (tiles, rows),
                  (jax.ShapeDtypeStruct((rows, tiles, bins), jnp.int32),),
                  dict(N_IDS=n_ids, N=n, TILE=tile, BINS=bins, NUM_IDS=num_ids), 4, 1,
                  "cluster_count")


def place_launch(rows: int, n_ids: int, n: int, bins: int, tile: int, invert: bool,
                 num_ids: int = 0) -> Launch:
    from pallas_kernels.triton_sort import cluster_place_kernel
    _check_sort(bins, tile)
    perm = jax.ShapeDtypeStruct((rows, n), jnp.int32)
    return Launch(cluster_place_kernel, (-(-n // tile), rows), (perm, perm, perm),
                  dict(N_IDS=n_ids, N=n, TILE=tile, BINS=bins, INVERT=invert,
                       NUM_IDS=num_ids), 4, 1, "cluster_place")


def counting_sort(ids, bins: int, *, lo=None, length: int | None = None, tile: int = 512,
                  invert: bool = True, num_ids: int = 0, interpret: bool = False):
    """The stable sort by (id, position) of ids [..., N] int32 in [lo, lo + bins - 1) (bins a
    power of two; lo an int32 scalar, default 0), padded to length positions (default N) whose
    padding takes id lo + bins - 1, in two Triton launches (triton_sort.py). An id outside
    gives a wrong order: callers check the range, or pass num_ids > 0 (ids promised in
    [0, num_ids), num_ids < bins, lo 0): then an id outside gets start -1, which the tree kernel
    turns into a NaN row. tile: the positions a program counts and places (a power of two,
    cut to the row). Returns (order, starts, inverse), int32
    [..., length]: the position at each sorted slot, the first slot of each slot's run of equal
    ids, and the slot of each position (with invert=False, inverse is left unwritten)."""
    lead, n_ids = ids.shape[:-1], ids.shape[-1]
    n = n_ids if length is None else length
    if n < n_ids:
        raise ValueError(f"counting_sort pads to length {n}, shorter than the ids' {n_ids}")
    if not 0 <= num_ids < bins:
        raise ValueError(f"counting_sort's num_ids must lie in [0, bins = {bins}), got "
                         f"{num_ids}")
    rows = int(np.prod(lead, dtype=np.int64))
    tile = min(tile, max(16, 1 << (n - 1).bit_length()))  # a short row in one tile
    flat = ids.reshape(rows, n_ids).astype(jnp.int32)
    lo = jnp.zeros((1,), jnp.int32) if lo is None else jnp.reshape(lo, (1,)).astype(jnp.int32)
    (counts,) = call_launch(count_launch(rows, n_ids, n, bins, tile, num_ids), interpret, flat,
                            lo)
    # base[r, t, c]: the slots before tile t's first token of id c, over (id, tile) order
    total = jnp.sum(counts, axis=1)                                     # [rows, bins]
    first = jnp.cumsum(total, axis=1, dtype=jnp.int32) - total          # each id's first slot
    base = first[:, None, :] + jnp.cumsum(counts, axis=1, dtype=jnp.int32) - counts
    within = jnp.cumsum(counts, axis=2, dtype=jnp.int32) - counts       # smaller ids in the tile
    order, starts, inverse = call_launch(
        place_launch(rows, n_ids, n, bins, tile, invert, num_ids), interpret, flat, lo,
        base - within, first)
    return tuple(x.reshape(*lead, n) for x in (order, starts, inverse))


# ----------------------------------------------------------------------------- running

def _one_element_index():
    """triton 3.6's interpreter turns a loop bound into a Python int with int(array), which
    NumPy >= 2.4 refuses for the 1-element arrays it holds scalars in: read the element."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "reads_one_element", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.reads_one_element = True
    interpreter._patch_lang_tensor = patch


def launch_interpreted(launch: Launch, *inputs):
    """Runs launch in triton's interpreter on torch CPU tensors; returns the output tensors.
    Outputs start as NaN (integers: -1), so an element the kernel forgets to write shows;
    launch.zeroed ones start as 0."""
    import torch
    _one_element_index()
    outs = []
    for i, s in enumerate(launch.out_shapes):
        dtype = getattr(torch, jnp.dtype(s.dtype).name)  # float32, bfloat16, float16, int32
        fill = float("nan") if dtype.is_floating_point else -1
        outs.append(torch.full(s.shape, 0 if i in launch.zeroed else fill, dtype=dtype))
    launch.kernel[launch.grid](*inputs, *outs, **launch.meta, num_warps=launch.num_warps,
                               num_stages=launch.num_stages)
    return outs


def _to_torch(x):
    import torch
    x = np.ascontiguousarray(x)
    if x.dtype == jnp.bfloat16:  # numpy has no bfloat16: carry the bits
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _to_numpy(t):
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def _interpret(launch: Launch, *arrays):
    outs = launch_interpreted(launch, *map(_to_torch, arrays))
    return tuple(_to_numpy(t) for t in outs)


def call_launch(launch: Launch, interpret: bool, *arrays):
    """The launch's outputs (jax arrays): compiled through jax_triton, or interpreted."""
    if interpret:
        return jax.pure_callback(functools.partial(_interpret, launch), launch.out_shapes,
                                 *arrays)
    import jax_triton
    return jax_triton.triton_call(*arrays, kernel=launch.kernel, out_shape=launch.out_shapes,
                                  grid=launch.grid, num_warps=launch.num_warps,
                                  num_stages=launch.num_stages, name=launch.name,
                                  zeroed_outputs=launch.zeroed, **launch.meta)


def _call(cfg: AttentionConfig, launch: Launch, *arrays):
    return call_launch(launch, cfg.interpret, *arrays)


def forward(q, k, v, qc, kc, sched, cfg: AttentionConfig):
    """out [B, Sqp, Hq, D] (q.dtype), lse [B, Hq, Sqp] float32 (natural log)."""
    launch = forward_launch(cfg, q.shape, k.shape, q.dtype)
    out, lse = _call(cfg, launch, q, k, v, qc, kc, sched.kv_indices, sched.kv_num_masked,
                     sched.kv_num_blocks)
    return out, lse


def forward_routed(q, k, v, qc, kc, sched, cfg: AttentionConfig, *, init):
    """forward() through fwd_routed_kernel. init (out0 [B, Sqp, Hq, D], lse0 [B, Hq, Sqp]): a
    partial result over other keys that the kernel's softmax starts from, so (out, lse) are
    those of both key sets together."""
    launch = routed_forward_launch(cfg, q.shape, k.shape, q.dtype)
    return _call(cfg, launch, q, k, v, qc, kc, sched.kv_indices, sched.kv_num_masked,
                 sched.kv_num_blocks, init[0].astype(q.dtype), init[1])


def forward_segment(q, k, v, order, starts, cfg: AttentionConfig):
    """The tree set of self-attention on inputs padded to one length sp (segment_fwd_kernel):
    the same-cluster causal pairs, with cfg.gpu.band_by_position less those of the band pass
    (keys within cfg.window of the query or among its cfg.sink_tokens first). order
    [B, Hq, S] int32: the token at each slot of the cluster-sorted layout; starts [B, Hq, S]
    int32: the slot where each slot's segment begins. The sp - S padding slots become one more
    segment, of the padding positions themselves, so every row of out [B, sp, Hq, D]
    (q.dtype) and lse [B, Hq, sp] float32 is written (a row without a key: 0 and -inf; order
    and starts may come padded already, as sort_clusters(length=sp) gives them)."""
    seq, sp = order.shape[-1], q.shape[1]
    if seq < sp:
        pad = jnp.broadcast_to(jnp.arange(seq, sp, dtype=jnp.int32),
                               (*order.shape[:2], sp - seq))
        order = jnp.concatenate([order.astype(jnp.int32), pad], axis=-1)
        starts = pad_axis(starts.astype(jnp.int32), sp, 2, value=seq)
    return _call(cfg, segment_forward_launch(cfg, q.shape, k.shape, q.dtype), q, k, v, order,
                 starts)


def forward_band(q, k, v, qc, cfg: AttentionConfig, init, *, heads_first: bool = True):
    """The band set of self-attention on inputs padded to one length (band_fwd_kernel): the
    causal pairs with the key within cfg.window of the query or among the cfg.sink_tokens
    first, of other clusters than the query's (qc [B, Hq, sp] the ids) or, with
    cfg.gpu.band_by_position, of every cluster (qc is not read). Merged into init =
    (out0, lse0), a partial result over the other pairs. Returns (out, lse) as forward()."""
    launch = band_forward_launch(cfg, q.shape, k.shape, q.dtype, heads_first=heads_first)
    return _call(cfg, launch, q, k, v, qc, init[0].astype(q.dtype), init[1])


def backward(q, k, v, do, lse, delta, qc, kc, sched, cfg: AttentionConfig):
    """dq, dk, dv for padded inputs. lse [B, Hq, Sqp] is the natural-log LSE with +inf on rows
    without keys (so their probabilities are 0); delta = rowsum(out * dout) - dlse."""
    lse2 = lse * LOG2E  # the kernels' scores are in base 2; +inf stays +inf
    common = (q, k, v, do, lse2, delta.astype(jnp.float32), qc, kc)
    q_lists = (sched.q_indices, sched.q_num_masked, sched.q_num_blocks)
    if cfg.gpu.dq_atomic:
        launch = dkv_dq_launch(cfg, q.shape, k.shape, q.dtype)
        dk, dv, pdk, pdv, dq = _call(cfg, launch, *common, *q_lists)
        dk, dv = _with_sink_rows(dk, dv, pdk, pdv, launch.meta)
        return (dq * cfg.scale).astype(q.dtype), dk, dv
    (dq,) = _call(cfg, dq_launch(cfg, q.shape, k.shape, q.dtype), *common, sched.kv_indices,
                  sched.kv_num_masked, sched.kv_num_blocks)
    main = dkv_launch(cfg, q.shape, k.shape, q.dtype)
    if main.grid[0]:
        dk, dv = _call(cfg, main, *common, *q_lists)
    else:  # every key block holds sinks
        dk, dv = jnp.zeros_like(k), jnp.zeros_like(v)
    if main.meta["FIRST_SUB"]:
        sink = dkv_sink_launch(cfg, q.shape, k.shape, q.dtype)
        pdk, pdv = _call(cfg, sink, *common, *q_lists)
        dk, dv = _with_sink_rows(dk, dv, pdk, pdv, sink.meta)
    return dq, dk, dv


def _with_sink_rows(dk, dv, pdk, pdv, meta: dict):
    """dk, dv with the sink blocks' rows the sums of their parts (dkv_sink_launch's)."""
    rows = meta["SINK_ROWS"]
    if not rows:
        return dk, dv
    return (dk.at[:, :rows].set(jnp.sum(pdk, axis=0).astype(dk.dtype)),
            dv.at[:, :rows].set(jnp.sum(pdv, axis=0).astype(dv.dtype)))

"""Block-sparse flash attention written in Triton: the kernels of backend="triton".

The same walk as gpu.py (the Pallas kernels), so that both backends consume one BlockSchedule:
one forward program per (query block, batch x query head), longest rows first; one dq program
per query sub-tile; one dk/dv program per key sub-tile and kv head, which runs the query heads
of its group in turn (or, with GpuTuning.dq_atomic, dk/dv programs that also add dq with
atomics, in one launch). Each loops over its schedule list: the masked entries first (token mask
from positions and cluster ids), then the full ones without it. Scores live in base 2 (exp2);
the tree and band passes' running max moves only past a slack, so most key tiles skip the
rescale.

Arrays are [B, S, heads, D] row-major with S padded to whole blocks; the head dim is padded
to BD (a power of two >= 16) by masked loads instead of copies. Every size is a constexpr: a
config compiles once. This module needs only triton; triton_backend.py launches it.
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32; IEEE: float32 inputs at full precision (no TF32).
    UPCAST: the interpreter's dot multiplies bf16 bit patterns as integers (triton 3.6), so
    under it 2-byte inputs are widened first (exact: their products fit float32)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _mask(s, q_pos, k_pos, q_ids, k_ids, WINDOW: tl.constexpr, SINK: tl.constexpr,
          KV_LEN: tl.constexpr, EXCLUDE: tl.constexpr):
    """masking.allowed_pairs on a tile: -inf where the pair is not allowed."""
    local = (k_pos < SINK) | (q_pos - k_pos < WINDOW)
    if EXCLUDE:
        ok = local & (q_ids != k_ids)
    else:
        ok = local | (q_ids == k_ids)
    ok = ok & (k_pos <= q_pos) & (k_pos < KV_LEN)
    return tl.where(ok, s, float("-inf"))


def _lazy_rescale_asm(pack: int) -> tuple[str, str]:
    """PTX for acc * alpha over one thread's pack accumulator elements, skipped when the
    thread's rows keep their running max (alpha == 1). Its branch is the thread's own, so no
    reduction across the program's warps decides it. It reads the thread's rows from elements
    0 and 2: in Hopper's warpgroup accumulator fragment a thread holds rows r and r + 8 as
    elements (0, 1) and (2, 3) of every 8-column group, and with 16 rows of a program per warp
    (the only launches that take this path) no others. The compile test checks it on the
    machine code."""
    outs = " ".join(f"mov.b32 ${i}, ${pack + i};" for i in range(pack))
    muls = " ".join(f"mul.f32 ${i}, ${i}, ${2 * pack + i};" for i in range(pack))
    asm = ("{ .reg .pred %lz<2>; "
           f"setp.neu.f32 %lz0, ${2 * pack}, 0f3F800000; "
           f"setp.neu.f32 %lz1, ${2 * pack + 2}, 0f3F800000; "
           f"or.pred %lz0, %lz0, %lz1; {outs} @!%lz0 bra LZ_SKIP; {muls} LZ_SKIP: }}")
    return asm, ",".join(["=f"] * pack + ["f"] * (2 * pack))


_LAZY_ASM_32, _LAZY_CONS_32 = (tl.constexpr(x) for x in _lazy_rescale_asm(32))
_LAZY_ASM_64, _LAZY_CONS_64 = (tl.constexpr(x) for x in _lazy_rescale_asm(64))
_LAZY_ASM_128, _LAZY_CONS_128 = (tl.constexpr(x) for x in _lazy_rescale_asm(128))


@triton.jit
def _rescale(acc, alpha, PACK: tl.constexpr):
    """acc * alpha[:, None]; PACK > 0 (compiled, PACK accumulator elements per thread): the
    multiply is skipped by the threads whose rows' alpha is 1 (_lazy_rescale_asm)."""
    if PACK == 0:
        out = acc * alpha[:, None]
    else:
        a = tl.broadcast_to(alpha[:, None], acc.shape)
        if PACK == 32:
            out = tl.inline_asm_elementwise(_LAZY_ASM_32, _LAZY_CONS_32, [acc, a],
                                            dtype=tl.float32, is_pure=True, pack=32)
        elif PACK == 64:
            out = tl.inline_asm_elementwise(_LAZY_ASM_64, _LAZY_CONS_64, [acc, a],
                                            dtype=tl.float32, is_pure=True, pack=64)
        else:
            out = tl.inline_asm_elementwise(_LAZY_ASM_128, _LAZY_CONS_128, [acc, a],
                                            dtype=tl.float32, is_pure=True, pack=128)
    return out


@triton.jit
def _online_softmax(acc, m, l, s, v, C: tl.constexpr, MASKED: tl.constexpr,
                    IEEE: tl.constexpr, UPCAST: tl.constexpr, SLACK: tl.constexpr,
                    PACK: tl.constexpr):
    """One key tile's raw scores s (q . k, -inf where masked) and values v into the running
    (acc, m, l); m is in base 2 (scores times C). SLACK > 0: the running max moves only when a
    row's tile max passes it by more than SLACK, so most tiles leave alpha at 1 and skip the
    rescale (_rescale); the weights stay below 2^SLACK and out, LSE are unchanged."""
    top = tl.max(s, 1) * C  # C > 0: the max of the raw scores, scaled once per row
    if SLACK > 0:
        m_new = tl.where(top > m + SLACK, top, m)
    else:
        m_new = tl.maximum(m, top)
    if MASKED:  # a row that has seen only masked keys: exp2(-inf - 0) = 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.math.exp2(m - m_use)
    p = tl.math.exp2(s * C - m_use[:, None])  # one fused multiply-add per score
    acc = _rescale(acc, alpha, PACK) + _dot(p.to(v.dtype), v, IEEE, UPCAST)
    return acc, m_new, l * alpha + tl.sum(p, 1)


@triton.jit
def _tile_scores(q, k_ptr, rows_k, cols_d, d_ok, ROW: tl.constexpr, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Raw scores q . k of q against the key rows rows_k (the softmax scales them)."""
    k = tl.load(k_ptr + rows_k[:, None] * ROW + cols_d[None, :], mask=d_ok[None, :], other=0.0)
    return _dot(q, tl.trans(k), IEEE, UPCAST)


@triton.jit
def _tile_update(acc, m, l, s, v_ptr, rows_k, cols_d, d_ok, ROW: tl.constexpr, C: tl.constexpr,
                 MASKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 SLACK: tl.constexpr, PACK: tl.constexpr):
    """The value rows rows_k, weighted by the (masked) raw scores s, into the running state."""
    v = tl.load(v_ptr + rows_k[:, None] * ROW + cols_d[None, :], mask=d_ok[None, :], other=0.0)
    return _online_softmax(acc, m, l, s, v, C, MASKED, IEEE, UPCAST, SLACK, PACK)


@triton.jit
def _partial_state(OINIT, LSEINIT, o_off, lse_off, d_ok):
    """(acc, m, l) of a partial result over other keys: m its LSE in base 2, l = 1, acc its
    output (rows with LSE -inf: none, acc 0; a NaN row stays NaN)."""
    lse0 = tl.load(LSEINIT + lse_off)
    has = lse0 != float("-inf")
    m = tl.where(has, lse0 * 1.4426950408889634, float("-inf"))
    l = tl.where(has, 1.0, 0.0)
    acc = tl.load(OINIT + o_off, mask=d_ok[None, :], other=0.0).to(tl.float32)
    return tl.where(has[:, None], acc, 0.0), m, l


@triton.jit
def _finish(acc, m, l):
    """(out float32, natural-log LSE) of the running state; no allowed key: 0 and -inf."""
    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.math.log2(tl.where(empty, 1.0, l)))
                   * 0.6931471805599453)
    return out, lse


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_blocks(acc, m, l, q, q_pos, q_ids, k_ptr, v_ptr, kc_ptr, idx_ptr, start, stop,
                cols_d, d_ok, ROW: tl.constexpr, BK: tl.constexpr, TK: tl.constexpr,
                C: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr, KV_LEN: tl.constexpr,
                EXCLUDE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                MASKED: tl.constexpr, SLACK: tl.constexpr, PACK: tl.constexpr):
    for t in range(start, stop):
        j = tl.load(idx_ptr + t)
        for r in tl.static_range(BK // TK):
            keys = j * BK + r * TK + tl.arange(0, TK)
            s = _tile_scores(q, k_ptr, keys, cols_d, d_ok, ROW, IEEE, UPCAST)
            if MASKED:
                s = _mask(s, q_pos[:, None], keys[None, :], q_ids[:, None],
                          tl.load(kc_ptr + keys)[None, :], WINDOW, SINK, KV_LEN, EXCLUDE)
            acc, m, l = _tile_update(acc, m, l, s, v_ptr, keys, cols_d, d_ok, ROW, C, MASKED,
                                     IEEE, UPCAST, SLACK, PACK)
    return acc, m, l


@triton.jit
def _fwd_program(Q, K, V, QC, KC, IDX, NMASKED, NBLOCKS, OINIT, LSEINIT, O, LSE,
                 HQ: tl.constexpr, GROUP: tl.constexpr, SQP: tl.constexpr, SKP: tl.constexpr,
                 D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                 TK: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, Q_OFFSET: tl.constexpr,
                 WINDOW: tl.constexpr, SINK: tl.constexpr, KV_LEN: tl.constexpr,
                 C: tl.constexpr, EXCLUDE: tl.constexpr, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr, SLACK: tl.constexpr, PACK: tl.constexpr,
                 INIT: tl.constexpr):
    """One query block of the forward. INIT: the online softmax starts from a partial result
    over other keys, OINIT [B, SQP, HQ, D] and LSEINIT [B, HQ, SQP] (natural log, -inf: none),
    so the output is the merge of both key sets."""
    i = NQ - 1 - tl.program_id(0)  # the longest rows (last blocks) start first
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    HKV: tl.constexpr = HQ // GROUP
    rows = i * BQ + tl.arange(0, BQ)
    cols_d = tl.arange(0, BD)
    d_ok = cols_d < D
    q_ptr = Q + b.to(tl.int64) * (SQP * HQ * D) + h * D
    q = tl.load(q_ptr + rows[:, None] * (HQ * D) + cols_d[None, :], mask=d_ok[None, :],
                other=0.0)
    q_ids = tl.load(QC + bh.to(tl.int64) * SQP + rows)
    kv_off = b.to(tl.int64) * (SKP * HKV * D) + (h // GROUP) * D
    row = bh * NQ + i
    masked = tl.load(NMASKED + row)
    total = tl.load(NBLOCKS + row)
    idx_ptr = IDX + row.to(tl.int64) * NK
    kc_ptr = KC + bh.to(tl.int64) * SKP
    q_pos = Q_OFFSET + rows
    o_off = b.to(tl.int64) * (SQP * HQ * D) + h * D + rows[:, None] * (HQ * D) + cols_d[None, :]
    if INIT:
        acc, m, l = _partial_state(OINIT, LSEINIT, o_off, bh.to(tl.int64) * SQP + rows, d_ok)
    else:
        acc = tl.zeros((BQ, BD), tl.float32)
        m = tl.full((BQ,), float("-inf"), tl.float32)
        l = tl.zeros((BQ,), tl.float32)
    acc, m, l = _fwd_blocks(acc, m, l, q, q_pos, q_ids, K + kv_off, V + kv_off, kc_ptr, idx_ptr,
                            0, masked, cols_d, d_ok, HKV * D, BK, TK, C, WINDOW, SINK, KV_LEN,
                            EXCLUDE, IEEE, UPCAST, True, SLACK, PACK)
    acc, m, l = _fwd_blocks(acc, m, l, q, q_pos, q_ids, K + kv_off, V + kv_off, kc_ptr, idx_ptr,
                            masked, total, cols_d, d_ok, HKV * D, BK, TK, C, WINDOW, SINK,
                            KV_LEN, EXCLUDE, IEEE, UPCAST, False, SLACK, PACK)
    out, lse = _finish(acc, m, l)
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * SQP + rows, lse)


@triton.jit
def fwd_kernel(Q, K, V, QC, KC, IDX, NMASKED, NBLOCKS, O, LSE,
               HQ: tl.constexpr, GROUP: tl.constexpr, SQP: tl.constexpr, SKP: tl.constexpr,
               D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               TK: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, Q_OFFSET: tl.constexpr,
               WINDOW: tl.constexpr, SINK: tl.constexpr, KV_LEN: tl.constexpr,
               C: tl.constexpr, EXCLUDE: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr, SLACK: tl.constexpr, PACK: tl.constexpr):
    """O [B, SQP, HQ, D] (Q's dtype), LSE [B, HQ, SQP] float32 natural log (-inf: no key).
    SLACK, PACK: the online softmax's lazy rescale (_online_softmax, _rescale)."""
    _fwd_program(Q, K, V, QC, KC, IDX, NMASKED, NBLOCKS, O, LSE, O, LSE, HQ, GROUP, SQP, SKP,
                 D, BD, BQ, BK, TK, NQ, NK, Q_OFFSET, WINDOW, SINK, KV_LEN, C, EXCLUDE, IEEE,
                 UPCAST, SLACK, PACK, False)


@triton.jit
def fwd_routed_kernel(Q, K, V, QC, KC, IDX, NMASKED, NBLOCKS, OINIT, LSEINIT, O, LSE,
                      HQ: tl.constexpr, GROUP: tl.constexpr, SQP: tl.constexpr,
                      SKP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr,
                      BK: tl.constexpr, TK: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr,
                      Q_OFFSET: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr,
                      KV_LEN: tl.constexpr, C: tl.constexpr, EXCLUDE: tl.constexpr,
                      IEEE: tl.constexpr, UPCAST: tl.constexpr, SLACK: tl.constexpr,
                      PACK: tl.constexpr):
    """The forward started from a partial result over other keys (_fwd_program's INIT):
    OINIT [B, SQP, HQ, D] and LSEINIT [B, HQ, SQP]."""
    _fwd_program(Q, K, V, QC, KC, IDX, NMASKED, NBLOCKS, OINIT, LSEINIT, O, LSE, HQ, GROUP,
                 SQP, SKP, D, BD, BQ, BK, TK, NQ, NK, Q_OFFSET, WINDOW, SINK, KV_LEN, C,
                 EXCLUDE, IEEE, UPCAST, SLACK, PACK, True)


# ----------------------------------------------------------------------------- tree forward

@triton.jit
def _segment_blocks(acc, m, l, q, span, seg, room, k_ptr, v_ptr, ord_ptr, first, stop, cols_d,
                    d_ok, ROW: tl.constexpr, BK: tl.constexpr, SP: tl.constexpr,
                    C: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    SLOTS: tl.constexpr, LOCAL: tl.constexpr, SINK: tl.constexpr,
                    PREFETCH: tl.constexpr, SLACK: tl.constexpr, PACK: tl.constexpr):
    """Key blocks first..stop-1 of the sorted layout (keys read through the order), masked to
    SLOTS: a row's slots from its segment's start seg up to itself; LOCAL: the tokens from
    SINK on, before the row's window: key position - SINK < room (per row). Neither: no mask.
    PREFETCH: the next block's order entries load one step ahead, so the key gathers need
    not wait for them."""
    MASKED: tl.constexpr = SLOTS or LOCAL
    slots = tl.arange(0, BK)
    if PREFETCH:
        ahead = tl.load(ord_ptr + first * BK + slots, mask=first * BK + slots < SP, other=0)
    for j in range(first, stop):
        keys = j * BK + slots
        if PREFETCH:
            rows_k = ahead
            ahead = tl.load(ord_ptr + keys + BK, mask=keys + BK < SP, other=0)
        else:
            rows_k = tl.load(ord_ptr + keys)
        s = _tile_scores(q, k_ptr, rows_k, cols_d, d_ok, ROW, IEEE, UPCAST)
        if SLOTS:  # seg <= key <= row in one unsigned comparison; span = row - seg
            s = tl.where((keys[None, :] - seg[:, None]).to(tl.uint32) <= span[:, None], s,
                         float("-inf"))
        if LOCAL:  # SINK <= key position < SINK + room, the same way; the positions loaded
            # again in the scores' layout (rows_k's took 24 more registers)
            at_k = tl.load(ord_ptr + keys)
            s = tl.where((at_k[None, :] - SINK).to(tl.uint32) < room[:, None], s,
                         float("-inf"))
        acc, m, l = _tile_update(acc, m, l, s, v_ptr, rows_k, cols_d, d_ok, ROW, C, MASKED,
                                 IEEE, UPCAST, SLACK, PACK)
    return acc, m, l


@triton.jit
def segment_fwd_kernel(Q, K, V, ORD, START, O, LSE,
                       HQ: tl.constexpr, GROUP: tl.constexpr, SP: tl.constexpr,
                       D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                       C: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       PREFETCH: tl.constexpr, SLACK: tl.constexpr, PACK: tl.constexpr,
                       NT: tl.constexpr, TAIL: tl.constexpr, WINDOW: tl.constexpr,
                       SINK: tl.constexpr, NEAR: tl.constexpr):
    """The sorted layout's tree set in closed form, no schedule: slot t of head (b, h) holds
    token ORD[b, h, t] and its segment (cluster) begins at slot START[b, h, t]; query slot t
    attends to the slots START[t] .. t, less, where WINDOW or SINK is above 0, the tokens
    that are sinks (position < SINK) or in its window (position > its own - WINDOW): the band
    pass then takes those. Query block i (rows r0..r1, BQ of them) walks the BK-key blocks
    from the one holding START[r0] to the one holding r1 (or r1's window); those from the
    first starting at or after START[r1] + SINK up to the last ending before r0 (or r0's
    window) hold allowed pairs only and run unmasked. q, k, v are read through the order and
    O, LSE written at the tokens, in token order, [B, SP, HQ, D] and [B, HQ, SP] (every slot:
    ORD is a permutation of 0..SP-1 per head, padding slots included). BQ and BK are powers
    of two dividing SP; NEAR, a power of two: the slots before the block read at a time to
    find its rows' windows. A START of -1 (counting_sort's poison) makes the row NaN.
    PREFETCH: each key block's order entries load a block ahead (_segment_blocks).
    The grid is one axis over the NT query blocks of every (b, h): blocks TAIL.. of each head
    in turn, then blocks TAIL-1 down to 0, heads fastest (TAIL < NT). A block costs about its
    rows' distance from their segment's start, so the grid ends on its cheapest programs (the
    first rows of every head's first segment) and the SMs run out of work together; the rest
    keeps one head's blocks side by side, sharing its keys in L2."""
    MAIN: tl.constexpr = NT - TAIL  # >= 1 (segment_forward_launch)
    LOCAL: tl.constexpr = WINDOW > 0 or SINK > 0
    g = tl.program_id(0)
    heads = tl.num_programs(0) // NT  # B * HQ
    # a branch, not a select: the select's indices stayed live through the loops (12 more
    # registers, 2 programs per SM instead of 3)
    if g < heads * MAIN:
        bh = g // MAIN
        i = g % MAIN + TAIL
    else:
        late = g - heads * MAIN
        bh = late % heads
        i = TAIL - 1 - late // heads
    b = bh // HQ
    h = bh % HQ
    HKV: tl.constexpr = HQ // GROUP
    r0 = i * BQ
    rows = r0 + tl.arange(0, BQ)
    ord_ptr = ORD + bh.to(tl.int64) * SP
    start_ptr = START + bh.to(tl.int64) * SP
    at = tl.load(ord_ptr + rows)
    seg = tl.load(start_ptr + rows)
    # START -1: the token's cluster id broke counting_sort's num_ids promise. Its row attends
    # to itself alone and comes out NaN; the block's walk follows the other rows' segments.
    poison = seg < 0
    seg = tl.where(poison, rows, seg)
    cols_d = tl.arange(0, BD)
    d_ok = cols_d < D
    o_off = b.to(tl.int64) * (SP * HQ * D) + h * D + at[:, None] * (HQ * D) + cols_d[None, :]
    q = tl.load(Q + o_off, mask=d_ok[None, :], other=0.0)
    kv_off = b.to(tl.int64) * (SP * HKV * D) + (h // GROUP) * D
    lo = tl.min(seg, axis=0) // BK
    # Unmasked: the blocks from the last segment start (past its sinks) on, before the first
    # row's window; none when the rows straddle two segments. Before and after them, masked,
    # up to the last row's window.
    r1 = r0 + BQ - 1
    if WINDOW > 0:
        # a row's window in its segment: the slots in (row - WINDOW, row] (positions rise
        # along a segment by 1 at least) whose tokens lie within WINDOW of the row's; counted
        # for r0 and r1 over the slots (r0 - WINDOW, r1]
        seg0 = tl.maximum(tl.load(start_ptr + r0), 0)
        seg1 = tl.load(start_ptr + r1)
        edge0 = tl.load(ord_ptr + r0) - WINDOW
        edge1 = tl.load(ord_ptr + r1) - WINDOW
        seen0 = 0
        seen1 = 0
        for c in range(0, WINDOW + BQ - 1, NEAR):  # NEAR slots at a time
            near = r0 - WINDOW + 1 + c + tl.arange(0, NEAR)
            valid = (near >= 0) & (near <= r1)
            near_at = tl.load(ord_ptr + near, mask=valid, other=0)
            seen0 += tl.sum((valid & (near >= seg0) & (near <= r0) & (near_at > edge0))
                            .to(tl.int32), 0)
            seen1 += tl.sum((valid & (near >= seg1) & (near > r1 - WINDOW) & (near_at > edge1))
                            .to(tl.int32), 0)
        cut = tl.maximum(tl.maximum(r0 + 1 - seen0, 0) // BK, lo)
        # a poisoned r1 (START -1) says nothing of the other rows: the blocks up to r1's
        stop = tl.where(seg1 < 0, r1 // BK, tl.maximum(r1 - seen1, 0) // BK) + 1
    else:
        cut = r0 // BK  # the blocks from here to r1's hold keys past some row: masked
        stop = r1 // BK + 1
    full = tl.minimum((tl.max(seg, axis=0) + SINK + BK - 1) // BK, cut)
    span = (rows - seg).to(tl.uint32)
    # keys at positions SINK .. at - WINDOW: key position - SINK < room (none: room 0)
    room = tl.maximum(at - WINDOW - SINK + 1, 0).to(tl.uint32)
    acc = tl.zeros((BQ, BD), tl.float32)
    m = tl.full((BQ,), float("-inf"), tl.float32)
    l = tl.zeros((BQ,), tl.float32)
    k_ptr, v_ptr = K + kv_off, V + kv_off
    acc, m, l = _segment_blocks(acc, m, l, q, span, seg, room, k_ptr, v_ptr, ord_ptr, lo, full,
                                cols_d, d_ok, HKV * D, BK, SP, C, IEEE, UPCAST, True, LOCAL,
                                SINK, PREFETCH, SLACK, PACK)
    acc, m, l = _segment_blocks(acc, m, l, q, span, seg, room, k_ptr, v_ptr, ord_ptr, full, cut,
                                cols_d, d_ok, HKV * D, BK, SP, C, IEEE, UPCAST, False, False,
                                SINK, PREFETCH, SLACK, PACK)
    if LOCAL:
        # From the first row's window on, keys of the rows' one segment need no slot test:
        # a key past a row there has a later position, which the window's test refuses. Most
        # blocks lie inside one segment (every row's starts at or before the first key, and
        # the keys end at r1): their masked blocks run in the first loop, the others' in the
        # second.
        inside = (cut * BK >= tl.max(seg, axis=0)) & (stop * BK <= r1 + 1)
        split = tl.where(inside, stop, cut)
        acc, m, l = _segment_blocks(acc, m, l, q, span, seg, room, k_ptr, v_ptr, ord_ptr, cut,
                                    split, cols_d, d_ok, HKV * D, BK, SP, C, IEEE, UPCAST, False,
                                    True, SINK, PREFETCH, SLACK, PACK)
    else:
        split = cut
    acc, m, l = _segment_blocks(acc, m, l, q, span, seg, room, k_ptr, v_ptr, ord_ptr, split,
                                stop, cols_d, d_ok, HKV * D, BK, SP, C, IEEE, UPCAST, True, LOCAL,
                                SINK, PREFETCH, SLACK, PACK)
    out, lse = _finish(acc, m, l)
    out = tl.where(poison[:, None], float("nan"), out)
    lse = tl.where(poison, float("nan"), lse)
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * SP + at, lse)


# ----------------------------------------------------------------------------- band forward

@triton.jit
def _band_tiles(acc, m, l, q, q_pos, q_ids, k_ptr, v_ptr, kc_ptr, sink_tiles, first, stop,
                cols_d, d_ok, ROW: tl.constexpr, TK: tl.constexpr, C: tl.constexpr,
                WINDOW: tl.constexpr, SINK: tl.constexpr, KV_LEN: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, HB: tl.constexpr,
                EXCLUDE: tl.constexpr, SLACK: tl.constexpr, PACK: tl.constexpr):
    """sink_tiles key tiles of TK keys from key 0, masked to the sink pairs outside the window
    (k < SINK, q - k >= WINDOW), then the key tiles first..stop-1, masked to the window pairs
    (q - k < WINDOW): disjoint sets, so a key in both kinds of tile counts once. EXCLUDE:
    other clusters' keys only (kc_ptr: the key ids of the (one) head, or with HB > 1 heads per
    program a [rows, 1] pointer per row); else every cluster's, and no id is read. One loop,
    so the sink tiles' loads are pipelined with the others'."""
    for u in range(first - sink_tiles, stop):
        sink = u < first  # the same for the whole tile: its keys' addresses stay affine
        keys = tl.where(sink, u - first + sink_tiles, u) * TK + tl.arange(0, TK)
        s = _tile_scores(q, k_ptr, keys, cols_d, d_ok, ROW, IEEE, UPCAST)
        # each row's keys lo < k <= hi: its window (q - WINDOW, q] or its sink keys outside
        # the window, [0, min(SINK, q - WINDOW + 1)); both cut at KV_LEN
        lo = tl.where(sink, -1, q_pos - WINDOW)
        hi = tl.minimum(tl.where(sink, tl.minimum(q_pos - WINDOW, SINK - 1), q_pos), KV_LEN - 1)
        ok = (keys[None, :] > lo[:, None]) & (keys[None, :] <= hi[:, None])
        if EXCLUDE:
            if HB == 1:
                k_ids = tl.load(kc_ptr + keys)[None, :]
            else:
                k_ids = tl.load(kc_ptr + keys[None, :])
            ok = ok & (q_ids[:, None] != k_ids)
        s = tl.where(ok, s, float("-inf"))
        acc, m, l = _tile_update(acc, m, l, s, v_ptr, keys, cols_d, d_ok, ROW, C, True, IEEE,
                                 UPCAST, SLACK, PACK)
    return acc, m, l


@triton.jit
def band_fwd_kernel(Q, K, V, QC, OINIT, LSEINIT, O, LSE,
                    HQ: tl.constexpr, GROUP: tl.constexpr, SP: tl.constexpr, D: tl.constexpr,
                    BD: tl.constexpr, BQ: tl.constexpr, TK: tl.constexpr, HB: tl.constexpr,
                    WINDOW: tl.constexpr, SINK: tl.constexpr, KV_LEN: tl.constexpr,
                    C: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    HEADS_FIRST: tl.constexpr, EXCLUDE: tl.constexpr, SLACK: tl.constexpr,
                    PACK: tl.constexpr):
    """The sorted layout's band set in token order, self-attention over SP padded positions:
    the causal pairs with q - k < WINDOW or k < SINK, of other clusters (EXCLUDE; QC [B, HQ,
    SP] the ids) or of every cluster (QC is not read; the tree pass then leaves these out).
    Closed form, no schedule: query tile i reads the TK-key tiles holding keys
    i*BQ - WINDOW + 1 .. i*BQ + BQ - 1 and, when one of its rows lies WINDOW or more past key
    0, first the TK-key tiles of the SINK first keys (not the whole block that holds them), in
    the same loop. The softmax starts from OINIT [B, SP, HQ, D] and LSEINIT [B, HQ, SP] (the
    tree pass's result), so O and LSE are the merge of both.
    HB query heads of one kv group share a program: its HB * BQ rows (head-major) read each
    key tile once, and a narrow query tile still fills the matrix units.
    HEADS_FIRST: the grid is (B * HQ / HB, tiles), so the heads of one query tile run
    together and read each key tile of their kv head once from memory, not once per head.
    Tiles run last to first: the first WINDOW rows have fewer keys and no sink tiles, so the
    grid ends on its cheapest programs."""
    if HEADS_FIRST:
        i = tl.num_programs(1) - 1 - tl.program_id(1)
        g = tl.program_id(0)
    else:
        i = tl.num_programs(0) - 1 - tl.program_id(0)
        g = tl.program_id(1)
    b = g // (HQ // HB)
    h0 = (g % (HQ // HB)) * HB
    HKV: tl.constexpr = HQ // GROUP
    r = tl.arange(0, HB * BQ)
    pos = i * BQ + r % BQ
    h = h0 + r // BQ
    bh = b.to(tl.int64) * HQ + h
    cols_d = tl.arange(0, BD)
    d_ok = cols_d < D
    o_off = b.to(tl.int64) * (SP * HQ * D) + h[:, None] * D + pos[:, None] * (HQ * D) \
        + cols_d[None, :]
    q = tl.load(Q + o_off, mask=d_ok[None, :], other=0.0)
    q_ids = pos  # unread without EXCLUDE
    kc_ptr = QC
    if EXCLUDE:
        q_ids = tl.load(QC + bh * SP + pos)  # self-attention: key ids are the query ids
        if HB == 1:
            kc_ptr = QC + (b.to(tl.int64) * HQ + h0) * SP
        else:
            kc_ptr = (QC + bh * SP)[:, None]
    kv_off = b.to(tl.int64) * (SP * HKV * D) + (h0 // GROUP) * D
    acc, m, l = _partial_state(OINIT, LSEINIT, o_off, bh * SP + pos, d_ok)
    sink_tiles = 0
    if SINK > 0:
        far = i * BQ + BQ - 1 >= WINDOW  # some row has sink keys outside its window
        sink_tiles = tl.where(far, (SINK + TK - 1) // TK, 0)
    first, stop = 0, 0
    if WINDOW > 0:
        first = tl.maximum(i * BQ - WINDOW + 1, 0) // TK
        stop = (i * BQ + BQ - 1) // TK + 1
    acc, m, l = _band_tiles(acc, m, l, q, pos, q_ids, K + kv_off, V + kv_off, kc_ptr, sink_tiles,
                            first, stop, cols_d, d_ok, HKV * D, TK, C, WINDOW, SINK, KV_LEN,
                            IEEE, UPCAST, HB, EXCLUDE, SLACK, PACK)
    out, lse = _finish(acc, m, l)
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=d_ok[None, :])
    tl.store(LSE + bh * SP + pos, lse)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, q_pos, q_ids, k_ptr, v_ptr, kc_ptr, idx_ptr, start,
               stop, cols_d, d_ok, ROW: tl.constexpr, BK: tl.constexpr, TK: tl.constexpr,
               C: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr, KV_LEN: tl.constexpr,
               EXCLUDE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
               MASKED: tl.constexpr):
    for t in range(start, stop):
        j = tl.load(idx_ptr + t)
        for r in tl.static_range(BK // TK):
            keys = j * BK + r * TK + tl.arange(0, TK)
            k = tl.load(k_ptr + keys[:, None] * ROW + cols_d[None, :], mask=d_ok[None, :],
                        other=0.0)
            v = tl.load(v_ptr + keys[:, None] * ROW + cols_d[None, :], mask=d_ok[None, :],
                        other=0.0)
            # the exponent as one fused multiply-add per score, masked after
            x = _dot(q, tl.trans(k), IEEE, UPCAST) * C - lse2[:, None]
            if MASKED:
                x = _mask(x, q_pos[:, None], keys[None, :], q_ids[:, None],
                          tl.load(kc_ptr + keys)[None, :], WINDOW, SINK, KV_LEN, EXCLUDE)
            p = tl.math.exp2(x)
            ds = p * (_dot(do, tl.trans(v), IEEE, UPCAST) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE, UPCAST)
    return dq


@triton.jit
def dq_kernel(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, DQ,
              HQ: tl.constexpr, GROUP: tl.constexpr, SQP: tl.constexpr, SKP: tl.constexpr,
              D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
              TQ: tl.constexpr, TK: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr,
              Q_OFFSET: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr,
              KV_LEN: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr,
              EXCLUDE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """DQ [B, SQP, HQ, D] for one TQ-row sub-tile of a query block. LSE2 is the base-2 LSE
    (+inf on rows without keys, so their probabilities are 0)."""
    sub = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    HKV: tl.constexpr = HQ // GROUP
    rows = sub * TQ + tl.arange(0, TQ)
    cols_d = tl.arange(0, BD)
    d_ok = cols_d < D
    q_off = b.to(tl.int64) * (SQP * HQ * D) + h * D
    at = rows[:, None] * (HQ * D) + cols_d[None, :]
    q = tl.load(Q + q_off + at, mask=d_ok[None, :], other=0.0)
    do = tl.load(DO + q_off + at, mask=d_ok[None, :], other=0.0)
    lse2 = tl.load(LSE2 + bh.to(tl.int64) * SQP + rows)
    delta = tl.load(DELTA + bh.to(tl.int64) * SQP + rows)
    q_ids = tl.load(QC + bh.to(tl.int64) * SQP + rows)
    kv_off = b.to(tl.int64) * (SKP * HKV * D) + (h // GROUP) * D
    row = bh * NQ + sub // (BQ // TQ)
    masked = tl.load(NMASKED + row)
    total = tl.load(NBLOCKS + row)
    idx_ptr = IDX + row.to(tl.int64) * NK
    kc_ptr = KC + bh.to(tl.int64) * SKP
    q_pos = Q_OFFSET + rows
    dq = tl.zeros((TQ, BD), tl.float32)
    dq = _dq_blocks(dq, q, do, lse2, delta, q_pos, q_ids, K + kv_off, V + kv_off, kc_ptr,
                    idx_ptr, 0, masked, cols_d, d_ok, HKV * D, BK, TK, C, WINDOW, SINK, KV_LEN,
                    EXCLUDE, IEEE, UPCAST, True)
    dq = _dq_blocks(dq, q, do, lse2, delta, q_pos, q_ids, K + kv_off, V + kv_off, kc_ptr,
                    idx_ptr, masked, total, cols_d, d_ok, HKV * D, BK, TK, C, WINDOW, SINK,
                    KV_LEN, EXCLUDE, IEEE, UPCAST, False)
    tl.store(DQ + q_off + at, (dq * SCALE).to(DQ.dtype.element_ty), mask=d_ok[None, :])


@triton.jit
def _dkv_blocks(dk, dv, k, v, k_pos, k_ids, q_ptr, do_ptr, lse2_ptr, delta_ptr, qc_ptr,
                dq_ptr, idx_ptr, start, stop, cols_d, d_ok, ROW: tl.constexpr,
                BQ: tl.constexpr, TQ: tl.constexpr, Q_OFFSET: tl.constexpr, C: tl.constexpr,
                WINDOW: tl.constexpr, SINK: tl.constexpr, KV_LEN: tl.constexpr,
                EXCLUDE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                MASKED: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """dk, dv summed over the listed query blocks. DQ_ATOMIC: each tile's share of dq,
    ds @ k (unscaled), is also added into the float32 dq at dq_ptr (laid out as q)."""
    for t in range(start, stop):
        j = tl.load(idx_ptr + t)
        for r in tl.static_range(BQ // TQ):
            rows = j * BQ + r * TQ + tl.arange(0, TQ)
            at = rows[:, None] * ROW + cols_d[None, :]
            q = tl.load(q_ptr + at, mask=d_ok[None, :], other=0.0)
            do = tl.load(do_ptr + at, mask=d_ok[None, :], other=0.0)
            x = (_dot(k, tl.trans(q), IEEE, UPCAST) * C                      # [TK, TQ]
                 - tl.load(lse2_ptr + rows)[None, :])
            if MASKED:
                x = _mask(x, (Q_OFFSET + rows)[None, :], k_pos[:, None],
                          tl.load(qc_ptr + rows)[None, :], k_ids[:, None], WINDOW, SINK,
                          KV_LEN, EXCLUDE)
            p = tl.math.exp2(x)
            dv += _dot(p.to(do.dtype), do, IEEE, UPCAST)
            ds = p * (_dot(v, tl.trans(do), IEEE, UPCAST) - tl.load(delta_ptr + rows)[None, :])
            dk += _dot(ds.to(q.dtype), q, IEEE, UPCAST)
            if DQ_ATOMIC:
                dq = _dot(tl.trans(ds.to(k.dtype)), k, IEEE, UPCAST)            # [TQ, D]
                tl.atomic_add(dq_ptr + at, dq, mask=d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkv_sums(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, DQ, sub, bg, first,
              CHUNK: tl.constexpr, HQ: tl.constexpr, GROUP: tl.constexpr, SQP: tl.constexpr,
              SKP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr,
              BK: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, NQ: tl.constexpr,
              NK: tl.constexpr, Q_OFFSET: tl.constexpr, WINDOW: tl.constexpr,
              SINK: tl.constexpr, KV_LEN: tl.constexpr, C: tl.constexpr,
              EXCLUDE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
              DQ_ATOMIC: tl.constexpr):
    """(dk unscaled, dv) float32 [TK, BD] of key sub-tile sub of kv head bg (batch x kv head)
    over entries [first, first + CHUNK) of its query-side lists (IDX, NMASKED, NBLOCKS), summed
    over the GROUP query heads that read it; with DQ_ATOMIC the pairs' dq too (_dkv_blocks)."""
    HKV: tl.constexpr = HQ // GROUP
    b = bg // HKV
    hk = bg % HKV
    k_pos = sub * TK + tl.arange(0, TK)
    cols_d = tl.arange(0, BD)
    d_ok = cols_d < D
    at = b.to(tl.int64) * (SKP * HKV * D) + hk * D + k_pos[:, None] * (HKV * D) + cols_d[None, :]
    k = tl.load(K + at, mask=d_ok[None, :], other=0.0)
    v = tl.load(V + at, mask=d_ok[None, :], other=0.0)
    dk = tl.zeros((TK, BD), tl.float32)
    dv = tl.zeros((TK, BD), tl.float32)
    for hh in range(GROUP):
        h = hk * GROUP + hh
        bh = b * HQ + h
        k_ids = tl.load(KC + bh.to(tl.int64) * SKP + k_pos)
        row = bh * NK + sub // (BK // TK)
        masked = tl.load(NMASKED + row)
        last = tl.minimum(first + CHUNK, tl.load(NBLOCKS + row))
        idx_ptr = IDX + row.to(tl.int64) * NQ
        q_off = b.to(tl.int64) * (SQP * HQ * D) + h * D
        vec = bh.to(tl.int64) * SQP
        dq_ptr = DQ + q_off if DQ_ATOMIC else DQ
        dk, dv = _dkv_blocks(dk, dv, k, v, k_pos, k_ids, Q + q_off, DO + q_off, LSE2 + vec,
                             DELTA + vec, QC + vec, dq_ptr, idx_ptr, first,
                             tl.minimum(last, masked), cols_d, d_ok, HQ * D, BQ, TQ, Q_OFFSET,
                             C, WINDOW, SINK, KV_LEN, EXCLUDE, IEEE, UPCAST, True, DQ_ATOMIC)
        dk, dv = _dkv_blocks(dk, dv, k, v, k_pos, k_ids, Q + q_off, DO + q_off, LSE2 + vec,
                             DELTA + vec, QC + vec, dq_ptr, idx_ptr, tl.maximum(first, masked),
                             last, cols_d, d_ok, HQ * D, BQ, TQ, Q_OFFSET, C, WINDOW, SINK,
                             KV_LEN, EXCLUDE, IEEE, UPCAST, False, DQ_ATOMIC)
    return dk, dv


@triton.jit
def _store_dkv(DK, DV, dk, dv, sub, bg, SKP: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
               BD: tl.constexpr, TK: tl.constexpr, SCALE: tl.constexpr):
    """dk * SCALE, dv into DK, DV [B, SKP, HKV, D] at key sub-tile sub of kv head bg."""
    k_pos = sub * TK + tl.arange(0, TK)
    cols_d = tl.arange(0, BD)
    at = ((bg // HKV).to(tl.int64) * (SKP * HKV * D) + (bg % HKV) * D
          + k_pos[:, None] * (HKV * D) + cols_d[None, :])
    tl.store(DK + at, (dk * SCALE).to(DK.dtype.element_ty), mask=(cols_d < D)[None, :])
    tl.store(DV + at, dv.to(DV.dtype.element_ty), mask=(cols_d < D)[None, :])


@triton.jit
def dkv_kernel(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, DK, DV,
               HQ: tl.constexpr, GROUP: tl.constexpr, SQP: tl.constexpr, SKP: tl.constexpr,
               D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               TQ: tl.constexpr, TK: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr,
               Q_OFFSET: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr,
               KV_LEN: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr,
               EXCLUDE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
               FIRST_SUB: tl.constexpr):
    """DK, DV [B, SKP, HKV, D] for one TK-key sub-tile of one kv head, summed over the GROUP
    query heads that read it. IDX, NMASKED, NBLOCKS are the schedule's query-side lists.
    Sub-tiles below FIRST_SUB (the sink blocks, dkv_sink_kernel's) are left unwritten."""
    sub = FIRST_SUB + tl.program_id(0)
    bg = tl.program_id(1)
    dk, dv = _dkv_sums(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, None, sub, bg,
                       0, NQ, HQ, GROUP, SQP, SKP, D, BD, BQ, BK, TQ, TK, NQ, NK, Q_OFFSET,
                       WINDOW, SINK, KV_LEN, C, EXCLUDE, IEEE, UPCAST, False)
    _store_dkv(DK, DV, dk, dv, sub, bg, SKP, HQ // GROUP, D, BD, TK, SCALE)


@triton.jit
def dkv_sink_kernel(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, PDK, PDV,
                    HQ: tl.constexpr, GROUP: tl.constexpr, SQP: tl.constexpr,
                    SKP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr,
                    BK: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, NQ: tl.constexpr,
                    NK: tl.constexpr, Q_OFFSET: tl.constexpr, WINDOW: tl.constexpr,
                    SINK: tl.constexpr, KV_LEN: tl.constexpr, C: tl.constexpr,
                    SCALE: tl.constexpr, EXCLUDE: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr, CHUNK: tl.constexpr, SINK_ROWS: tl.constexpr):
    """The sink blocks' DK, DV in parts: every query block reaches them, so one program per
    key sub-tile would walk every query block in turn. Program (c, bg, sub) walks entries
    [c * CHUNK, (c + 1) * CHUNK) of the sub-tile's lists and writes float32 partial sums
    PDK, PDV [NCHUNK, B, SINK_ROWS, HKV, D] (PDK already scaled), summed over c outside."""
    c = tl.program_id(0)
    bg = tl.program_id(1)
    sub = tl.program_id(2)
    dk, dv = _dkv_sums(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, None, sub, bg,
                       c * CHUNK, CHUNK, HQ, GROUP, SQP, SKP, D, BD, BQ, BK, TQ, TK, NQ, NK,
                       Q_OFFSET, WINDOW, SINK, KV_LEN, C, EXCLUDE, IEEE, UPCAST, False)
    _store_sink_part(PDK, PDV, dk, dv, c, sub, bg, HQ // GROUP, D, BD, TK, SCALE, SINK_ROWS)


@triton.jit
def _store_sink_part(PDK, PDV, dk, dv, c, sub, bg, HKV: tl.constexpr, D: tl.constexpr,
                     BD: tl.constexpr, TK: tl.constexpr, SCALE: tl.constexpr,
                     SINK_ROWS: tl.constexpr):
    """Part c of the sink sub-tile sub's sums into PDK, PDV [NCHUNK, B, SINK_ROWS, HKV, D]:
    part [c, b] is a [SINK_ROWS, HKV, D] array laid out as DK."""
    part = (c * (tl.num_programs(1) // HKV) + bg // HKV).to(tl.int64) * (SINK_ROWS * HKV * D)
    _store_dkv(PDK + part, PDV + part, dk, dv, sub, bg % HKV, SINK_ROWS, HKV, D, BD, TK, SCALE)


@triton.jit
def dkv_dq_kernel(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, DK, DV, PDK, PDV,
                  DQ, HQ: tl.constexpr, GROUP: tl.constexpr, SQP: tl.constexpr,
                  SKP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr,
                  BK: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, NQ: tl.constexpr,
                  NK: tl.constexpr, Q_OFFSET: tl.constexpr, WINDOW: tl.constexpr,
                  SINK: tl.constexpr, KV_LEN: tl.constexpr, C: tl.constexpr,
                  SCALE: tl.constexpr, EXCLUDE: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr, CHUNK: tl.constexpr, SINK_ROWS: tl.constexpr,
                  FIRST_SUB: tl.constexpr):
    """The whole backward but dq's final scale in one launch (GpuTuning.dq_atomic): dkv_kernel's
    programs, then dkv_sink_kernel's parts ((c, sub) flattened into program ids past them),
    each also adding its pairs' share of dq into DQ, float32 [B, SQP, HQ, D] zeroed beforehand
    and unscaled. Five matrix products per tile instead of dkv_kernel's and dq_kernel's
    seven; dq's sums come in any order."""
    i = tl.program_id(0)
    bg = tl.program_id(1)
    MAIN: tl.constexpr = SKP // TK - FIRST_SUB
    if i < MAIN:
        sub = FIRST_SUB + i
        dk, dv = _dkv_sums(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, DQ, sub,
                           bg, 0, NQ, HQ, GROUP, SQP, SKP, D, BD, BQ, BK, TQ, TK, NQ, NK,
                           Q_OFFSET, WINDOW, SINK, KV_LEN, C, EXCLUDE, IEEE, UPCAST, True)
        _store_dkv(DK, DV, dk, dv, sub, bg, SKP, HQ // GROUP, D, BD, TK, SCALE)
    elif FIRST_SUB > 0:  # (without sinks the grid holds dkv_kernel's programs alone)
        c = (i - MAIN) // FIRST_SUB
        sub = (i - MAIN) % FIRST_SUB
        dk, dv = _dkv_sums(Q, K, V, DO, LSE2, DELTA, QC, KC, IDX, NMASKED, NBLOCKS, DQ, sub,
                           bg, c * CHUNK, CHUNK, HQ, GROUP, SQP, SKP, D, BD, BQ, BK, TQ, TK,
                           NQ, NK, Q_OFFSET, WINDOW, SINK, KV_LEN, C, EXCLUDE, IEEE, UPCAST,
                           True)
        _store_sink_part(PDK, PDV, dk, dv, c, sub, bg, HQ // GROUP, D, BD, TK, SCALE, SINK_ROWS)


# True when triton was imported with TRITON_INTERPRET=1: the kernels then run on the CPU, in
# triton's interpreter, and cannot be compiled.
INTERPRETED = not isinstance(fwd_kernel, triton.runtime.JITFunction)

"""The block lists' oracle: which [block_q, block_k] blocks hold an allowed pair, from the
explicit token mask in numpy (build_schedule, the segment schedules and every density a
benchmark reports are checked against it)."""
from __future__ import annotations

import numpy as np


def brute_force(qc, kc, *, window, sink, q_offset, bq, bk):
    """(visited, full, density) from the explicit [Sq, Sk] mask of every head."""
    batch, heads, q_len = qc.shape
    kv_len = kc.shape[-1]
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    qp, kp = q_offset + np.arange(q_len), np.arange(kv_len)
    visited = np.zeros((batch, heads, nq, nk), bool)
    full = np.zeros_like(visited)
    causal = 0
    for i in range(nq):
        for j in range(nk):
            causal += kp[j * bk] <= qp[min((i + 1) * bq, q_len) - 1]
    for b in range(batch):
        for h in range(heads):
            ok = (kp[None, :] <= qp[:, None]) & (
                (qc[b, h][:, None] == kc[b, h][None, :]) | (kp[None, :] < sink)
                | (qp[:, None] - kp[None, :] < window))
            for i in range(nq):
                for j in range(nk):
                    tile = ok[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                    visited[b, h, i, j] = tile.any()
                    full[b, h, i, j] = tile.all() and (j + 1) * bk <= kv_len
    return visited, full, visited.sum() / (batch * heads * causal)

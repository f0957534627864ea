"""Key tiles per tree program at 32k, 32 random clusters (64-row query blocks, 32-key tiles,
window 128, sink 1), split by cluster (GpuTuning.band_by_position=0) and by position (=1):
the bounds of segment_fwd_kernel's loops recomputed in numpy on 4 heads of random ids. Prints
the mean tiles per program: masked and unmasked by cluster; by position, those of the first
masked loop (slots and positions tested), the unmasked, and the masked ones from the first
row's window on, with positions tested alone (the block inside one segment) or both."""
import numpy as np

S, C, W, SINK, BQ, BK = 32768, 32, 128, 1, 64, 32
rng = np.random.default_rng(0)
tot = dict(cluster_masked=0, cluster_unmasked=0, position_first=0, position_unmasked=0,
           position_window_alone=0, position_window_both=0)
for head in range(4):
    ids = rng.integers(0, C, S)
    order = np.argsort(ids, kind="stable")
    first = np.searchsorted(ids[order], np.arange(C))
    start = first[ids[order]]

    def seen(r):  # r's window in its segment: slots whose tokens lie within W of r's
        slots = np.arange(max(r - W + 1, start[r], 0), r + 1)
        return int((order[slots] > order[r] - W).sum())

    for i in range(S // BQ):
        r0, r1 = i * BQ, i * BQ + BQ - 1
        seg = start[r0:r1 + 1]
        lo, diag, end = seg.min() // BK, r0 // BK, r1 // BK + 1
        full = min(-(-seg.max() // BK), diag)
        tot["cluster_masked"] += (full - lo) + (end - diag)
        tot["cluster_unmasked"] += diag - full
        cut = max(max(r0 + 1 - seen(r0), 0) // BK, lo)
        stop = max(r1 - seen(r1), 0) // BK + 1
        full = min(-(-(seg.max() + SINK) // BK), cut)
        tot["position_first"] += full - lo
        tot["position_unmasked"] += cut - full
        inside = cut * BK >= seg.max() and stop * BK <= r1 + 1
        tot["position_window_alone" if inside else "position_window_both"] += max(stop - cut, 0)
programs = 4 * S // BQ
print({k: round(v / programs, 2) for k, v in tot.items()})

"""A float64 numpy reference of surgery.condense.condensed_attention: explicit loops over batch,
query head and query (shared by its unit test and the kv_condensation experiment's test)."""
import itertools

import numpy as np

from ultrametric_jax.surgery.condense import TIE


def reference(q, k, v, clusters, num_clusters, *, window, sink, capacity, gamma, own, keep, medoid):
    """Output [B,S,H,D] float64, and how often the closest medoid differs from the newest."""
    B, S, H, D = q.shape
    G, N = k.shape[2], num_clusters
    out = np.zeros(q.shape)
    differs = 0
    for b, h, i in itertools.product(range(B), range(H), range(S)):
        g = h // (H // G)
        keys = [k[b, j, g] for j in range(i + 1) if j < sink or i - j < window]
        vals = [v[b, j, g] for j in range(i + 1) if j < sink or i - j < window]
        slots = []                                  # (rank, cluster, key, value)
        for c in range(N):
            members = [j for j in range(sink, i - window + 1) if clusters[b, h, j] == c]
            if not members:
                continue
            mean = np.mean([k[b, j, g] for j in members], axis=0)
            dist = [np.sum((k[b, j, g] - mean) ** 2) for j in members]
            # near ties (a pair is equidistant from its mean) go to the newest member
            closest = max(j for j, d in zip(members, dist)
                          if d - min(dist) <= TIE * np.sum(k[b, j, g] ** 2))
            newest = members[-1]
            differs += closest != newest
            key = k[b, closest if medoid == "closest" else newest, g]
            w = np.array([gamma ** (newest - j) for j in members])
            value = (w[:, None] * np.array([v[b, j, g] for j in members])).sum(0) / w.sum()
            rank = newest if keep == "recent" else len(members) * (S + 1) + newest
            slots.append((rank, c, key, value))
        slots.sort(key=lambda s: -s[0])
        for _, c, key, value in slots[:capacity]:
            if not own or c == clusters[b, h, i]:
                keys.append(key)
                vals.append(value)
        logits = np.array(keys) @ q[b, i, h] / np.sqrt(D)
        p = np.exp(logits - logits.max())
        out[b, i, h] = (p / p.sum()) @ np.array(vals)
    return out, differs

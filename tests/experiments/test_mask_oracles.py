"""experiments/mask_oracles.py at toy size: every row's perplexity against a float64 numpy
Llama under the same mask built independently (explicit windows, sinks and clusters, and the
per-row top fraction of the numpy scores), and the densities against closed forms."""
import json
import math
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from experiment_script import load_experiment
from numpy_selector import np_bilinear
from numpy_llama import llama_ce
from ultrametric_jax.run.data import eval_batches
from ultrametric_jax.run.restricted_attention import (block_keys_mask, cluster_keys_mask,
                                                      key_basis, key_gram,
                                                      lagged_block_keys_mask, low_rank_scores,
                                                      shared_key_affinity, spectral_clusters,
                                                      threshold_mask, top_fraction_mask,
                                                      top_keys_mask)

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEY_SETS = ("cluster_keys", "chunk_keys", "chunk_centroid_keys", "low_rank_keys",
            "sampled_keys", "centroid_keys")
TINY = runpy.run_path(str(ROOT / "configs" / "tiny_random.py"))


def load_script():
    return load_experiment("mask_oracles")


def top_fraction(scores, base, fraction):
    """Row i keeps its ceil(fraction * n_i) highest-scoring allowed keys (numpy, float64)."""
    keep = np.zeros_like(base)
    for i in range(scores.shape[0]):
        allowed = np.flatnonzero(base[i])
        if len(allowed):
            quota = math.ceil(fraction * len(allowed))
            keep[i, allowed[np.argsort(-scores[i, allowed], kind="stable")[:quota]]] = True
    return keep


def top_keys(scores, base, local, density, pairs=None):
    """local, plus the most-attended keys (column sums of the softmax over base) for every later
    query, in that order while the pairs stay within density * base's pairs, or within `pairs`
    when given (numpy)."""
    s = np.where(base, scores, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = np.where(base, p, 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    received = p.sum(0)
    local = base & local
    extra = (base & ~local).sum(0)
    budget = (density * base.sum() if pairs is None else pairs) - local.sum()
    chosen = np.zeros(base.shape[1], bool)
    used = 0
    for j in np.argsort(-received, kind="stable"):
        if used + extra[j] > budget:
            break
        used += extra[j]
        chosen[j] = True
    return local | (base & chosen[None, :])


def threshold(scores, base, log_threshold):
    """base's pairs whose float64 softmax probability over base is >= exp(log_threshold), plus
    base's diagonal (numpy)."""
    s = np.where(base, scores, -np.inf)
    logp = s - s.max(-1, keepdims=True)
    logp = logp - np.log(np.where(base, np.exp(logp), 0.0).sum(-1, keepdims=True))
    return base & ((logp >= log_threshold) | np.eye(*base.shape, dtype=bool))


def softmax(scores, base):
    """float64 softmax over base's keys, 0 elsewhere (numpy)."""
    s = np.where(base, scores, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = np.where(base, p, 0.0)
    return p / np.maximum(p.sum(-1, keepdims=True), 1e-300)


def key_sets(scores, base, local, ids, clusters, log_t, centroid=False, samples=None):
    """base & (local | the key set of each query's group), float64 numpy: a group keeps key j
    when the mean probability over its (sampled) queries that read j outside local passes
    exp(log_t), or with centroid when the softmax of its mean score row over the keys some
    member reads outside local does."""
    outside = base & ~local
    p = np.where(outside, softmax(scores, base), 0.0)
    chosen = np.zeros((clusters, base.shape[1]), bool)
    for c in range(clusters):
        rows = np.flatnonzero(ids == c)                  # position order
        readers = outside[rows].sum(0)
        if not np.any(readers > 0):                     # an empty group, or no far pair
            continue
        if centroid:
            centre = np.where(readers > 0, scores[rows].mean(0), -np.inf)
            logq = centre - centre.max()
            logq = logq - np.log(np.exp(logq).sum())
            chosen[c] = (readers > 0) & (logq >= log_t)
            continue
        if samples is not None:
            n = len(rows)
            r = np.arange(n)
            rows = rows[np.floor((r + 1) * samples / n) > np.floor(r * samples / n)]
            readers = outside[rows].sum(0)
        mean = p[rows].sum(0) / np.maximum(readers, 1)
        with np.errstate(divide="ignore"):
            chosen[c] = (readers > 0) & (np.log(mean) >= log_t)
    return base & (chosen[ids] | local)


def block_keys(scores, base, local, block, log_t, pooled=False):
    """base & (local | the chosen key blocks of each query's block), float64 numpy: a query
    block keeps key block b when the mean over its real queries of their dense mass on b
    outside local passes exp(log_t), or with pooled when the softmax over the blocks b <= a of
    the mean score of the block pair does."""
    seq = base.shape[0]
    blk = np.arange(seq) // block
    n = blk.max() + 1
    chosen = np.zeros((n, n), bool)
    p = np.where(base & ~local, softmax(scores, base), 0.0)
    real = base.any(-1)
    for a in range(n):
        rows = blk == a
        if pooled:
            mean = np.array([scores[rows][:, blk == b].mean() if b <= a else -np.inf
                             for b in range(n)])
            logq = mean - mean.max()
            logq = logq - np.log(np.exp(logq).sum())
            chosen[a] = logq >= log_t
        else:
            mass = np.array([p[rows][:, blk == b].sum() for b in range(n)])
            with np.errstate(divide="ignore"):
                chosen[a] = np.log(mass / max(real[rows].sum(), 1)) >= log_t
    return base & (chosen[blk][:, blk] | local)


def lagged_keys(scores, base, local, block, log_t):
    """base & (local | own block | the key set block a - 1 chose, for block a), float64 numpy:
    block a - 1 keeps key j when the mean probability over its queries that read j outside
    local passes exp(log_t)."""
    seq = base.shape[0]
    blk = np.arange(seq) // block
    outside = base & ~local
    p = np.where(outside, softmax(scores, base), 0.0)
    given = np.zeros((blk.max() + 1, seq), bool)         # the set block a reads
    for a in range(1, blk.max() + 1):
        rows = blk == a - 1
        readers = outside[rows].sum(0)
        with np.errstate(divide="ignore"):
            given[a] = (readers > 0) & (np.log(p[rows].sum(0) / np.maximum(readers, 1))
                                        >= log_t)
    return base & (given[blk] | (blk[:, None] == blk[None, :]) | local)


def random_blocks_layer():
    """(rng, B, H, S, float32 scores [B, H, S, S], causal [B, 1, S, S] with a tenth of the keys
    padding, local (window 3 + sink 1) [S, S], positions [B, S]) of a fresh random layer whose
    last block of 4 or 8 is short."""
    rng = np.random.default_rng()
    b, h, seq = 2, 3, 37
    scores = (2 * rng.standard_normal((b, h, seq, seq))).astype(np.float32)
    causal = np.tril(np.ones((seq, seq), bool))[None, None] & (rng.random((b, 1, 1, seq)) < 0.9)
    pos = np.arange(seq)
    local = (pos[:, None] - pos[None, :] < 3) | (pos[None, :] < 1)
    return rng, b, h, seq, scores, causal, local, jnp.broadcast_to(jnp.arange(seq), (b, seq))


def test_lagged_key_sets_match_a_float64_construction_and_read_no_later_query():
    rng, b, h, seq, scores, causal, local, positions = random_blocks_layer()

    def mask(scores, block, log_t):
        return np.asarray(lagged_block_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                                 jnp.asarray(local)[None, None], positions,
                                                 block, log_t))

    for block, log_t in ((4, -1.5), (4, -3.0), (8, -2.0), (37, -2.0)):
        got = mask(scores, block, log_t)
        want = np.stack([np.stack([lagged_keys(scores[i, j].astype(np.float64), causal[i, 0],
                                               local, block, log_t) for j in range(h)])
                         for i in range(b)])
        np.testing.assert_array_equal(got, want, err_msg=str((block, log_t)))
    # causal: scores of the queries from position t on change no row before t's block
    block, t = 8, 21
    changed = scores.copy()
    changed[..., t:, :] = (2 * rng.standard_normal(changed[..., t:, :].shape))
    before = (t // block) * block
    np.testing.assert_array_equal(mask(changed, block, -2.0)[..., :before, :],
                                  mask(scores, block, -2.0)[..., :before, :])
    # closed form: one block holds the sequence: its own block (everything causal), no set
    np.testing.assert_array_equal(mask(scores, seq, -2.0), np.broadcast_to(causal, got.shape))


def test_key_sets_of_query_groups_match_a_float64_construction():
    rng = np.random.default_rng()
    b, h, seq, clusters = 2, 3, 40, 5
    scores = (2 * rng.standard_normal((b, h, seq, seq))).astype(np.float32)
    causal = np.tril(np.ones((seq, seq), bool))[None, None] & (rng.random((b, 1, 1, seq)) < 0.9)
    pos = np.arange(seq)
    local = (pos[:, None] - pos[None, :] < 3) | (pos[None, :] < 1)
    ids = rng.integers(0, clusters, (b, h, seq)).astype(np.int32)
    for options in ({}, {"centroid": True}, {"samples": 2}, {"samples": 3}):
        for log_t in (-2.0, -3.5, -5.0):
            got = np.asarray(cluster_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                               jnp.asarray(local)[None, None], jnp.asarray(ids),
                                               clusters, log_t, **options))
            want = np.stack([np.stack([key_sets(scores[i, j].astype(np.float64), causal[i, 0],
                                                local, ids[i, j], clusters, log_t, **options)
                                       for j in range(h)]) for i in range(b)])
            np.testing.assert_array_equal(got, want, err_msg=str((options, log_t)))
    # closed forms: one group per query is the threshold mask joined with local (which holds
    # the diagonal); as many samples as the largest group is no sampling
    own = np.broadcast_to(np.arange(seq, dtype=np.int32), (b, h, seq))
    for log_t in (-1.0, -2.5, -4.0):
        got = np.asarray(cluster_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                           jnp.asarray(local)[None, None], jnp.asarray(own),
                                           seq, log_t))
        want = np.asarray(threshold_mask(jnp.asarray(scores), jnp.asarray(causal), log_t))
        np.testing.assert_array_equal(got, want | (causal & local))
        all_rows = np.asarray(cluster_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                                jnp.asarray(local)[None, None],
                                                jnp.asarray(ids), clusters, log_t,
                                                samples=seq))
        plain = np.asarray(cluster_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                             jnp.asarray(local)[None, None], jnp.asarray(ids),
                                             clusters, log_t))
        np.testing.assert_array_equal(all_rows, plain)


def test_key_blocks_of_query_blocks_match_a_float64_construction():
    rng, b, h, seq, scores, causal, local, positions = random_blocks_layer()
    for pooled in (False, True):
        for block, log_t in ((4, -1.0), (4, -2.5), (8, -1.5)):
            got = np.asarray(block_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                             jnp.asarray(local)[None, None], positions, block,
                                             log_t, pooled))
            want = np.stack([np.stack([block_keys(scores[i, j].astype(np.float64),
                                                  causal[i, 0], local, block, log_t, pooled)
                                       for j in range(h)]) for i in range(b)])
            np.testing.assert_array_equal(got, want, err_msg=str((pooled, block, log_t)))
    # closed form: blocks of one position choose the pairs the threshold mask keeps outside
    # local (a row's mass on a one-key block is its probability there)
    for log_t in (-1.0, -3.0):
        got = np.asarray(block_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                         jnp.asarray(local)[None, None], positions, 1, log_t))
        want = np.asarray(threshold_mask(jnp.asarray(scores), jnp.asarray(causal), log_t))
        np.testing.assert_array_equal(got, want | (causal & local))


def low_rank(q, k, rank, real):
    """q @ k.T with both projected on the top `rank` eigenvectors of the real keys' Gram matrix
    sum_j k_j k_j^T (float64 numpy; q [S, D], k [S, D], real [S])."""
    keys = k[real]
    _, vectors = np.linalg.eigh(keys.T @ keys)
    basis = vectors[:, k.shape[1] - rank:]
    return (q @ basis) @ (k @ basis).T


def test_low_rank_scores_project_on_the_keys_principal_directions():
    rng = np.random.default_rng()
    b, s, h, g, d = 2, 24, 4, 2, 8
    # keys with a few strong directions, so that the top eigenvectors are well separated
    spread = np.array([8.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.1])
    k = (rng.standard_normal((b, s, g, d)) * spread).astype(np.float32)
    q = rng.standard_normal((b, s, h, d)).astype(np.float32)
    real = rng.random((b, s)) < 0.8
    real[:, 0] = True
    for rank in (1, 3, 8):
        got = np.asarray(low_rank_scores(jnp.asarray(q), jnp.asarray(k), rank,
                                         jnp.asarray(real)))
        want = np.stack([np.stack([low_rank(q[i, :, j].astype(np.float64),
                                            k[i, :, j // (h // g)].astype(np.float64), rank,
                                            real[i]) for j in range(h)]) for i in range(b)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # full rank: the projection is the identity, the scores are q . k
    exact = np.einsum("bshd,bjhd->bhsj", q.astype(np.float64),
                      np.repeat(k, h // g, axis=2).astype(np.float64))
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 8\] \(the head dimension\), "
                                         r"got 9"):
        low_rank_scores(jnp.asarray(q), jnp.asarray(k), 9, jnp.asarray(real))


def test_low_rank_scores_on_a_fitted_basis_project_on_its_directions():
    rng = np.random.default_rng()
    b, s, h, g, d, rank = 2, 24, 4, 2, 8, 3
    spread = np.array([8.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.1])
    fit = (rng.standard_normal((3, s, g, d)) * spread).astype(np.float32)   # other rows' keys
    fit_real = rng.random((3, s)) < 0.8
    k = (rng.standard_normal((b, s, g, d)) * spread).astype(np.float32)
    q = rng.standard_normal((b, s, h, d)).astype(np.float32)
    gram = np.asarray(key_gram(jnp.asarray(fit), jnp.asarray(fit_real)))
    want_gram = np.einsum("bsgd,bsge->bgde", np.where(fit_real[..., None, None], fit, 0.0)
                          .astype(np.float64), np.where(fit_real[..., None, None], fit, 0.0)
                          .astype(np.float64))
    np.testing.assert_allclose(gram, want_gram, rtol=1e-5, atol=1e-3)
    basis = key_basis(jnp.asarray(gram.sum(0)), rank)                     # [G, D, r]
    got = np.asarray(low_rank_scores(jnp.asarray(q), jnp.asarray(k), rank, None, basis=basis))
    for gi in range(g):
        _, vectors = np.linalg.eigh(want_gram.sum(0)[gi])
        proj = vectors[:, d - rank:] @ vectors[:, d - rank:].T          # sign-free projector
        for hi in range(gi * (h // g), (gi + 1) * (h // g)):
            want = (q[:, :, hi].astype(np.float64) @ proj) @ np.swapaxes(
                k[:, :, gi].astype(np.float64) @ proj, -1, -2)
            np.testing.assert_allclose(got[:, hi], want, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"basis has shape \(2, 8, 3\), expected \(kv heads, "
                                         r"head dimension, rank\) = \(2, 8, 4\)"):
        low_rank_scores(jnp.asarray(q), jnp.asarray(k), 4, None, basis=basis)


def test_shared_key_affinity_is_the_overlap_of_two_rows_outside_the_window():
    rng = np.random.default_rng()
    p = rng.random((2, 3, 9, 9)).astype(np.float32)
    outside = rng.random((1, 1, 9, 9)) < 0.6
    got = np.asarray(shared_key_affinity(jnp.asarray(p), jnp.asarray(outside)))
    far = np.where(outside, p.astype(np.float64), 0.0)
    want = np.einsum("bhaj,bhcj->bhac", far, far)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, np.swapaxes(got, -1, -2), rtol=1e-6)


def test_threshold_mask_keeps_the_pairs_whose_probability_passes():
    rng = np.random.default_rng()
    scores = (2 * rng.standard_normal((2, 3, 40, 40))).astype(np.float32)
    causal = np.tril(np.ones((40, 40), bool))[None, None] & (rng.random((2, 1, 1, 40)) < 0.9)
    for log_t in (-1.5, -3.0, -6.0):
        got = np.asarray(threshold_mask(jnp.asarray(scores), jnp.asarray(causal), log_t))
        want = np.stack([np.stack([threshold(scores[b, h].astype(np.float64), causal[b, 0], log_t)
                                   for h in range(3)]) for b in range(2)])
        np.testing.assert_array_equal(got, want)
        # every causal row keeps its own diagonal pair, and only causal pairs are kept
        assert not np.any(got & ~causal)
        diag = np.broadcast_to(causal & np.eye(40, dtype=bool), got.shape)
        assert np.all(got[diag])


def test_spectral_clusters_recover_a_planted_partition():
    rng = np.random.default_rng()
    for trial in range(5):
        sizes = rng.integers(3, 12, size=4)
        labels = np.repeat(np.arange(4), sizes)
        rng.shuffle(labels)
        n = len(labels)
        same = labels[:, None] == labels[None, :]
        w = np.where(same, rng.uniform(0.5, 1.5, (n, n)), rng.uniform(0.0, 0.01, (n, n)))
        got = np.asarray(spectral_clusters(jnp.asarray(w + w.T, jnp.float32)[None], 4,
                                           jax.random.key(trial)))[0]
        # the same groups, whatever their labels
        np.testing.assert_array_equal(got[:, None] == got[None, :], same)
    with pytest.raises(ValueError, match="clusters must be >= 1, got 0"):
        spectral_clusters(jnp.ones((1, 4, 4)), 0, jax.random.key(0))


def test_spectral_clusters_take_each_matrixs_own_count():
    rng = np.random.default_rng()
    counts = np.array([1, 2, 3, 5])
    n = 40
    weights, planted = [], []
    for count in counts:
        labels = rng.permutation(np.arange(n) % count)
        same = labels[:, None] == labels[None, :]
        w = np.where(same, rng.uniform(0.5, 1.5, (n, n)), rng.uniform(0.0, 0.01, (n, n)))
        weights.append(w + w.T)
        planted.append(same)
    got = np.asarray(spectral_clusters(jnp.asarray(np.stack(weights), jnp.float32), 6,
                                       jax.random.key(1), active=jnp.asarray(counts)))
    for ids, same, count in zip(got, planted, counts):
        assert len(np.unique(ids)) == count and ids.max() < count
        np.testing.assert_array_equal(ids[:, None] == ids[None, :], same)


def test_allocated_clusters_invert_the_kept_share_outside_the_window():
    script = load_script()
    rng = np.random.default_rng()
    outside = rng.random((3, 4, 30, 30)) < 0.7
    kept = outside & (rng.random((3, 4, 30, 30)) < rng.uniform(0.0, 1.0, (3, 4, 1, 1)))
    kept[0, 0] = False                               # keeps nothing: the most clusters
    got = np.asarray(script.allocated_clusters(jnp.asarray(kept), jnp.asarray(outside), 16))
    n, k = outside.sum((-2, -1)), kept.sum((-2, -1))
    want = [[16 if k[b, h] == 0 else min(16, max(1, math.floor(n[b, h] / k[b, h] + 0.5)))
             for h in range(4)] for b in range(3)]
    np.testing.assert_array_equal(got, want)
    assert got[0, 0] == 16
    # a ratio of exactly 4.5 rounds up: 9 pairs outside, 2 kept
    outside, kept = np.zeros((1, 1, 5, 5), bool), np.zeros((1, 1, 5, 5), bool)
    outside.reshape(-1)[:9] = True
    kept.reshape(-1)[:2] = True
    assert int(script.allocated_clusters(jnp.asarray(kept), jnp.asarray(outside), 16)[0, 0]) == 5


def test_head_windows_keep_the_share_of_the_mass_with_the_fewest_keys():
    script = load_script()
    rng = np.random.default_rng()
    mass = rng.dirichlet(np.ones(20), size=(3, 4)) * rng.uniform(0.3, 0.9, (3, 4, 1))
    sink_mass = 1.0 - mass.sum(-1)                 # every row's mass sums to one
    for share in (0.0, 0.5, 0.8, 0.95, 1.0):
        got = script.head_windows_for_mass(mass, sink_mass, share)
        for l in range(3):
            for h in range(4):
                kept = [mass[l, h, :w].sum() / (1 - sink_mass[l, h]) for w in range(1, 21)]
                want = next((w for w in range(1, 21) if kept[w - 1] >= share - 1e-12), 20)
                assert got[l, h] == want, (share, l, h)


def test_bisection_finds_the_least_permissive_setting_that_meets_the_target():
    script = load_script()
    # rising (a share of the mass) and falling (a threshold) densities, closed form
    got = script.bisect_for_density(lambda x: x * x, 1.0, 0.0, 0.25, 30, "rising")
    assert 0.5 <= got < 0.5 + 2 ** -29
    got = script.bisect_for_density(lambda t: 1.0 - t, -1.0, 1.0, 0.4, 30, "falling")
    assert 0.6 - 2 ** -28 < got <= 0.6
    with pytest.raises(ValueError, match="rising, the density stays below the target 0.5"):
        script.bisect_for_density(lambda x: 0.1, 1.0, 0.0, 0.5, 3, "rising")



def test_a_threshold_target_beyond_reach_is_refused_by_name(monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "evaluate", lambda *a, **k: {"density": 0.3})
    with pytest.raises(ValueError, match=r"threshold: even at p >= exp\(-40.0\), the density "
                                         r"stays below the target 0.5"):
        script.calibrate_threshold(None, [], 0.5, 3, dict(family="allocated_partition"))
    # a family that searches its own threshold is named as itself
    with pytest.raises(ValueError, match=r"chunk_keys: even at p >= exp\(-40.0\), the density "
                                         r"stays below the target 0.5"):
        script.calibrate_threshold(None, [], 0.5, 3, dict(family="chunk_keys"), own=True)


def test_top_keys_mask_opens_the_most_attended_keys_within_the_budget():
    rng = np.random.default_rng()
    scores = (3 * rng.standard_normal((2, 3, 40, 40))).astype(np.float32)
    causal = np.tril(np.ones((40, 40), bool))[None, None] & (rng.random((2, 1, 1, 40)) < 0.9)
    pos = np.arange(40)
    local = (pos[:, None] - pos[None, :] < 3) | (pos[None, :] < 1)
    for density in (1.0, 0.5, 0.2):
        got = np.asarray(top_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                       jnp.asarray(local)[None, None], density))
        want = np.stack([np.stack([top_keys(scores[b, h].astype(np.float64), causal[b, 0],
                                            local, density) for h in range(3)])
                         for b in range(2)])
        np.testing.assert_array_equal(got, want)
        # the opened keys never take the density past the budget (the local mask alone may)
        kept = got.sum((-2, -1)) / causal.sum((-2, -1))
        local_only = (causal & local).sum((-2, -1)) / causal.sum((-2, -1))
        assert np.all(kept <= np.maximum(density, local_only) + 1e-9)
    # a pair count per (row, head) instead of a density
    pairs = rng.integers(100, 800, size=(2, 3)).astype(np.float32)
    got = np.asarray(top_keys_mask(jnp.asarray(scores), jnp.asarray(causal),
                                   jnp.asarray(local)[None, None], pairs=jnp.asarray(pairs)))
    want = np.stack([np.stack([top_keys(scores[b, h].astype(np.float64), causal[b, 0], local,
                                        None, pairs[b, h]) for h in range(3)])
                     for b in range(2)])
    np.testing.assert_array_equal(got, want)
    assert np.all(got.sum((-2, -1)) <= np.maximum(pairs, (causal & local).sum((-2, -1))))
    with pytest.raises(ValueError, match="give either density or pairs"):
        top_keys_mask(jnp.asarray(scores), jnp.asarray(causal), jnp.asarray(local), 0.5,
                      pairs=jnp.asarray(pairs))


def test_top_fraction_mask_keeps_each_rows_quota_of_highest_scores():
    rng = np.random.default_rng()
    scores = rng.standard_normal((2, 3, 40, 40)).astype(np.float32)
    causal = np.tril(np.ones((40, 40), bool))[None, None] & (rng.random((2, 1, 1, 40)) < 0.9)
    for fraction in (1.0, 0.5, 0.13):
        got = np.asarray(top_fraction_mask(jnp.asarray(scores), jnp.asarray(causal), fraction,
                                           iterations=48))
        want = np.stack([np.stack([top_fraction(scores[b, h], causal[b, 0], fraction)
                                   for h in range(3)]) for b in range(2)])
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\], got 0.0"):
        top_fraction_mask(jnp.asarray(scores), jnp.asarray(causal), 0.0)


def test_clusters_for_meets_the_expected_density_and_refuses_the_impossible():
    script = load_script()
    local = script.local_density(2048, 64, 1)
    c = script.clusters_for(0.25, 2048, 64, 1)
    assert c == 5 and abs(local + (1 - local) / c - 0.25) < 0.01
    with pytest.raises(ValueError, match=r"density 0.05 is at or below the window and sink's own"):
        script.clusters_for(0.05, 2048, 64, 1)


def test_an_unknown_family_is_refused_by_name():
    script = load_script()
    import sweep_runs                  # on the path once the script is loaded
    config = sweep_runs.load_config(str(script.CONFIG), "toy", ["--config.families=window,tree"])
    with pytest.raises(ValueError, match=r"unknown family 'tree' \(known: \('top_fraction', "
                       r"'top_keys', 'threshold', 'head_choice', 'window', 'random_clusters', "
                       r"'spectral_partition', 'allocated_partition', 'allocated_window', "
                       r"'layer_window', 'allocated_top_keys', 'cluster_keys', "
                       r"'chunk_keys', 'chunk_centroid_keys', 'low_rank_keys', 'sampled_keys', "
                       r"'centroid_keys', 'block_keys', 'pooled_keys', 'lagged_keys', "
                       r"'lagged_low_rank_keys', 'low_rank_threshold', "
                       r"'bilinear_threshold'\)\)"):
        script.plan(config)


def test_key_set_settings_below_one_are_refused_by_name():
    script = load_script()
    import sweep_runs                  # on the path once the script is loaded
    for name in ("query_clusters", "key_block", "key_samples", "key_rank", "basis_rows"):
        config = sweep_runs.load_config(str(script.CONFIG), "toy", [f"--config.{name}=0"])
        with pytest.raises(ValueError, match=rf"config.{name} must be >= 1, got 0"):
            script.plan(config)


def test_a_run_stopped_early_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    script = load_script()
    measured, real_evaluate = [], script.evaluate

    def evaluate_then_stop(*args, **kwargs):
        if len(measured) == 3:                 # dense on both corpora, then one window row
            raise KeyboardInterrupt
        measured.append(real_evaluate(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(script, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--toy", "--out", str(tmp_path), "--config.families=window"])
    written = json.loads((tmp_path / "toy.json").read_text())
    assert not written["complete"]
    assert [r["family"] for r in written["rows"]] == ["dense", "dense", "window"]
    assert [r["perplexity"] for r in written["rows"]] == [m["perplexity"] for m in measured]
    dense = written["rows"][0]["perplexity"]
    assert written["rows"][2]["change_pct"] == pytest.approx(
        100 * (measured[2]["perplexity"] / dense - 1))


@pytest.mark.slow
def test_toy_run_matches_a_float64_numpy_llama(tmp_path):
    script = load_script()
    # Every family at one of the toy's two densities (each (family, density) compiles its own
    # forward): 0.5, where top_keys still has the budget to open keys beyond the window.
    overrides = ["--config.densities=0.5"]
    result = script.main(["--toy", "--out", str(tmp_path), *overrides])
    assert (tmp_path / "toy.png").stat().st_size > 0
    written = json.loads((tmp_path / "toy.json").read_text())
    assert written["rows"] == result["rows"] and written["complete"]
    import sweep_runs                  # on the path once the script is loaded
    config = sweep_runs.load_config(str(script.CONFIG), "toy", overrides)
    setup = script.setup_run(script.run_config(config, str(script.CONFIGS / "tiny_random.py"),
                                               tmp_path), install=True)
    weights = load_file(str(tmp_path / "tiny_model" / "model.safetensors"))
    corpora = {script.TRAINING_CORPUS: setup.val_batches, **setup.extra_batches}
    heads, seq = TINY["ARCH"]["num_attention_heads"], config.seq_len
    pos = np.arange(seq)
    families = {r["family"] for r in result["rows"]}
    assert families == {"dense", "top_fraction", "top_keys", "threshold", "head_choice",
                        "window", "random_clusters", "spectral_partition",
                        "allocated_partition", "allocated_window", "layer_window",
                        "allocated_top_keys", "cluster_keys", "chunk_keys",
                        "chunk_centroid_keys", "low_rank_keys", "sampled_keys", "centroid_keys",
                        "block_keys", "pooled_keys", "lagged_keys", "lagged_low_rank_keys",
                        "low_rank_threshold", "bilinear_threshold"}
    # the fitted-basis families' bases: the float64 keys' principal directions on the
    # training rows, per layer and kv head
    groups = TINY["ARCH"]["num_key_value_heads"]
    dim = TINY["ARCH"]["hidden_size"] // heads
    grams = np.zeros((TINY["ARCH"]["num_hidden_layers"], groups, dim, dim))
    # and bilinear_threshold's estimate: per query head, the least-squares rank-r A of the
    # scaled queries' second moment and the keys' covariance on those rows
    q_rows = [[[] for _ in range(heads)] for _ in range(TINY["ARCH"]["num_hidden_layers"])]
    k_rows = [[[] for _ in range(groups)] for _ in range(TINY["ARCH"]["num_hidden_layers"])]

    def gather(layer, head, scores, base, q, k):
        real_rows = base.any(0)
        q_rows[layer][head].append(q[real_rows])
        if head % (heads // groups) == 0:
            kr = k[real_rows]
            grams[layer, head // (heads // groups)] += kr.T @ kr
            k_rows[layer][head // (heads // groups)].append(kr)
        return base

    for batch in eval_batches(setup.train_data, 1, config.basis_rows):
        llama_ce(weights, TINY["ARCH"], np.asarray(batch["input_ids"]),
                 np.asarray(batch["attention_mask"], bool), gather, with_qk=True)
    projector = np.linalg.eigh(grams)[1][..., -config.key_rank:]
    projector = projector @ np.swapaxes(projector, -1, -2)       # [layers, G, D, D]
    bilinear = np.zeros((TINY["ARCH"]["num_hidden_layers"], heads, dim, dim))
    for layer, head in np.ndindex(bilinear.shape[:2]):
        q = np.concatenate(q_rows[layer][head])
        k = np.concatenate(k_rows[layer][head // (heads // groups)])
        k = k - k.mean(0)
        bilinear[layer, head] = np_bilinear(q.T @ q / len(q), k.T @ k / len(k),
                                            config.key_rank)
    for row in result["rows"]:
        setting = next(s for s in script.plan(config) if s["family"] == row["family"]
                       and s["target"] == row["target"])
        setting["log_threshold"] = row["log_threshold"]
        setting["dense_heads"] = row["dense_heads"]
        batches = corpora[row["corpus"]]
        if setting["family"] in ("spectral_partition", "allocated_partition") + KEY_SETS:
            # the partitions (or query groups) the run used
            keys = ("family", "fraction", "window", "sink", "clusters", "steps", "seed",
                    "power_steps", "kmeans_steps", "samples", "block", "rank")
            partitions = script.evaluate(setup.model, batches, record=True,
                                         log_threshold=setting["log_threshold"] or 0.0,
                                         **{k: setting[k] for k in keys})["partitions"]
        allowed = causal = 0.0
        layer_pairs = np.zeros((2, TINY["ARCH"]["num_hidden_layers"]))
        hub_pairs = np.zeros(2)
        total = count = 0.0
        for b, batch in enumerate(batches):
            ids = np.asarray(batch["input_ids"])
            real = np.asarray(batch["attention_mask"], bool)
            if setting["family"] == "random_clusters":
                clusters = [np.asarray(jax.random.randint(
                    jax.random.fold_in(jax.random.key(setting["seed"]), layer),
                    (ids.shape[0], heads, seq), 0, setting["clusters"]))
                    for layer in range(TINY["ARCH"]["num_hidden_layers"])]
            local = ((pos[:, None] - pos[None, :] < setting["window"])
                     | (pos[None, :] < setting["sink"]))

            def mask_of(layer, head, scores, base, q, k, family=setting["family"]):
                nonlocal allowed, causal
                if family == "dense":
                    keep = base
                elif family == "top_fraction":
                    keep = top_fraction(scores, base, setting["fraction"])
                elif family == "window":
                    keep = base & local
                elif family == "top_keys":
                    keep = top_keys(scores, base, local, setting["fraction"])
                elif family == "threshold":
                    keep = threshold(scores, base, setting["log_threshold"])
                elif family == "allocated_top_keys":
                    pairs = threshold(scores, base, setting["log_threshold"]).sum()
                    keep = top_keys(scores, base, local, None, pairs)
                    assert keep.sum() <= max(pairs, (base & local).sum())
                elif family in ("allocated_window", "layer_window"):
                    w = row["head_windows"][layer][head]
                    keep = base & ((pos[:, None] - pos[None, :] < w)
                                   | (pos[None, :] < setting["sink"]))
                elif family == "head_choice":
                    keep = base if setting["dense_heads"][layer][head] else base & local
                elif family in KEY_SETS:
                    g = partitions[b][layer][0, head]
                    if family.startswith("chunk"):       # consecutive blocks of queries
                        np.testing.assert_array_equal(
                            g, pos // -(-seq // setting["clusters"]))
                    if family == "low_rank_keys":    # scores estimated at the setting's rank
                        scores = low_rank(q, k, setting["rank"], base.any(0))
                    keep = key_sets(scores, base, local, g, setting["clusters"],
                                    setting["log_threshold"],
                                    centroid="centroid" in family,
                                    samples=(setting["samples"] if family == "sampled_keys"
                                             else None))
                elif family == "lagged_keys":
                    keep = lagged_keys(scores, base, local, -(-seq // setting["clusters"]),
                                       setting["log_threshold"])
                elif family in ("lagged_low_rank_keys", "low_rank_threshold"):
                    proj = projector[layer, head // (heads // groups)]
                    fitted = (q @ proj) @ (k @ proj).T
                    keep = (lagged_keys(fitted, base, local, -(-seq // setting["clusters"]),
                                        setting["log_threshold"])
                            if family == "lagged_low_rank_keys" else
                            threshold(fitted, base, setting["log_threshold"]) | (base & local))
                elif family == "bilinear_threshold":
                    keep = (threshold(q @ bilinear[layer, head] @ k.T, base,
                                      setting["log_threshold"]) | (base & local))
                elif family in ("block_keys", "pooled_keys"):
                    keep = block_keys(scores, base, local, setting["block"],
                                      setting["log_threshold"], family == "pooled_keys")
                elif family == "spectral_partition":
                    c = partitions[b][layer][0, head]
                    assert len(np.unique(c)) <= setting["clusters"]
                    keep = base & (local | (c[:, None] == c[None, :]))
                elif family == "allocated_partition":
                    # no more clusters than the pairs outside the window over those the
                    # float64 threshold mask keeps there, rounded half up
                    c = partitions[b][layer][0, head]
                    outside = base & ~local
                    kept = (threshold(scores, base, setting["log_threshold"]) & outside).sum()
                    most = (setting["clusters"] if kept == 0 else
                            min(setting["clusters"],
                                max(1, math.floor(outside.sum() / kept + 0.5))))
                    assert len(np.unique(c)) <= most and c.max() < most
                    keep = base & (local | (c[:, None] == c[None, :]))
                else:
                    c = clusters[layer][0, head]
                    keep = base & (local | (c[:, None] == c[None, :]))
                allowed += keep.sum()
                causal += base.sum()
                layer_pairs[:, layer] += keep.sum(), base.sum()
                # pairs outside the sink + window, and those whose key half of its causal
                # queries (or more) may read
                far = keep & ~local
                hub = 2 * keep.sum(0) >= base.sum(0)
                hub_pairs[:] += far.sum(), (far & hub[None, :]).sum()
                return keep

            s, c = llama_ce(weights, TINY["ARCH"], ids, real, mask_of, with_qk=True)
            total, count = total + s, count + c
        assert row["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5), row
        assert row["density"] == pytest.approx(allowed / causal, abs=1e-9), row
        np.testing.assert_allclose(row["density_per_layer"], layer_pairs[0] / layer_pairs[1],
                                   atol=1e-9)
        assert row["hub_share"] == pytest.approx(hub_pairs[1] / max(hub_pairs[0], 1), abs=1e-9)
    # closed forms: every key of the dense mask is read by all of its causal queries; the
    # window family keeps no pair outside its own window; the others fall in between
    for r in result["rows"]:
        if r["family"] == "dense":
            assert r["hub_share"] == 1.0
        if r["family"] == "window":
            assert r["hub_share"] == 0.0
    assert any(0 < r["hub_share"] < 1 for r in result["rows"])
    # the threshold was calibrated on the first in-domain row: its density there meets the
    # target, and the bisection's other bound (one resolution step higher) falls below it
    first = corpora[script.TRAINING_CORPUS][:config.calibration_rows]
    keys = ("fraction", "window", "sink", "clusters", "steps", "seed", "power_steps",
            "kmeans_steps")
    # head_choice keeps dense the heads whose float64 dense attention keeps the least mass
    # inside the sink + window on that row, as many as the target allows (closed form)
    local = ((pos[:, None] - pos[None, :] < config.window) | (pos[None, :] < config.sink))
    kept = np.zeros((TINY["ARCH"]["num_hidden_layers"], heads))
    rows = np.zeros_like(kept)
    window_mass = np.zeros(kept.shape + (seq,))
    sink_mass = np.zeros(kept.shape)

    def record(layer, head, scores, base):
        s = np.where(base, scores, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p = np.where(base, p, 0.0) / np.where(base, p, 0.0).sum(-1, keepdims=True)
        real = base.any(-1)
        kept[layer, head] += (p * local).sum(-1)[real].sum()
        rows[layer, head] += real.sum()
        # the mass each window keeps past the sink (index w - 1 for window w), and the sink's
        sink = pos[None, :] < config.sink
        sink_mass[layer, head] += (p * sink).sum(-1)[real].sum()
        for w in range(1, seq + 1):
            inside = (pos[:, None] - pos[None, :] < w) & ~sink
            window_mass[layer, head, w - 1] += (p * inside).sum(-1)[real].sum()
        return base

    for batch in first:
        llama_ce(weights, TINY["ARCH"], np.asarray(batch["input_ids"]),
                 np.asarray(batch["attention_mask"], bool), record)
    share = (kept / rows).ravel()
    # allocated_window: every head's window is the smallest that keeps the row's share of its
    # float64 dense attention mass outside the sink on that row, and the windows' total
    # density meets the target
    for r in result["rows"]:
        if r["family"] in ("allocated_window", "layer_window") and \
                r["corpus"] == script.TRAINING_CORPUS:
            per_layer = r["family"] == "layer_window"
            if per_layer:                 # one window for every head of a layer
                assert all(len(set(ws)) == 1 for ws in r["head_windows"])
            for layer, head in np.ndindex(kept.shape):
                # the share of the mass outside the sink that window w keeps
                kept_by = (window_mass[layer].mean(0) / (rows[layer, 0] - sink_mass[layer].mean())
                           if per_layer else
                           window_mass[layer, head] / (rows[layer, head] - sink_mass[layer, head]))
                w = r["head_windows"][layer][head]
                assert kept_by[w - 1] >= r["mass_share"] - 1e-5, (layer, head)
                assert w == 1 or kept_by[w - 2] < r["mass_share"] + 1e-5, (layer, head)
            assert np.mean([script.local_density(seq, w, config.sink)
                            for w in np.ravel(r["head_windows"])]) >= r["target"]
    window_only = script.local_density(seq, config.window, config.sink)
    for s in script.plan(config):
        if s["family"] == "head_choice":
            row = next(r for r in result["rows"] if r["family"] == "head_choice"
                       and r["target"] == s["target"])
            n = math.ceil(share.size * (s["target"] - window_only) / (1 - window_only) - 1e-9)
            want = np.zeros(share.size, bool)
            want[np.argsort(share, kind="stable")[:n]] = True
            assert n > 0 and np.array_equal(np.asarray(row["dense_heads"]).ravel(), want)
    for s in script.plan(config):
        if s["family"] == "threshold":
            row = next(r for r in result["rows"] if r["family"] == "threshold"
                       and r["target"] == s["target"])
            step = -script.LOWEST_LOG_THRESHOLD / 2 ** config.threshold_steps
            at, above = (script.evaluate(setup.model, first, log_threshold=lt,
                                         family="threshold", **{k: s[k] for k in keys})
                         ["density"] for lt in (row["log_threshold"],
                                                row["log_threshold"] + step))
            assert at >= s["target"] > above, (at, above)

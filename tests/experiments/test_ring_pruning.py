"""experiments/ring_pruning.py at toy size (8 host CPU devices): its shares against counts made
here from explicit S x S masks of the saved routes, its ring checks and its figure."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("ring_pruning",
                                                  ROOT / "experiments" / "ring_pruning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("ring")
    module.main(["--toy", "--out", str(out), "--config.run.kinds=contiguous",
                 "--config.run.backward=false"])
    result = json.loads((out / "toy.json").read_text())
    return result, dict(np.load(out / "toy.routes.npz")), out


def oracle(digits, n, *, arity, d_max, window, sink):
    """Per (head, a > b) cell: route pairs at the cut, the longest shared prefix of its
    route-eligible pairs (-1: none), and all allowed pairs, by explicit masks."""
    heads, seq, levels = digits.shape
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    local = (j < sink) | (i - j < window)
    eligible = np.broadcast_to((j < i) & ~local & (i // (seq // n) > j // (seq // n)),
                               (heads, seq, seq))
    agree = np.cumprod(digits[:, :, None, :] == digits[:, None, :, :], axis=-1).sum(-1)
    cut = levels - d_max
    allowed = ((j <= i) & (local | (agree >= cut))).sum()
    c = seq // n
    cells = lambda x: x.reshape(heads, n, c, n, c).swapaxes(2, 3)  # noqa: E731
    route = cells(eligible & (agree >= cut)).sum(axis=(3, 4))
    prefix = np.where(cells(eligible), cells(agree), -1).max(axis=(3, 4))
    below = np.tri(n, k=-1, dtype=bool)
    return route[:, below], prefix[:, below], allowed, levels


def test_shares_match_explicit_masks(toy):
    result, routes, _ = toy
    a = result["config"]["analysis"]
    params = dict(arity=a["arity"], d_max=a["d_max"], window=a["window"], sink=a["sink"])
    assert set(result["analysis"]) == set(a["kinds"]) == set(routes)
    nontrivial = 0
    for kind, rows in result["analysis"].items():
        for row, n in zip(rows, a["chunks"]):
            route, prefix, allowed, levels = oracle(routes[kind], n, **params)
            pruned = route == 0
            assert row["n"] == n and row["cells"] == route.size
            assert row["exact"]["head_share"] == pytest.approx(pruned.mean())
            assert row["exact"]["device_pair_share"] == pytest.approx(pruned.all(0).mean())
            assert row["exact"]["dropped_pair_share"] == 0
            for t in row["thresholds"]:
                cut = levels - prefix > t["t"]
                assert t["head_share"] == pytest.approx(cut.mean())
                assert t["dropped_pair_share"] == pytest.approx(route[cut].sum() / allowed)
            at_dmax = row["thresholds"][a["d_max"]]     # the threshold d_max is exact
            assert at_dmax["head_share"] == pytest.approx(pruned.mean())
            nontrivial += 0 < pruned.mean() < 1
            nontrivial += row["thresholds"][0]["dropped_pair_share"] > 0
    assert nontrivial >= 2     # some cells pruned, some kept, some threshold drops pairs


def test_the_ring_matches_the_reference_and_the_figure_is_written(toy):
    result, _, out = toy
    (run,) = result["runs"]
    assert run["devices"] == 8 and run["kind"] == "contiguous"
    assert set(run["variants"]) == {"one_device", "plain_ring", "causal_ring", "pruned_ring"}
    for entry in run["variants"].values():
        assert entry["max_rel_err"] < 1e-5 and 0 < entry["fwd_ms"] < 1e5
    plan = np.array(run["plan"], bool)
    kept = int(plan[np.tri(8, k=-1, dtype=bool)].sum())
    assert run["transfers"] == dict(plain_ring=56, causal_ring=28, pruned_ring=kept,
                                    plain_steps=7, pruned_steps=run["transfers"]["pruned_steps"])
    png = out / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_run_digits_are_the_routes_of_the_trained_layers(toy_run_dir):
    """A run's leaf digits, cut at each layer's k = L - d_max, are the cluster ids its own
    evaluation forward gives (every layer as trained, not re-cut), on scattered routes."""
    spec = importlib.util.spec_from_file_location("ring_pruning",
                                                  ROOT / "experiments" / "ring_pruning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from bench_model_routes import checkpoints_of, perturb_routers, text_tokens
    from ultrametric_jax.run.pipeline import restore_run
    from ultrametric_jax.surgery.inject import extract_routes
    restored = restore_run(checkpoints_of(toy_run_dir))
    perturb_routers(restored.model)          # two toy steps leave the routes collapsed
    digits, surgery = module.restored_digits(restored, 32)
    tokens, _ = text_tokens(restored, None, 32)
    ids = np.asarray(extract_routes(restored.model, tokens[None]).cluster_ids)[:, 0]
    assert digits.shape == ids.shape + (surgery.num_levels,)
    assert digits.min() >= 0 and digits.max() < surgery.arity
    assert all(len(np.unique(layer)) > 1 for layer in ids)
    np.testing.assert_array_equal(module.cut_ids(digits, surgery.arity, surgery.cut_level), ids)

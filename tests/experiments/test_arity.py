"""experiments/arity.py: the matched-cluster and preprint trees against a brute-force search,
and at toy size its JSON against the runs' eval.json and config.json files."""
import json
import math
import pathlib
from fractions import Fraction

import numpy as np
import pytest

from experiment_script import load_experiment

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_script():
    return load_experiment("arity")


def smallest_levels(p, seq):
    return next(L for L in range(1, 64) if p ** L >= seq)


def brute_force_tree(p, clusters, seq):
    """(levels, d_max) over every tree with L >= levels_for(p, seq): the one whose clusters
    per head are closest in ratio to `clusters`, then the shallowest."""
    best = None
    for levels in range(smallest_levels(p, seq), 40):
        for d_max in range(0, levels):
            ratio = Fraction(p ** (levels - d_max), clusters)
            key = (max(ratio, 1 / ratio), levels, levels - d_max)
            if best is None or key < best[0]:
                best = (key, levels, d_max)
    return best[1], best[2]


def test_trees_match_a_brute_force_search():
    arity = load_script()
    rng = np.random.default_rng(7)
    # Random cases, then the ties: p a square and clusters = p**(k + 1/2), equally far in
    # ratio from p**k and p**(k + 1).
    cases = [(int(rng.integers(2, 10)), int(rng.integers(2, 300)), int(rng.integers(2, 5000)))
             for _ in range(30)]
    cases += [(4, 8, 100), (4, 32, 1000), (4, 128, 3000), (9, 27, 50), (9, 243, 4000)]
    for p, clusters, seq in cases:
        tree = arity.matched_tree(p, clusters, seq)
        levels, d_max = brute_force_tree(p, clusters, seq)
        assert math.log(tree["clusters"]) == pytest.approx(math.log(p ** (levels - d_max)))
        assert tree["clusters"] == p ** (tree["levels"] - tree["d_max"])
        assert tree["levels"] >= smallest_levels(p, seq)
        pre = arity.preprint_tree(p, seq)
        assert (pre["levels"], pre["d_max"]) == (smallest_levels(p, seq),
                                                 smallest_levels(p, seq) // 2)
    # The GPU setting: 1024 tokens, 64 clusters (p = 2, L = 10, d_max = 4).
    got = {p: arity.matched_tree(p, 64, 1024) for p in (2, 3, 4, 8)}
    assert {p: (t["levels"], t["d_max"], t["clusters"]) for p, t in got.items()} == {
        2: (10, 4, 64), 3: (7, 3, 81), 4: (5, 2, 64), 8: (4, 2, 64)}
    assert {p: (t["levels"], t["d_max"]) for p, t in
            ((p, arity.preprint_tree(p, 1024)) for p in (2, 3, 4, 8))} == {
        2: (10, 5), 3: (7, 3), 4: (5, 2), 8: (4, 2)}


def test_bad_config_is_refused():
    arity = load_script()
    import sweep_runs  # on sys.path once arity.py is loaded
    config = sweep_runs.load_config(arity.CONFIG, "toy", ["--config.parts=matched,other"])
    with pytest.raises(SystemExit, match="config.parts"):
        arity.plan(config, pathlib.Path("/nonexistent"))
    with pytest.raises(SystemExit, match="unknown config key"):
        sweep_runs.load_config(arity.CONFIG, "toy", ["--config.arity=3"])


@pytest.mark.slow
def test_toy_run_json_holds_the_runs_numbers(tmp_path):
    arity = load_script()
    # One arity, both parts: two runs, not four. p = 3, not the run config's default 2, so that
    # the arity must reach the runs; its matched cut (3 clusters for 4) is rounded.
    argv = ["--toy", "--out", str(tmp_path), "--config.arities=3"]
    result = arity.main(argv)
    assert json.loads((tmp_path / "toy.json").read_text()) == result
    assert (tmp_path / "toy.png").stat().st_size > 10_000
    seq, clusters, density = 32, 4, 0.5            # configs/arity.py, toy
    names = set()
    for row in result["rows"]:
        names.add(row["run"])
        workdir = tmp_path / row["run"]
        ev = json.loads((workdir / "eval.json").read_text())
        run = json.loads((workdir / "config.json").read_text())
        p = row["arity"]
        if row["part"] == "matched":
            levels, d_max = brute_force_tree(p, clusters, seq)
            assert run["objective"]["density_target"] == density
        else:
            levels, d_max = smallest_levels(p, seq), smallest_levels(p, seq) // 2
            assert run["objective"]["density_target"] is None
            assert run["objective"]["kd_weight"] == run["objective"]["recall_weight"] == 0
        assert (ev["surgery"]["arity"], ev["surgery"]["levels"], ev["surgery"]["d_max"]) == (
            p, levels, d_max) == (p, row["levels"], row["d_max"])
        assert run["train"]["seq_len"] == seq and ev["step"] == 4
        r = ev if row["corpus"] == "held out" else ev["by_corpus"][row["corpus"]]
        s = r["surgical"]
        assert row["dense_perplexity"] == r["dense"]["perplexity"]
        assert row["perplexity"] == s["perplexity"] and row["density"] == s["density"]
        assert row["entropy_bits"] == s["routing_entropy_bits_per_level"]
        assert len(row["entropy_bits"]) == levels - d_max
        for level, (h, top) in enumerate(zip(row["entropy_bits"], row["entropy_max_bits"])):
            assert top == pytest.approx((level + 1) * math.log2(p))
            assert 0 <= h <= top + 1e-9
    assert names == {"matched_p3", "preprint_p3"}
    assert {r["corpus"] for r in result["rows"]} == {"held out", "stdlib"}
    assert result["unfinished"] == []

    # A sweep cut short: --report tabulates the finished runs, names the other, starts none.
    cut = tmp_path / "preprint_p3"
    (cut / "eval.json").unlink()
    log_size = (cut / "run.log").stat().st_size
    report = arity.main([*argv, "--report"])
    assert report["unfinished"] == ["preprint_p3"]
    assert report["rows"] == [r for r in result["rows"] if r["run"] != "preprint_p3"]
    assert not (cut / "eval.json").exists() and (cut / "run.log").stat().st_size == log_size
    for name in names - {"preprint_p3"}:
        (tmp_path / name / "eval.json").unlink()
    with pytest.raises(SystemExit, match=r"--report: none of the 2 runs has finished 4 steps"):
        arity.main([*argv, "--report"])

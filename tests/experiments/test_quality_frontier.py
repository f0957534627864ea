"""experiments/quality_frontier.py on synthetic reports: every JSON point against a
recomputation from the files written here, absent recipe files skipped, an empty root refused,
label checks, and the figure written as a PNG."""
import json
import re

import numpy as np
import pytest

from experiment_script import load_experiment

frontier = load_experiment("quality_frontier")
PNG = b"\x89PNG\r\n\x1a\n"


def surgical(rng, layers):
    per_layer = rng.uniform(0.02, 1.0, size=layers)
    return {"perplexity": float(rng.uniform(5, 60)), "density": float(rng.uniform(0.02, 0.95)),
            "tree_density": float(rng.uniform(0.02, 1.0)),
            "density_per_layer": per_layer.tolist(),
            "tree_density_per_layer": rng.uniform(0, 1, size=layers).tolist(),
            "dense_layers": int(rng.integers(0, layers + 1))}


def report(rng, seq_len, corpora, key_rank=None):
    layers = int(rng.integers(2, 7))
    surgery = {"max_len": seq_len, "window": 64}
    if key_rank is not None:
        surgery["key_rank"] = key_rank
    return {"step": int(rng.integers(0, 300)),
            "dense": {"perplexity": float(rng.uniform(5, 60))},
            "surgical": surgical(rng, layers), "surgery": surgery,
            "by_corpus": {name: {"dense": {"perplexity": float(rng.uniform(3, 20))},
                                 "surgical": surgical(rng, layers)} for name in corpora}}


def write(root, rel, data):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def expected(rel, label, data):
    """The points of one report, recomputed from its dict."""
    entries = [("plays", data)] + [(name.rstrip("/").rsplit("/", 1)[-1], e)
                                   for name, e in data["by_corpus"].items()]
    out = []
    for corpus, e in entries:
        d, s = e["dense"]["perplexity"], e["surgical"]["perplexity"]
        layer = e["surgical"]["density_per_layer"]
        out.append(dict(recipe=label, path=rel, step=data["step"],
                        seq_len=data["surgery"]["max_len"], corpus=corpus,
                        density=e["surgical"]["density"],
                        tree_density=e["surgical"]["tree_density"],
                        perplexity_change=s / d - 1, dense_perplexity=d, surgical_perplexity=s,
                        dense_layers=e["surgical"]["dense_layers"],
                        per_layer_density_min=min(layer), per_layer_density_max=max(layer)))
    return out


def test_points_match_the_reports_and_absent_files_are_skipped(tmp_path, capsys):
    rng = np.random.default_rng()
    root = tmp_path / "root"
    files = {  # path -> (recipe label, report)
        "results/quality_1k/ce_balance_eval.json":
            ("CE + balance (routers)", report(rng, 1024, ["stdlib", "/tmp/docs"])),
        "results/quality_sweep/some_knob/eval.json":   # found through the recipe's glob
            ("distillation + budget (routers)", report(rng, 1024, ["/x/y/wiki", "stdlib"])),
        "results/key_selection_gpu/s4k_r16/eval.json":
            ("key selectors, rank 16", report(rng, 4096, ["/tmp/docs"], key_rank=16)),
    }
    for rel, (_, data) in files.items():
        write(root, rel, data)
    out = tmp_path / "out"
    returned = frontier.main(["--root", str(root), "--out", str(out)])
    printed = capsys.readouterr()

    points = json.loads((out / "quality_frontier.json").read_text())
    assert points == returned
    want = [p for rel, (label, data) in files.items() for p in expected(rel, label, data)]
    assert len(points) == len(want) == 3 + 3 + 2
    order = [r.label for r in frontier.RECIPES]
    corpus_order = {"plays": 0, "stdlib": 1, "docs": 2}
    want.sort(key=lambda p: (order.index(p["recipe"]), p["seq_len"],
                             corpus_order.get(p["corpus"], 3), p["corpus"], p["path"]))
    for got, ref in zip(points, want):
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert got[key] == value, key
    assert {p["corpus"] for p in points} == {"plays", "stdlib", "docs", "wiki"}

    # Absent files of the table are notes, not errors; the labels agree here: no warning.
    assert "skipped (absent): key selectors, rank 32:" in printed.err
    assert "results/quality_2k/fb25/eval.json" in printed.err
    assert "WARNING" not in printed.err
    # The table: one row per point, the change in percent.
    rows = [line for line in printed.out.splitlines() if line.startswith("| ") and
            not line.startswith("| recipe")]
    assert len(rows) == len(points)
    for row, p in zip(rows, points):
        assert f"| {100 * p['perplexity_change']:+.1f} |" in row and p["recipe"] in row
    assert (out / "quality_frontier.png").read_bytes()[:8] == PNG


def test_a_report_that_contradicts_its_label_is_flagged(tmp_path, capsys):
    rng = np.random.default_rng()
    root = tmp_path / "root"
    # rank 32 in a rank-16 recipe's folder, and a CE-only config beside a distillation report
    write(root, "results/key_selection_gpu/s2k_r16/eval.json",
          report(rng, 2048, ["stdlib"], key_rank=32))
    write(root, "results/quality_sweep/k/eval.json", report(rng, 1024, []))
    write(root, "results/quality_sweep/k/config.json", {"objective": {"kd_weight": 0.0}})
    points = frontier.collect(root)
    err = capsys.readouterr().err
    assert len(points) == 3
    assert re.search(r"WARNING: results/key_selection_gpu/s2k_r16/eval.json .*key_rank is 32",
                     err)
    assert re.search(r"WARNING: results/quality_sweep/k/eval.json .*kd_weight=0.0", err)


def test_a_root_without_any_report_is_refused_by_name(tmp_path):
    (tmp_path / "results" / "quality_1k").mkdir(parents=True)
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path))):
        frontier.main(["--root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "quality_frontier.json").exists()

"""experiments/bench_routing.py at toy size (CPU): its JSON against a float64 numpy router
recomputed here from the saved inputs and weights."""
import json

import numpy as np
import pytest
from scipy.special import erf

from experiment_script import load_experiment


def numpy_routes(x, w, shape):
    h = x.astype(np.float64) @ w["w1"].astype(np.float64) + w["b1"]
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    logits = h @ w["w2"].astype(np.float64) + w["b2"]
    logits = logits.reshape(*x.shape[:2], shape["heads"], shape["levels"], shape["arity"])
    digits = np.argmax(logits.transpose(0, 2, 1, 3, 4), axis=-1)[..., :shape["cut"]]
    ids = (digits * shape["arity"] ** np.arange(shape["cut"] - 1, -1, -1)).sum(-1)
    return logits.transpose(0, 2, 1, 3, 4), ids


def test_rows_match_a_float64_router(tmp_path):
    script = load_experiment("bench_routing")
    out = tmp_path / "toy.json"
    result = script.main(["--toy", "--seqs", "24,9", "--reps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    arrays = np.load(out.with_suffix(".npz"))
    shape = saved["shape"]
    assert [(r["seq"], r["variant"]) for r in saved["rows"]] == [
        (24, "former"), (24, "current"), (9, "former"), (9, "current")]
    for row in saved["rows"]:
        logits, ids = numpy_routes(arrays[f"x{row['seq']}"], arrays, shape)
        assert len(np.unique(ids)) > 1                          # the routes split
        assert row["ids_equal"] == 1.0                          # float32 keeps every route
        assert 0 < row["logits_max_abs_err"] < 1e-5 * np.abs(logits).max()
        assert row["ms_all_layers"] == pytest.approx(row["ms_per_layer"] * shape["layers"])


@pytest.mark.parametrize("bad, message", [
    ("0,16", "--seqs must be positive lengths, got '0,16'"),
    ("", "--seqs must be positive lengths, got ''"),
    ("a,b", "--seqs must be comma-separated integers, got 'a,b'"),
])
def test_bad_lengths_are_refused(bad, message, capsys):
    script = load_experiment("bench_routing")
    with pytest.raises(SystemExit):
        script.parse_args(["--seqs", bad])
    assert message in capsys.readouterr().err

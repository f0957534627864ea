"""experiments/bench_generate.py at toy size: the two decode loops agree token for token, and
the toy surgical model really differs from the dense one (else the check would prove little)."""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import bench_generate  # noqa: E402

from ultrametric_jax.run.generate import generate  # noqa: E402
from ultrametric_jax.surgery.inject import base_model_mode, evaluation_mode  # noqa: E402


def test_toy_run_writes_equal_tokens_and_times(tmp_path):
    out = tmp_path / "g.json"
    result = bench_generate.main(["--toy", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tokens_equal"] == {"dense": True, "surgical": True}
    assert len(result["rows"]) == 4
    assert all(r["third_s"] > 0 and r["ms_per_step"] > 0 for r in result["rows"])


def test_toy_surgical_model_differs_from_dense():
    model = bench_generate.build(toy=True)
    prompt = [[int(t) for t in np.random.default_rng(1).integers(3, 256, 40)]]
    with evaluation_mode(model):
        surgical = generate(model, prompt, 6, return_logits=True)[1]
        with base_model_mode(model):
            dense = generate(model, prompt, 6, return_logits=True)[1]
    assert np.abs(surgical - dense).max() > 1e-3

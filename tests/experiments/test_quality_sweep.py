"""The sink + window baseline (run/window_baseline.py) against explicit masks and a numpy
float64 Llama, and experiments/quality_sweep.py at toy size: its JSON against the runs'
eval.json files and the baseline's window against a brute-force search."""
import json
import math
import pathlib
import runpy

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ultrametric_jax.io.checkpoints import load_pretrained
from ultrametric_jax.run import evaluate as evaluation
from ultrametric_jax.run import window_baseline as wb

from experiment_script import load_experiment
from numpy_llama import llama_ce

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = runpy.run_path(str(ROOT / "configs" / "tiny_random.py"))


def explicit_mask(seq, window, sink, real=None):
    q, k = np.arange(seq)[:, None], np.arange(seq)[None, :]
    mask = (k <= q) & ((q - k < window) | (k < sink))
    return mask if real is None else mask & real[None, :] & real[:, None]


# ----------------------------------------------------------------------------- closed forms

def test_local_pairs_and_window_for_density_match_a_brute_force_count():
    rng = np.random.default_rng()
    for _ in range(40):
        seq = int(rng.integers(1, 90))
        sink = int(rng.integers(0, 12))
        window = int(rng.integers(1, seq + 5))
        assert wb.local_pairs(seq, window, sink) == explicit_mask(seq, window, sink).sum()
        density = float(rng.uniform(0, 1))
        target = density * seq * (seq + 1) / 2
        counts = np.array([explicit_mask(seq, w, sink).sum() for w in range(1, seq + 1)])
        got = wb.window_for_density(density, seq, sink)
        assert 1 <= got <= seq
        assert abs(counts[got - 1] - target) == pytest.approx(np.abs(counts - target).min())
    # Ties go to the smaller window: with one sink, 49 already reaches every pair of 50 tokens.
    assert wb.window_for_density(1.0, 50, 0) == 50 and wb.window_for_density(1.0, 50, 1) == 49
    assert wb.local_density(50, 49, 1) == 1.0 and wb.window_for_density(0.0, 50, 3) == 1


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="density must lie in"):
        wb.window_for_density(1.5, 10, 1)
    with pytest.raises(ValueError, match="window >= 1"):
        wb.local_pairs(10, 0, 1)


# ----------------------------------------------------------------------------- forward

def numpy_llama_ce(weights, input_ids, real, window, sink):
    """(CE sum, count) of the tiny Llama in float64 with the explicit sink + window mask."""
    local = explicit_mask(input_ids.shape[1], window, sink)
    return llama_ce(weights, TINY["ARCH"], input_ids, real,
                    lambda _layer, _head, _scores, base: base & local)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = TINY["write_model"](str(tmp_path_factory.mktemp("tiny")),
                               seed=int(np.random.default_rng().integers(1000)))
    return load_pretrained(path), load_file(str(pathlib.Path(path) / "model.safetensors"))


def random_batches(rng, n, batch, seq, vocab):
    out = []
    for _ in range(n):
        lengths = rng.integers(seq // 2, seq + 1, size=batch)
        real = np.arange(seq)[None, :] < lengths[:, None]       # right padding
        out.append({"input_ids": rng.integers(3, vocab, size=(batch, seq)).astype(np.int32),
                    "attention_mask": real})
    return out


def test_window_only_perplexity_matches_a_float64_numpy_llama(tiny):
    model, weights = tiny
    rng = np.random.default_rng()
    batches = random_batches(rng, 2, 3, 24, TINY["ARCH"]["vocab_size"])
    for window, sink in ((int(rng.integers(2, 8)), int(rng.integers(0, 4))), (1, 0)):
        got = wb.local_perplexity(model, batches, window=window, sink=sink)
        sums = [numpy_llama_ce(weights, b["input_ids"], b["attention_mask"], window, sink)
                for b in batches]
        loss = sum(s for s, _ in sums) / sum(c for _, c in sums)
        assert got["tokens"] == sum(c for _, c in sums)
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        allowed = sum((explicit_mask(24, window, sink, m)).sum()
                      for b in batches for m in b["attention_mask"])
        causal = sum(explicit_mask(24, 24, 0, m).sum() for b in batches
                     for m in b["attention_mask"])
        assert got["density"] == pytest.approx(allowed / causal)
    # A window as long as the sequence is the dense model itself.
    full = wb.local_perplexity(model, batches, window=24, sink=0)
    assert full["loss"] == pytest.approx(evaluation.perplexity(model, batches)["loss"], rel=1e-6)
    assert full["density"] == 1.0


# ----------------------------------------------------------------------------- the sweep

def load_script():
    return load_experiment("quality_sweep")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    # Two of the toy's three settings (one run each): the default, and target_30 with an
    # objective and a surgery override (d_max_2 would add a third run for one more override).
    result = load_script().main(["--toy", "--out", str(out), "--config.only=default,target_30"])
    return out, result


@pytest.mark.slow
def test_sweep_json_holds_the_runs_eval_json_numbers(sweep):
    out, result = sweep
    assert json.loads((out / "toy.json").read_text()) == result
    assert (out / "toy.png").stat().st_size > 10_000
    settings = {r["setting"] for r in result["rows"]}
    assert settings == {"default", "target_30"}
    for row in result["rows"]:
        ev = json.loads((out / row["setting"] / "eval.json").read_text())
        r = ev if row["corpus"] == "held out" else ev["by_corpus"][row["corpus"]]
        assert row["dense_perplexity"] == r["dense"]["perplexity"]
        assert row["perplexity"] == r["surgical"]["perplexity"]
        assert row["density"] == r["surgical"]["density"]
        assert row["window_only"]["perplexity"] == r["window_only"]["perplexity"]
        # The settings reached the runs.
        run = json.loads((out / row["setting"] / "config.json").read_text())
        assert ev["surgery"]["d_max"] == 1
        assert ev["surgery"]["sink_tokens"] == (2 if row["setting"] == "target_30" else 1)
        assert run["objective"]["density_target"] == (0.3 if row["setting"] == "target_30"
                                                       else None)
        # The baseline's window: the best integer window for the surgical density, by search.
        w = row["window_only"]
        seq, sink = 32, ev["surgery"]["sink_tokens"]
        assert w["sink"] == sink and w["target_density"] == row["density"]
        target = row["density"] * seq * (seq + 1) / 2
        counts = np.array([explicit_mask(seq, x, sink).sum() for x in range(1, seq + 1)])
        assert abs(counts[w["window"] - 1] - target) == pytest.approx(
            np.abs(counts - target).min())
    # Every corpus: the training corpus's held-out split and both extra corpora.
    assert {r["corpus"] for r in result["rows"]} == {"held out", "stdlib",
                                                     str(ROOT / "README.md")}


@pytest.mark.slow
def test_sweep_window_only_perplexity_matches_numpy_on_the_held_out_batches(sweep):
    from ultrametric_jax.run.pipeline import setup_run
    from ultrametric_jax.run.settings import RunConfig
    out, result = sweep
    row = next(r for r in result["rows"] if r["setting"] == "default"
               and r["corpus"] == "held out")
    run = RunConfig.from_dict(json.loads((out / "default" / "config.json").read_text()))
    batches = setup_run(run).val_batches
    weights = load_file(str(out / "tiny_model" / "model.safetensors"))
    w = row["window_only"]
    sums = [numpy_llama_ce(weights, np.asarray(b["input_ids"]),
                           np.asarray(b["attention_mask"], bool), w["window"], w["sink"])
            for b in batches]
    loss = sum(s for s, _ in sums) / sum(c for _, c in sums)
    assert w["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert jnp.isfinite(w["perplexity"])

"""experiments/needle.py at toy size (the session's tiny random run): reachability against an
explicit S x S mask of the saved routes, tree distances by explicit prefix comparison, accuracy
recomputed from the saved replies, and the replies against a cache-free greedy decode."""
import importlib.util
import json
import pathlib
import re
import sys

import numpy as np
import pytest

from conftest import jit_forward

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_run_dir):
    spec = importlib.util.spec_from_file_location("needle", ROOT / "experiments" / "needle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("needle")
    module.main(["--toy", "--run-dir", toy_run_dir, "--out", str(out)])
    return json.loads((out / "toy.json").read_text()), dict(np.load(out / "toy.routes.npz")), out


def digits_of(leaf, arity, levels):
    return np.stack([(leaf // arity ** (levels - 1 - lvl)) % arity for lvl in range(levels)],
                    axis=-1)


def test_reachability_matches_an_explicit_mask(toy):
    result, routes, _ = toy
    (run,) = result["runs"]
    arity, levels, d_max = run["arity"], run["levels"], run["d_max"]
    window, sink = run["window"], run["sink"]
    assert len(result["cases"]) == 2 * 3 and result["lengths"] == [128, 250]
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(pathlib.Path(run["base"]) / "tokenizer.json"))
    shares = []
    for i, (case, got) in enumerate(zip(result["cases"], run["reach"])):
        leaf = routes[f"run0_case{i}"]
        layers, heads, seq = leaf.shape
        assert seq == len(case["ids"]) <= case["length"]
        cut = leaf // arity ** d_max
        q, (start, end) = seq - 1, case["needle"]
        assert tokenizer.decode(case["ids"][start:end]) == f"The pass key is {case['key']}."
        digits = digits_of(leaf, arity, levels)
        for layer in range(layers):
            for h in range(heads):
                qi, kj = np.arange(seq)[:, None], np.arange(seq)[None, :]
                mask = (kj <= qi) & ((cut[layer, h][:, None] == cut[layer, h][None, :])
                                     | (qi - kj < window) | (kj < sink))
                row = mask[q, start:end]
                assert got["reach_any"][layer][h] == row.any()
                assert got["reach_share"][layer][h] == pytest.approx(row.mean())
                dist = []
                for j in range(start, end):
                    shared = 0
                    while shared < levels and digits[layer, h, j, shared] == digits[layer, h, q,
                                                                                    shared]:
                        shared += 1
                    dist.append(levels - shared)
                assert got["min_distance"][layer][h] == min(dist)
                shares.append(row.mean())
    assert 0 < min(shares) < 1 or 0 < max(shares) < 1      # some heads reach part of the needle
    for n, entry in zip(result["lengths"], run["reach_by_length"]):
        rows = [np.mean(e["reach_any"], axis=1) for e, c in zip(run["reach"], result["cases"])
                if c["length"] == n]
        np.testing.assert_allclose(entry["heads_reaching"], np.mean(rows, axis=0))


def test_accuracy_is_recomputed_from_the_replies(toy):
    result, _, _ = toy
    for side in (result["dense"][0], result["runs"][0]):
        ok = []
        for reply, case in zip(side["replies"], result["cases"]):
            m = re.search(r"[0-9]+", reply["text"])
            ok.append(m is not None and m.group(0) == case["key"])
            assert reply["correct"] == ok[-1]
        for i, n in enumerate(result["lengths"]):
            for k, d in enumerate(result["depths"]):
                want = np.mean([o for o, c in zip(ok, result["cases"])
                                if c["length"] == n and c["depth"] == d])
                assert side["accuracy"][i][k] == pytest.approx(want)


def test_replies_match_a_cache_free_greedy_decode(toy):
    from bench_model_routes import checkpoints_of, perturb_routers

    from ultrametric_jax.run.pipeline import restore_run
    from ultrametric_jax.surgery.inject import base_model_mode
    result, _, _ = toy
    restored = restore_run(checkpoints_of(result["runs"][0]["run_dir"]))
    perturb_routers(restored.model)
    model = restored.model
    # The whole prefix through the model at every step (jitted: eager dispatch of a new length
    # every step is what made this slow, not the model), in either mode.
    with base_model_mode(model):
        dense_forward = jit_forward(model)
    surgical_forward = jit_forward(model)
    case = result["cases"][0]
    for reply, forward in ((result["dense"][0]["replies"][0], dense_forward),
                           (result["runs"][0]["replies"][0], surgical_forward)):
        tokens = list(case["ids"])
        for _ in range(len(reply["ids"])):
            logits = forward([tokens])
            tokens.append(int(np.argmax(logits[0, -1])))
        assert tokens[len(case["ids"]):] == reply["ids"] and len(reply["ids"]) > 0


def test_the_figure_is_written(toy):
    _, _, out = toy
    png = out / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

"""experiments/bench_model_routes.py at toy size (CPU, Pallas interpret mode): its JSON against
counts made here in numpy from the saved cluster ids."""
import json
import pathlib

import numpy as np
import pytest

from experiment_script import load_experiment

ROOT = pathlib.Path(__file__).resolve().parents[2]
WINDOW, SINK, BLOCK, SEQ = 4, 1, 16, 40   # configs/tiny_random.py's window, base.py's sink


def load_script():
    return load_experiment("bench_model_routes")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_run_dir):
    bench = load_script()
    workdir = toy_run_dir
    out = tmp_path_factory.mktemp("out") / "toy.json"
    bench.main([workdir, "--toy", "--seq-lens", str(SEQ), "--reps", "1", "--model-reps", "1",
                "--out", str(out)])
    routes = np.load(out.with_suffix(".routes.npz"))[f"S{SEQ}"]
    return bench, workdir, json.loads(out.read_text()), routes


def block_any(mask, block):
    """[S, S] bool -> [nq, nk]: the block holds a True."""
    n = -(-mask.shape[0] // block)
    padded = np.zeros((n * block, n * block), bool)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    return padded.reshape(n, block, n, block).any(axis=(1, 3))


def numpy_counts(ids):
    """(natural blocks, sorted blocks, allowed pairs, tree pairs, causal pairs, causal blocks)
    of one head's ids [S], by explicit masks. The sorted layout's block passes are the tree
    segments and the window band; a sink this narrow runs outside the kernels (jnp)."""
    q, k = np.arange(len(ids))[:, None], np.arange(len(ids))[None, :]
    causal = k <= q
    band = causal & (q - k < WINDOW)
    local = band | (causal & (k < SINK))
    same = causal & (ids[:, None] == ids[None, :])
    s = ids[np.argsort(ids, kind="stable")]
    tree_sorted = causal & (s[:, None] == s[None, :])
    return (block_any(same | local, BLOCK).sum(),
            block_any(tree_sorted, BLOCK).sum() + block_any(band, BLOCK).sum(),
            (same | local).sum(), same.sum(), causal.sum(), block_any(causal, BLOCK).sum())


@pytest.mark.slow
def test_densities_match_a_numpy_count_of_the_routes(toy):
    _, _, result, routes = toy
    assert result["surgery"]["window"] == WINDOW and result["surgery"]["sink"] == SINK
    assert result["block"] == BLOCK
    (entry,) = result["seqs"]
    assert entry["seq"] == SEQ and routes.shape == (2, 1, 4, SEQ)
    assert len(np.unique(routes)) > 1              # the routes split: the counts are not trivial
    for layer, row in zip(routes[:, 0], entry["layers"]):
        c = np.sum([numpy_counts(ids) for ids in layer], axis=0)
        assert row["natural_density"] == pytest.approx(c[0] / c[5], rel=1e-6)
        assert row["sorted_density"] == pytest.approx(c[1] / c[5], rel=1e-6)
        assert row["pair_density"] == pytest.approx(c[2] / c[4], rel=1e-6)
        assert row["tree_pair_density"] == pytest.approx(c[3] / c[4], rel=1e-6)
        assert row["auto_runs_sorted"] == (c[0] / c[5] > 0.25)
    densities = [r["sorted_density"] for r in entry["layers"]]
    assert entry["mean"]["sorted_density"] == pytest.approx(np.mean(densities))


@pytest.mark.slow
def test_timings_checks_and_the_max_len_note(toy):
    _, _, result, _ = toy
    (entry,) = result["seqs"]
    for row in entry["layers"]:
        for layout in ("auto", "sorted", "natural"):
            assert all(0 < row[layout][key] < 1e5 for key in ("fwd_ms", "fwd_bwd_ms"))
    assert set(entry["model_ms"]) == {"surgical_kernel", "dense_base", "dense_base_cudnn"}
    assert all(0 < t < 1e6 for t in entry["model_ms"].values())
    # float32 kernels against the masked dense path; bf16 attention against float32
    assert entry["checks"]["kernel_vs_masked_dense"] < 1e-4
    assert 0 < entry["checks"]["cudnn_vs_xla_base"] < 5e-2
    assert entry["exceeds_max_len"] and result["surgery"]["max_len"] == 32
    assert any(f"S={SEQ} exceeds the run's surgery.max_len=32" in n for n in result["notes"])


@pytest.mark.slow
def test_too_short_text_is_refused(toy, tmp_path):
    bench, workdir, _, _ = toy
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"holds 20 tokens; --seq-lens needs 40: give a "
                       r"longer --text"):
        bench.main([workdir, "--toy", "--seq-lens", str(SEQ), "--text", str(text),
                    "--out", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_saved_routes_are_timed_again_without_the_model(toy, tmp_path):
    bench, _, result, routes = toy
    out = tmp_path / "again.json"
    src = tmp_path / "src.json"
    src.write_text(json.dumps(result))
    np.savez(src.with_suffix(".routes.npz"), **{f"S{SEQ}": routes})
    again = bench.main(["--routes", str(src), "--layouts", "sorted", "--reps", "1",
                        "--block", str(BLOCK), "--out", str(out)])
    (entry,) = again["seqs"]
    assert again["routes_from"] == str(src) and again["step"] == result["step"]
    (old,) = result["seqs"]
    for row, before, ids in zip(entry["layers"], old["layers"], routes[:, 0]):
        c = np.sum([numpy_counts(h) for h in ids], axis=0)
        assert row["sorted_density"] == pytest.approx(c[1] / c[5], rel=1e-6)
        assert row["pair_density"] == before["pair_density"]
        assert set(k for k, v in row.items() if isinstance(v, dict)) == {"sorted"}
        assert 0 < row["sorted"]["fwd_ms"] < 1e5
    assert "model_ms" not in entry and entry["cudnn"]["fwd_ms"] > 0
    saved = json.loads(out.read_text())
    assert saved["seqs"][0]["mean"]["sorted"]["fwd_ms"] == pytest.approx(
        np.mean([r["sorted"]["fwd_ms"] for r in entry["layers"]]))


@pytest.mark.parametrize("argv, message", [
    (["--routes", "x.json", "--toy"], "without RUN_DIR, --toy or --text"),
    (["--routes", "x.json", "--parts", "model"], "--parts model needs the run"),
    (["--toy", "--backends", "cuda"], "--backends must name some of"),
    (["--toy", "--parts", "attention,attention"], "once each"),
    (["--toy", "--parts", "attention", "--profile", "2"], "calls >= 1 with --parts model"),
    (["--toy", "--profile", "-1"], "calls >= 1 with --parts model"),
])
def test_bad_options_are_refused(argv, message, capsys):
    bench = load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_missing_saved_routes_are_named(tmp_path):
    bench = load_script()
    with pytest.raises(SystemExit, match=r"--routes needs an earlier result JSON"):
        bench.main(["--routes", str(tmp_path / "none.json")])


def test_saved_routes_need_no_run_stack():
    """--routes runs where only the kernels' packages are installed (a GPU host carrying a few
    wheels): importing the script loads neither the data pipeline nor the checkpoint readers."""
    import subprocess
    import sys
    heavy = ("grain", "gguf", "ultrametric_jax.run.pipeline", "ultrametric_jax.run.data",
             "ultrametric_jax.run.export")
    code = ("import sys; sys.path.insert(0, 'experiments'); import bench_model_routes; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"

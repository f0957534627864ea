"""experiments/fused_stages.py at toy size (CPU, triton's interpreter, in its own process: triton
reads TRITON_INTERPRET at its first import): the float32 reference check, every variant's
check against the default, and the table's arithmetic."""
import pytest

from experiment_script import EXPERIMENTS, load_experiment, run_toy


@pytest.mark.slow
@pytest.mark.parametrize("split", [[], ["--band-by-position", "1"]])
def test_toy_run_checks_every_variant(tmp_path, split):
    """Each split of the pairs between the tree and band passes (GpuTuning.band_by_position):
    every variant checked, every stage timed."""
    pytest.importorskip("triton")
    proc, result = run_toy(EXPERIMENTS / "fused_stages.py", tmp_path / "fused.json", "--seqs",
                           "64", "--reps", "1", *split)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    script = load_experiment("fused_stages")
    assert result["tuning"] == ({"band_by_position": 1} if split else {})

    reference, *checks = result["correctness"]
    # bf16 kernels against the float32 reference: close, and not trivially equal
    assert 0 < reference["out"] < 2e-2 and 0 < reference["lse"] < 2e-2 and reference["ok"]
    counting, *checks = checks
    # the counting sort's order and starts against the argsort's: equal, slot for slot
    assert counting["what"] == "counting sort vs argsort"
    assert counting["out"] == counting["lse"] == 0 and counting["ok"]
    assert [c["what"] for c in checks] == (
        [f"tree kernel {v} vs default" for v in script.TOY_TREE]
        + [f"band kernel {v} after the tree vs the natural layout" for v in script.TOY_BAND]
        + ["band kernel, tiles first, after the tree vs the natural layout"])
    assert checks[0]["out"] == checks[0]["lse"] == 0.0          # the default against itself
    # the other tree variants against the default, and the band kernels after the tree
    # against the natural layout's block-sparse kernels: the same pairs, summed in another
    # order and split otherwise (bf16 outputs: not bit-equal, close)
    assert all(c["ok"] and max(c["out"], c["lse"]) < 2e-2 for c in checks)
    assert all(max(c["out"], c["lse"]) > 0 for c in checks[len(script.TOY_TREE):])

    rows = result["rows"]
    stages = [r["stage"] for r in rows]
    assert stages[:3] == ["cuDNN causal", "sort", "segment starts"]
    assert stages.count("tree kernel, closed form") == len(script.TOY_TREE)
    assert stages.count("band kernel, closed form") == len(script.TOY_BAND)
    assert "band kernel, closed form, tiles first" in stages
    assert stages.count("sort and starts, counting") == len(script.SORT_VARIANTS)
    assert [r["variant"] for r in rows if r["stage"].startswith("sort and starts, padded")] \
        == ["argsort", "counting, range checked", "counting, num_clusters given"]
    assert [r["variant"].split(" (")[0] for r in rows if r["stage"] == "end to end"][-3:] \
        == ["default, num_clusters given", "default, the order given", "default, argsort"]
    assert all(r["ms"] > 0 for r in rows)
    cudnn = rows[0]["ms"]
    for row in (r for r in rows if r["stage"] == "end to end"):
        assert row["speedup_vs_cudnn"] == pytest.approx(cudnn / row["ms"])
    assert proc.stdout.rstrip().endswith(f"{len(checks) + 2} of {len(checks) + 2} checks "
                                         "within 2e-2")


@pytest.mark.parametrize("argv, message", [
    (["--seqs", "64"], "--seqs must be >= one block (128)"),
    (["--seqs", "8192", "--clusters", "0"], "--clusters >= 1"),
    (["--seqs", "8192"], "the fused forward compiles for a GPU; on this host run --toy")])
def test_bad_options_are_named(argv, message, capsys):
    script = load_experiment("fused_stages")
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

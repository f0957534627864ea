"""experiments/bench_attention.py's rel_err (the error every benchmark's checks report) and
tuning_changes (the --tuning FIELD=INT items of bench_routed, bench_backends and kernel_sass)
with the flag that reads them."""
import argparse

import numpy as np
import pytest
from experiment_script import load_experiment


@pytest.mark.parametrize("got, want, err", [
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.5], 0.5 / 3.5),              # relative to the largest
    ([0.1, 0.2], [0.1, 0.5], 0.3),                              # ... or to 1
    ([-np.inf, 2.0], [-np.inf, 2.5], 0.5 / 2.5),                # rows without a key agree
    ([-np.inf, 2.0], [1.0, 2.0], np.inf),                       # one side without: inf
    ([np.nan, 2.0], [np.nan, 2.0], np.inf),                     # NaN never passes
    ([np.inf, 2.0], [np.inf, 2.0], np.inf)])
def test_rel_err_in_closed_form(got, want, err):
    rel_err = load_experiment("bench_attention").rel_err
    assert rel_err(np.array(got), np.array(want)) == pytest.approx(err, rel=1e-6)


def test_tuning_changes_name_the_bad_item():
    tuning_changes = load_experiment("bench_attention").tuning_changes
    assert tuning_changes(["dq_atomic=1", "band_tile_k=32", "tree_tail=0"]) == {
        "dq_atomic": 1, "band_tile_k": 32, "tree_tail": 0}
    assert tuning_changes([]) == {}
    for item in ("dq_atomic", "fast=1", "dq_atomic=yes"):
        with pytest.raises(ValueError, match=f"--tuning '{item}': expected FIELD=INT with "
                           "FIELD one of GpuTuning's: band_by_position, "):
            tuning_changes([item])
    with pytest.raises(ValueError, match="GpuTuning.dq_atomic must be 0 or 1, got 2"):
        tuning_changes(["dq_atomic=2"])


def test_tuning_flag_adds_up_every_use(capsys):
    bench = load_experiment("bench_attention")
    parser = argparse.ArgumentParser()
    bench.add_tuning_flag(parser, "fields")
    args = parser.parse_args(["--tuning", "dq_atomic=1", "dkv_tile_q=32", "--tuning",
                              "dkv_stages=1"])
    assert bench.parsed_tuning(parser, args.tuning) == {
        "dq_atomic": 1, "dkv_tile_q": 32, "dkv_stages": 1}
    assert bench.parsed_tuning(parser, parser.parse_args([]).tuning) == {}
    with pytest.raises(SystemExit) as exit_info:
        bench.parsed_tuning(parser, ["dkv_tile_q=24"])
    assert exit_info.value.code == 2
    assert "GpuTuning.dkv_tile_q must be a power of two >= 16, got 24" in capsys.readouterr().err

"""experiments/bench_attention.py's rel_err: the error every benchmark's checks report."""
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

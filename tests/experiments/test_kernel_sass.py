"""experiments/kernel_sass.py: the tree kernel compiled for sm_90 on this host (no GPU), its
loops read from the machine code. In its own process: triton compiles only where it was not
imported for its interpreter."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from experiment_script import EXPERIMENTS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")


@pytest.mark.parametrize("slack", [8, 0])
def test_tree_loops_and_the_skipped_rescale(slack, tmp_path):
    """The tree kernel walks three loops (masked, unmasked, masked). With the slack on, each
    holds one branch over its thread's 64 accumulator multiplies (64 query rows x 128 / 128
    threads), so the skipped path issues exactly 64 fewer instructions; with it off, none."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "kernel_sass.py"), "--kernels",
                           "tree", "--rescale-slack", str(slack), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tree | 1 |" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["loop"] for r in rows] == [0, 1, 2]
    pack = 64 if slack else 0
    for r in rows:
        assert r["pack"] == pack
        assert r["instructions"] - r["rescale_skipped"] == pack, r
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
        assert 0 < r["shared"] <= 227 * 1024
    # the middle loop runs the key blocks that need no mask: fewer instructions
    assert rows[1]["instructions"] < min(rows[0]["instructions"], rows[2]["instructions"])

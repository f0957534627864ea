"""experiments/kernel_sass.py: the tree and band kernels compiled for sm_90 on this host (no
GPU), their loops read from the machine code. In its own process: triton compiles only where it
was not imported for its interpreter."""
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
    rows = sass_rows("tree", slack, tmp_path)
    assert [r["loop"] for r in rows] == [0, 1, 2]
    pack = 64 if slack else 0
    for r in rows:
        assert r["pack"] == pack
        assert r["instructions"] - r["rescale_skipped"] == pack, r
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
        assert 0 < r["shared"] <= 227 * 1024
    # the middle loop runs the key blocks that need no mask: fewer instructions
    assert rows[1]["instructions"] < min(rows[0]["instructions"], rows[2]["instructions"])
    if slack:  # the default launch keeps 3 programs (12 warps) per SM: fewer would cost it its
        # latency hiding (a select in the grid's index math once took it to 174 registers, 2)
        assert programs_per_sm(rows[0]) == 3, rows[0]


def test_band_loop_keeps_four_programs_per_sm(tmp_path):
    """The band kernel's default launch (16 positions x 4 heads, 16-key tiles, 4 warps, 3
    stages): its key-tile loop skips the 64 accumulator multiplies like the tree's, and 4
    programs (16 warps) stay resident per SM; a third stage must not cost one of them."""
    (row,) = sass_rows("band", 8, tmp_path)
    assert row["instructions"] - row["rescale_skipped"] == 64, row
    assert row["spill_bytes"] == 0 and row["stages"] == 3, row
    assert programs_per_sm(row) == 4, row


def test_band_by_position_keeps_the_programs_per_sm(tmp_path):
    """With GpuTuning.band_by_position the band kernel reads no cluster ids: fewer
    instructions per key tile than by cluster, 4 programs per SM kept. The tree kernel walks
    four loops: slots and positions tested, none, positions alone (the block inside one
    segment), both; it keeps its 3 programs per SM."""
    (by_cluster,) = sass_rows("band", 8, tmp_path)
    (band,) = sass_rows("band", 8, tmp_path, "band_by_position=1")
    assert band["rescale_skipped"] < by_cluster["rescale_skipped"], (band, by_cluster)
    assert programs_per_sm(band) == 4, band
    tree = sass_rows("tree", 8, tmp_path, "band_by_position=1")
    assert [r["loop"] for r in tree] == [0, 1, 2, 3]
    both, none, alone, _ = (r["rescale_skipped"] for r in tree)
    assert none < alone < both, tree
    assert all(r["spill_bytes"] == 0 for r in tree) and programs_per_sm(tree[0]) == 3, tree


def test_dq_atomic_backward_does_five_products_where_two_kernels_do_seven(tmp_path):
    """GpuTuning.dq_atomic's one backward launch (dkv_dq_kernel), per query block x key tile
    (128 x 128 at D = 128) of its masked and unmasked loops (then the same two for the sink
    parts): the tensor-core work of 5 such products, where dq_kernel's loops do 3 and
    dkv_kernel's 4, and each of the pair's 128 x 128 dq elements added to memory once."""
    rows = sass_rows("dq dkv dkv_dq", 8, tmp_path)
    product = 128 * 128 * 128
    products = {}
    for r in rows:
        assert r["macs"] % product == 0, r
        products.setdefault(r["kernel"], []).append(r["macs"] // product)
    assert products["dq"] == [3, 3] and products["dkv"][:2] == [4, 4], products
    assert products["dkv_dq"] == [5, 5, 10, 5, 5, 10], products  # (the third: the outer loop)
    fused = [r for r in rows if r["kernel"] == "dkv_dq"]
    assert [r["reduced"] for r in fused] == [128 * 128] * 2 + [2 * 128 * 128] + [128 * 128] * 2 \
        + [2 * 128 * 128], fused
    assert all(r["reduced"] == 0 for r in rows if r["kernel"] != "dkv_dq")
    assert 0 < fused[0]["shared"] <= 227 * 1024, fused[0]


def sass_rows(kernel: str, slack: int, tmp_path, *tuning: str) -> list[dict]:
    """kernel_sass.py's rows (one per loop) for the default launch on sm_90 of one kernel (or
    several, named with spaces between), with other GpuTuning fields as FIELD=INT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    out = tmp_path / "rows.json"
    extra = ["--tuning", *tuning] if tuning else []
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "kernel_sass.py"), "--kernels",
                           *kernel.split(), "--rescale-slack", str(slack), "--out", str(out),
                           *extra], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"| {name} | 0 |" in proc.stdout for name in kernel.split())
    return json.loads(out.read_text())


def programs_per_sm(row) -> int:
    """Resident programs per Hopper SM: 64K registers, allocated per warp in 256-register
    units; 228 KB of shared memory, 1 KB of it reserved per program."""
    per_warp = -(-row["registers"] * 32 // 256) * 256
    by_registers = 65536 // (per_warp * row["warps"])
    by_shared = 228 * 1024 // (row["shared"] + 1024)
    return min(by_registers, by_shared, 64 // row["warps"])


@pytest.mark.parametrize("registers, warps, shared, want", [
    (162, 4, 65536, 3), (164, 4, 65536, 3), (168, 4, 65536, 3), (169, 4, 65536, 2),
    (174, 4, 65536, 2), (124, 4, 36864, 4), (64, 4, 16384, 8), (128, 8, 0, 2)])
def test_programs_per_sm_in_closed_form(registers, warps, shared, want):
    assert programs_per_sm(dict(registers=registers, warps=warps, shared=shared)) == want


@pytest.mark.parametrize("opcode, macs, reduced", [
    ("HGMMA.64x128x16.F32.BF16", 64 * 128 * 16 // 4, 0),   # a warpgroup's: 4 warps share it
    ("HGMMA.64x64x16.F32.BF16", 64 * 64 * 16 // 4, 0),
    ("HMMA.16816.F32.BF16", 16 * 8 * 16, 0), ("HMMA.1688.F32.TF32", 16 * 8 * 8, 0),
    ("REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU", 0, 32 * 4), ("RED.E.ADD.F32.FTZ.RN.STRONG.GPU", 0, 32),
    ("REDUX.SUM", 0, 0), ("IMAD.WIDE", 0, 0)])
def test_tensor_core_and_reduction_counts_in_closed_form(opcode, macs, reduced):
    from experiment_script import load_experiment
    sass = load_experiment("kernel_sass")
    assert (sass._warp_macs(opcode), sass._warp_reduced(opcode)) == (macs, reduced)


@pytest.mark.parametrize("argv, message", [
    (["--tuning", "bogus=1"], "--tuning 'bogus=1': expected FIELD=INT with FIELD one of"),
    (["--tuning", "band_warps"], "--tuning 'band_warps': expected FIELD=INT"),
    (["--tuning", "band_warps=3"], "GpuTuning.band_warps must be a positive power of two"),
    (["--tuning", "band_by_position=2"], "GpuTuning.band_by_position must be 0 or 1"),
    # the flag given twice: the first's items count too (argparse's default kept the last)
    (["--tuning", "band_warps=3", "--tuning", "band_by_position=1"],
     "GpuTuning.band_warps must be a positive power of two")])
def test_bad_tuning_is_named(argv, message, capsys):
    from experiment_script import load_experiment
    with pytest.raises(SystemExit) as exit_info:
        load_experiment("kernel_sass").main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

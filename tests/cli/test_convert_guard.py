"""`ultrametric convert` cannot destroy: guarded destinations, staged writes, one-line errors."""
import hashlib
import json
import os
import tempfile

import numpy as np
import pytest

from conftest import hf_logits, rel_err
from ultrametric_jax import load_pretrained
from ultrametric_jax.cli import app as cli


def tree_hashes(root) -> dict:
    """{relative path: sha256} of every file below root."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def convert(capsys, *argv):
    """(exit status, stderr) of `ultrametric convert ARGV`."""
    capsys.readouterr()
    status = cli.main(["convert", *map(str, argv)])
    return status, capsys.readouterr().err


def error_line(err):
    lines = [l.split("\r")[-1] for l in err.split("\n") if l.strip()]
    assert "Traceback" not in err and err.count("ultrametric convert: error: ") == 1, err
    assert lines[-1].startswith("ultrametric convert: error: "), err
    return lines[-1][len("ultrametric convert: error: "):]


def test_non_empty_destination_is_refused_without_overwrite(tiny_hf, tmp_path, capsys):
    _, src = tiny_hf()
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    before = tree_hashes(src), tree_hashes(dst)
    status, err = convert(capsys, src, dst, "--to", "hf")
    assert status == 2
    assert error_line(err) == (f"destination {dst} is not empty; choose a new directory or pass "
                               "--overwrite to replace its contents")
    assert (tree_hashes(src), tree_hashes(dst)) == before
    # An empty destination is fine.
    (dst / "notes.txt").unlink()
    assert convert(capsys, src, dst, "--to", "hf")[0] == 0
    assert os.path.exists(dst / "model.safetensors")


@pytest.mark.parametrize("where", ["same", "inside"])
def test_destination_in_the_source_is_refused(tiny_hf, capsys, where):
    _, src = tiny_hf()
    dst = src if where == "same" else os.path.join(src, "converted")
    before = tree_hashes(src)
    for extra in ([], ["--overwrite"]):
        status, err = convert(capsys, src, dst, "--to", "hf", *extra)
        assert status == 2
        assert error_line(err) == (f"destination {dst} is the source {src} or lies inside it; "
                                   "choose another directory")
    assert tree_hashes(src) == before
    assert not [n for n in os.listdir(os.path.dirname(src)) if n.startswith(".")]


def test_source_inside_the_destination_is_refused_with_overwrite(tiny_hf, tmp_path, capsys):
    _, src = tiny_hf()          # tmp_path/hf_0
    before = tree_hashes(tmp_path)
    status, err = convert(capsys, src, tmp_path, "--to", "hf", "--overwrite")
    assert status == 2
    assert error_line(err) == (f"the source {src} lies inside the destination {tmp_path}, which "
                               "--overwrite would delete; choose another destination")
    assert tree_hashes(tmp_path) == before


def test_overwrite_of_a_sharded_export_leaves_no_stale_shard(tiny_hf, tmp_path, capsys):
    old_hf, old_src = tiny_hf(seed=1)
    new_hf, new_src = tiny_hf(seed=2)
    dst = tmp_path / "out"
    assert convert(capsys, old_src, dst, "--to", "hf", "--max-shard-size", "20KB")[0] == 0
    old_files = set(os.listdir(dst))
    assert "model.safetensors.index.json" in old_files
    src_before = tree_hashes(new_src)
    assert convert(capsys, new_src, dst, "--to", "hf", "--overwrite")[0] == 0
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    assert tree_hashes(new_src) == src_before
    ids = np.random.RandomState(0).randint(0, 96, (1, 9))
    got = np.asarray(load_pretrained(str(dst))(ids))
    assert rel_err(got, hf_logits(new_hf, ids)) <= 1e-4
    assert rel_err(got, hf_logits(old_hf, ids)) > 1e-2
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dir left


def test_failed_convert_leaves_the_old_destination_intact(tiny_hf, tmp_path, capsys):
    _, good = tiny_hf()
    _, bad = tiny_hf()
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 80        # every MLP tensor now has the wrong shape
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    dst = tmp_path / "out"
    assert convert(capsys, good, dst)[0] == 0
    before = tree_hashes(dst)
    status, err = convert(capsys, bad, dst, "--overwrite")
    assert status == 2 and error_line(err).startswith("shape mismatch for tensor ")
    assert tree_hashes(dst) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


@pytest.mark.parametrize("flag, value, message", [
    ("--dtype", "int8", "unknown dtype 'int8'; expected one of ['bf16', 'bfloat16', 'float16', "
                        "'float32', 'fp16', 'fp32']"),
    ("--max-shard-size", "5XB", "invalid size '5XB': expected a positive number of bytes such "
                                "as '5GB', '200MB' or '10KiB'"),
], ids=["dtype", "shard_size"])
def test_bad_arguments_are_one_line_before_reading(tmp_path, capsys, flag, value, message):
    # The source does not exist: the argument is checked before anything is read.
    status, err = convert(capsys, tmp_path / "missing", tmp_path / "dst", flag, value)
    assert status == 2 and error_line(err) == message
    assert not (tmp_path / "dst").exists()


def test_destination_below_a_file_is_one_line(tiny_hf, tmp_path, capsys):
    _, src = tiny_hf()
    (tmp_path / "file").write_text("x")
    dst = tmp_path / "file" / "out"
    status, err = convert(capsys, src, dst)
    assert status == 2
    assert error_line(err) == (f"cannot write to destination {dst}: {tmp_path / 'file'} is not "
                               "a directory")


def test_read_only_destination_is_one_line(tiny_hf, tmp_path, capsys, monkeypatch):
    """A read-only directory (EACCES/EROFS); simulated, as root may write anywhere."""
    _, src = tiny_hf()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    status, err = convert(capsys, src, tmp_path / "ro" / "out")
    assert status == 2
    assert error_line(err) == (f"cannot write to destination {tmp_path / 'ro' / 'out'}: "
                               "Permission denied")

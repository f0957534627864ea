"""Run checkpoints: bit-exact round trip, keep-last-N, corrupt/partial steps skipped, identity,
and the read-only reader (given steps, never touches the directory)."""
import glob
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ultrametric_jax.run.checkpoint import (CheckpointMismatchError, CorruptCheckpointError,
                                            RunCheckpointer, RunCheckpointReader)
from ultrametric_jax.run.provenance import base_model_identity, check_same_base, file_sha256


def _state(seed):
    rng = np.random.default_rng(seed)
    params = {"fc1": {"kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)}}
    opt = optax.adamw(1e-3).init(params)
    return {"router": params, "opt": opt, "rng": jax.random.key(seed),
            "count": jnp.asarray(seed, jnp.uint32)}


def _template():
    return jax.tree.map(jnp.zeros_like, _state(0))


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


BASE = {"path": "/m", "files": {"model.safetensors": "ab" * 32}}


def test_round_trip_is_bit_exact_and_keeps_last_n(tmp_path):
    ckpt = RunCheckpointer(str(tmp_path / "ckpt"), keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), data_state={"epoch": 0, "position": step},
                  base_model=BASE, config={"x": step})
    assert ckpt.all_steps() == [2, 3]
    restored = RunCheckpointer(str(tmp_path / "ckpt"), keep=2).restore_latest(_template())
    assert restored.step == 3
    _equal(restored.state, _state(3))
    assert restored.meta["data_state"] == {"epoch": 0, "position": 3}
    assert restored.meta["base_model"] == BASE and restored.meta["config"] == {"x": 3}
    # The restored key draws the same numbers as the original.
    np.testing.assert_array_equal(jax.random.uniform(restored.state["rng"], (4,)),
                                  jax.random.uniform(jax.random.key(3), (4,)))


def test_empty_directory_restores_nothing(tmp_path):
    assert RunCheckpointer(str(tmp_path / "c"), keep=1).restore_latest(_template()) is None


def _flip_bytes(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:
        data = bytearray(open(f, "rb").read())
        if data:
            data[len(data) // 2] ^= 0xFF
            open(f, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "partial", "no_meta"])
def test_corrupt_or_partial_step_is_skipped_with_warning(tmp_path, damage):
    directory = str(tmp_path / "ckpt")
    ckpt = RunCheckpointer(directory, keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(step), data_state={"position": step}, base_model=BASE)
    latest = os.path.join(directory, "2")
    if damage == "flip":
        _flip_bytes(latest)
    elif damage == "truncate":
        for f in glob.glob(os.path.join(latest, "state", "**"), recursive=True):
            if os.path.isfile(f):
                open(f, "wb").close()
    elif damage == "partial":  # a step directory left without contents
        for name in os.listdir(latest):
            path = os.path.join(latest, name)
            (os.remove if os.path.isfile(path) else __import__("shutil").rmtree)(path)
    else:
        os.remove(os.path.join(latest, "meta", "metadata"))
    reopened = RunCheckpointer(directory, keep=3)
    with pytest.warns(RuntimeWarning, match="skipping corrupt or partial checkpoint step 2"):
        restored = reopened.restore_latest(_template())
    assert restored.step == 1
    _equal(restored.state, _state(1))
    assert reopened.all_steps() == [1]
    assert len(os.listdir(directory + ".corrupt")) == 1
    # Training can go on: the next save of step 2 succeeds and is the latest.
    reopened.save(2, _state(5), data_state={}, base_model=BASE)
    _equal(RunCheckpointer(directory, keep=3).restore_latest(_template()).state, _state(5))


def test_other_state_layout_is_refused(tmp_path):
    ckpt = RunCheckpointer(str(tmp_path / "c"), keep=1)
    ckpt.save(1, {"a": jnp.ones(2)}, data_state={}, base_model=BASE)
    with pytest.raises(CheckpointMismatchError, match="different state layout"):
        ckpt.restore_latest({"a": jnp.ones(2), "b": jnp.ones(1)})


def test_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        RunCheckpointer(str(f), keep=1)


def test_base_identity_is_sha256_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"\x00\x01" * 1000)
    (model / "notes.txt").write_text("not part of the identity")
    ident = base_model_identity(str(model))
    assert ident["path"] == str(model)
    assert ident["files"] == {
        "config.json": hashlib.sha256(b'{"a": 1}').hexdigest(),
        "model.safetensors": hashlib.sha256(b"\x00\x01" * 1000).hexdigest()}
    # Second call is served from the cache: hashing is not redone.
    monkeypatch.setattr(hashlib, "sha256", lambda *a: (_ for _ in ()).throw(AssertionError))
    assert file_sha256(str(model / "config.json")) == ident["files"]["config.json"]
    check_same_base(ident, dict(ident, path="/moved/elsewhere"))
    other = {"path": "/x", "files": {"config.json": "0" * 64}}
    with pytest.raises(CheckpointMismatchError, match="trained on base model"):
        check_same_base(ident, other)


# ----------------------------------------------------------------------------- read-only reader

def _assert_bits_equal(restored, saved):
    """Same structure, and every leaf has the saved dtype, shape and bytes (keys as key data)."""
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(got) == jax.random.key_impl(want)
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        got, want = np.asarray(got), np.asarray(want)
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert got.tobytes() == want.tobytes()


def _listing(root):
    """Every path under root (relative), with the size and mtime of files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out.append((os.path.relpath(os.path.join(dirpath, name), root), "dir"))
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            out.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size,
                        st.st_mtime_ns))
    return sorted(out, key=str)


def _saved_run(directory, steps=(1, 2, 3)):
    ckpt = RunCheckpointer(directory, keep=len(steps))
    for step in steps:
        ckpt.save(step, _state(step), data_state={"epoch": 0, "position": 10 * step},
                  base_model=BASE, config={"x": step})
    ckpt.close()


def test_reader_restores_a_given_step_bit_exact(tmp_path):
    directory = str(tmp_path / "ckpt")
    _saved_run(directory)
    reader = RunCheckpointReader(directory)
    assert reader.all_steps() == [1, 2, 3] and reader.latest_step() == 3
    for step in (2, 1, 3):   # not only the latest
        meta = reader.read_meta(step)
        assert meta["step"] == step
        assert meta["data_state"] == {"epoch": 0, "position": 10 * step}
        assert meta["base_model"] == BASE and meta["config"] == {"x": step}
        restored = reader.restore(step, _template())
        assert restored.step == step and restored.meta == meta
        _assert_bits_equal(restored.state, _state(step))
    reader.close()


def test_reader_refuses_other_layout(tmp_path):
    directory = str(tmp_path / "ckpt")
    _saved_run(directory, steps=(1,))
    with pytest.raises(CheckpointMismatchError, match="checkpoint step 1 .*different state"):
        RunCheckpointReader(directory).restore(1, {"a": jnp.ones(2)})


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_meta", "checksum"])
def test_reader_names_a_corrupt_step_and_moves_nothing(tmp_path, damage):
    directory = str(tmp_path / "ckpt")
    _saved_run(directory)
    step_dir = os.path.join(directory, "2")
    if damage == "flip":
        _flip_bytes(step_dir)
    elif damage == "truncate":
        for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True):
            if os.path.isfile(f):
                open(f, "wb").close()
    elif damage == "no_meta":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    else:  # readable arrays that are not the ones recorded
        path = os.path.join(step_dir, "meta", "metadata")
        meta = json.load(open(path))
        meta["checksum"] = "0" * 64
        json.dump(meta, open(path, "w"))
    before = _listing(tmp_path)
    reader = RunCheckpointReader(directory)
    with pytest.raises(CorruptCheckpointError,
                       match=r"checkpoint step 2 in .*ckpt is (corrupt|unreadable)") as info:
        reader.restore(2, _template())
    assert info.value.step == 2
    if damage == "checksum":
        assert info.value.cause is None
        assert "is corrupt: its arrays do not match their recorded checksum" in str(info.value)
    else:
        assert info.value.cause is not None and "is unreadable" in str(info.value)
    # Neighbouring steps are still served, and nothing was moved aside or pruned.
    _assert_bits_equal(reader.restore(3, _template()).state, _state(3))
    _assert_bits_equal(reader.restore(1, _template()).state, _state(1))
    assert reader.all_steps() == [1, 2, 3]
    reader.close()
    assert _listing(tmp_path) == before
    assert not os.path.exists(directory + ".corrupt")


def test_reader_leaves_partial_and_tmp_steps_alone(tmp_path):
    directory = str(tmp_path / "ckpt")
    _saved_run(directory, steps=(1, 2))
    # What a run killed mid-save leaves: an unfinished temporary step and an empty step dir.
    shutil.copytree(os.path.join(directory, "2"),
                    os.path.join(directory, "3.orbax-checkpoint-tmp-1234567890"))
    os.makedirs(os.path.join(directory, "4"))
    before = _listing(tmp_path)
    reader = RunCheckpointReader(directory)
    steps = reader.all_steps()
    assert 1 in steps and 2 in steps and 3 not in steps
    _assert_bits_equal(reader.restore(2, _template()).state, _state(2))
    reader.read_meta(1)
    reader.close()
    assert _listing(tmp_path) == before
    # A reader on a missing directory creates nothing.
    RunCheckpointReader(str(tmp_path / "missing")).close()
    assert _listing(tmp_path) == before
    # Control: the writer does clean the temporary step, so the check above is not vacuous.
    writer = RunCheckpointer(directory, keep=10)
    writer.save(5, _state(5), data_state={}, base_model=BASE)
    writer.close()
    assert not os.path.exists(os.path.join(directory, "3.orbax-checkpoint-tmp-1234567890"))


def test_checksum_is_public_and_recorded(tmp_path):
    from ultrametric_jax.run.checkpoint import checksum, flatten_tree
    directory = str(tmp_path / "ckpt")
    _saved_run(directory, steps=(1,))
    flat, _ = flatten_tree(_state(1))
    assert RunCheckpointReader(directory).read_meta(1)["checksum"] == checksum(flat)
    name = max(flat, key=lambda k: flat[k].nbytes)
    flat[name] = flat[name].copy()
    flat[name].reshape(-1).view(np.uint8)[0] ^= 1   # one bit of one array
    assert checksum(flat) != checksum(flatten_tree(_state(1))[0])


def test_checkpoint_template_is_the_trainers_layout(tmp_path, monkeypatch):
    """export's restore template and the state the trainer saves have one layout."""
    import runpy

    from ultrametric_jax.cli.options import configs_dir, parse_flags
    from ultrametric_jax.run.checkpoint import flatten_tree
    from ultrametric_jax.run.pipeline import check_mesh, inject, make_trainer, setup_run
    from ultrametric_jax.run.settings import RunConfig
    from ultrametric_jax.run.trainer import checkpoint_template
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tiny = os.path.join(configs_dir(), "tiny_random.py")
    model_dir = runpy.run_path(tiny)["write_model"](str(tmp_path / "tiny"))
    config = RunConfig.from_config_dict(
        parse_flags(["--config", tiny, f"--config.model.path={model_dir}"])[0])
    setup = setup_run(config)
    inject(config, setup.model)
    template = checkpoint_template(config, setup.model)
    trainer = make_trainer(config, setup, check_mesh(config), str(tmp_path / "run"),
                           progress=False)
    try:
        saved = trainer._checkpoint_state()
        assert flatten_tree(template)[1] == flatten_tree(saved)[1]
        for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(saved)):
            assert (a.dtype, a.shape) == (b.dtype, b.shape)
    finally:
        trainer.close()


@pytest.mark.parametrize("reader", [False, True])
def test_transient_read_error_is_raised_and_moves_nothing(tmp_path, monkeypatch, reader):
    """An I/O error says nothing about the step: it is raised, the step stays where it is."""
    import errno
    directory = str(tmp_path / "ckpt")
    _saved_run(directory, steps=(1, 2))
    before = _listing(tmp_path)
    ckpt = RunCheckpointReader(directory) if reader else RunCheckpointer(directory, keep=3)

    def failing_restore(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt._manager, "restore", failing_restore)
    with pytest.raises(OSError, match="Input/output error") as info:
        ckpt.restore_latest(_template())
    assert not isinstance(info.value, CorruptCheckpointError)
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()
    assert _listing(tmp_path) == before
    assert not os.path.exists(directory + ".corrupt")


def test_reader_skips_a_corrupt_newest_step_in_place(tmp_path):
    directory = str(tmp_path / "ckpt")
    _saved_run(directory)
    os.remove(os.path.join(directory, "3", "meta", "metadata"))
    before = _listing(tmp_path)
    reader = RunCheckpointReader(directory)
    with pytest.warns(RuntimeWarning, match=r"skipping corrupt or partial checkpoint step 3 in "
                                            r".*ckpt \(FileNotFoundError: .*\); left in place"):
        restored = reader.restore_latest(_template())
    reader.close()
    assert restored.step == 2
    _assert_bits_equal(restored.state, _state(2))
    assert _listing(tmp_path) == before


def test_restored_arrays_are_placed_like_the_template(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    placement = {"fc1": {"kernel": NamedSharding(mesh, P(None, "b")),
                         "bias": NamedSharding(mesh, P("b"))}}
    ckpt = RunCheckpointer(str(tmp_path / "ckpt"), keep=1)
    ckpt.save(1, _state(1), data_state={}, base_model=BASE)
    template = _template()
    template["router"] = jax.device_put(template["router"], placement)
    template["rng"] = jax.device_put(template["rng"], NamedSharding(mesh, P()))
    template["count"] = jax.device_put(template["count"], jax.devices()[5])
    restored = ckpt.restore_latest(template)
    ckpt.close()
    _equal(restored.state, _state(1))
    for got, ref in zip(jax.tree.leaves(restored.state), jax.tree.leaves(template)):
        assert got.sharding == ref.sharding
    assert restored.state["router"]["fc1"]["bias"].addressable_shards[0].data.shape == (1,)

"""Run checkpoints: bit-exact round trip, keep-last-N, corrupt/partial steps skipped, identity."""
import glob
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ultrametric_jax.run_checkpoint import (CheckpointMismatchError, RunCheckpointer,
                                            base_model_identity, check_same_base, file_sha256)


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

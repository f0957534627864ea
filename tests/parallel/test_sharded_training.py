"""Sharded router training, sharded kernels and checkpoints across meshes, on 8 CPU devices.

The oracle is the same computation on one device: sharding must change where numbers are
computed, never what they are.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels import block_sparse_attention
from pallas_kernels import sharding as kernel_sharding
from ultrametric_jax.parallel import sharding
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.model.llama import LlamaForCausalLM
from ultrametric_jax.surgery.router import RouterParam
from ultrametric_jax.run.checkpoint import RunCheckpointer
from ultrametric_jax.surgery.inject import inject_topology, set_attention_impl
from ultrametric_jax.run.step import MUTABLE, make_grad_fn, make_train_step

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
CONFIG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                     max_position_embeddings=64)
SURGERY = SurgeryConfig(arity=2, levels=3, d_max=1, max_len=64, window=2, sink_tokens=1,
                        init_margin=1.0, tau_steps=10, lambda_ramp_steps=0)


def surgical_model(seed=0):
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(seed))
    inject_topology(model, SURGERY, nnx.Rngs(params=seed + 1, gumbel=seed + 2))
    # Move the routers off the collapse point so that routes (and gradients) are non-trivial.
    for path, var in nnx.iter_graph(model):
        if isinstance(var, RouterParam):
            key = jax.random.key(hash(str(path)) % (2 ** 31))
            var.set_value(var.get_value() + 0.5 * jax.random.normal(key, var.get_value().shape))
    model.train()
    return model


def batch():
    ids = jax.random.randint(jax.random.key(7), (8, 16), 0, CONFIG.vocab_size)
    mask = jnp.ones((8, 16), bool).at[5, 12:].set(False)   # one padded row
    return np.asarray(ids), np.asarray(mask)


def loss_and_grads(model, ids, mask, mesh=None):
    if mesh is not None:
        sharding.shard_module(model, mesh)
        ids, mask = sharding.global_batch(ids, mesh), sharding.global_batch(mask, mesh)
    graphdef, params, mutable, frozen = nnx.split(model, RouterParam, MUTABLE, ...)
    grad_fn = jax.jit(make_grad_fn(graphdef))
    (loss, (scalars, _)), grads = grad_fn(params, mutable, frozen, ids, mask, 0.5)
    return loss, scalars, grads, params


@pytest.fixture(scope="module")
def single_device():
    ids, mask = batch()
    loss, scalars, grads, _ = loss_and_grads(surgical_model(), ids, mask)
    return ids, mask, float(loss), jax.device_get(scalars), jax.device_get(grads)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_loss_and_router_gradients_equal_single_device(single_device, shape):
    ids, mask, loss_1, scalars_1, grads_1 = single_device
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    loss, scalars, grads, params = loss_and_grads(surgical_model(), ids, mask, mesh)
    assert 0.0 < float(scalars["density"]) < 1.0       # routes are really sparse
    np.testing.assert_allclose(float(loss), loss_1, rtol=1e-5)
    leaves_1, leaves = jax.tree.leaves(grads_1), jax.tree.leaves(grads)
    assert len(leaves) == len(leaves_1) > 0
    assert any(np.abs(g).max() > 0 for g in leaves_1)
    for g1, g in zip(leaves_1, leaves):
        np.testing.assert_allclose(np.asarray(g), g1, rtol=1e-5, atol=1e-7)
    # The router parameters really are sharded as their logical axes say.
    fc1 = [v for p, v in nnx.iter_graph(params) if isinstance(v, RouterParam)
           and p[-2:] == ("fc1", "kernel")][0].get_value()
    expected = sharding.logical_to_spec(("embed", "router_hidden"), fc1.shape, mesh)
    assert fc1.sharding.spec == expected


@pytest.mark.slow
def test_sharded_train_step_equals_single_device():
    ids, mask = batch()
    # SGD keeps the update proportional to the gradient; Adam's first step g/|g| would turn
    # rounding-level differences of near-zero gradients into full-size update differences.
    tx = optax.sgd(1e-2)
    results = []
    for mesh in (None, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        model = surgical_model()
        ids_, mask_ = ids, mask
        if mesh is not None:
            sharding.shard_module(model, mesh)
            ids_, mask_ = sharding.global_batch(ids, mesh), sharding.global_batch(mask, mesh)
        graphdef, params, mutable, frozen = nnx.split(model, RouterParam, MUTABLE, ...)
        step = make_train_step(graphdef, tx, lambda s: 0.5, lambda s: 0.1)
        out = step(params, tx.init(params), mutable, frozen, jnp.int32(0),
                   ids_[None], mask_[None])
        results.append(jax.device_get((out[0], out[3])))
    (p1, m1), (p8, m8) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m1["grad_norm"] > 0
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_checkpoint_written_on_one_mesh_restores_on_another(tmp_path):
    model = surgical_model()
    sharding.shard_module(model, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    params = nnx.state(model, RouterParam)
    ckpt = RunCheckpointer(str(tmp_path / "ckpt"), keep=1)
    ckpt.save(3, {"router": params}, data_state={"position": 0}, base_model={"path": "x"})
    # The template lives on another mesh; the restored arrays are placed as it is.
    other = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    template = nnx.state(surgical_model(seed=5), RouterParam)
    template = jax.device_put(template, sharding.state_shardings(template, other))
    restored = ckpt.restore_latest({"router": template})
    ckpt.close()
    assert restored.step == 3
    placed = restored.state["router"]
    before = jax.tree.leaves(params)
    after = jax.tree.leaves(placed)
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    fc1 = [v for p, v in nnx.iter_graph(placed) if isinstance(v, RouterParam)
           and p[-2:] == ("fc1", "kernel")][0].get_value()
    assert fc1.sharding.mesh.shape == other.shape
    assert fc1.sharding.spec == P("fsdp", "tensor")


@pytest.mark.parametrize("shape,hq,hkv", [((2, 1, 4), 8, 4), ((1, 2, 2), 4, 2)])
def test_kernel_under_shard_map_equals_unsharded_call(shape, hq, hkv):
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices)
    b, s, d = 4, 40, 16
    keys = jax.random.split(jax.random.key(11), 4)
    q = jax.random.normal(keys[0], (b, s, hq, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.float32)
    clusters = jax.random.randint(keys[3], (b, hq, s), 0, 3).astype(jnp.int32)
    kw = dict(window=3, sink_tokens=1, backend="gpu", interpret=True, block_q=16, block_k=16)
    expected = block_sparse_attention(q, k, v, clusters, clusters, **kw)
    act, ids = kernel_sharding.attention_specs(mesh)
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    out = jax.jit(lambda *a: kernel_sharding.sharded_block_sparse_attention(mesh, *a, **kw))(
        place(q, act), place(k, act), place(v, act), place(clusters, ids), place(clusters, ids))
    assert out.sharding.spec == act
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 4), (1, 2, 2)])
def test_sharded_model_runs_the_kernel_per_device(shape):
    """A model placed on a mesh, evaluated with the kernel under shard_map, gives the logits
    of the unsharded dense evaluation path."""
    ids, _ = batch()
    model = surgical_model(seed=3)
    model.eval()
    dense = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(ids)))
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)),
                              jax.devices()[:int(np.prod(shape))])
    sharding.shard_module(model, mesh)
    set_attention_impl(model, "kernel", mesh=mesh, backend="gpu", interpret=True,
                       block_q=16, block_k=16)
    ids = sharding.global_batch(ids, mesh)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda st, i: nnx.merge(graphdef, st)(i))(state, ids)
    assert str(jaxpr).count("shard_map") == CONFIG.num_hidden_layers
    got = nnx.jit(lambda m, i: m(i))(model, ids)
    assert got.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(np.asarray(got), dense, rtol=0, atol=1e-5 * np.abs(dense).max())


def test_shard_map_rejects_heads_the_tensor_axis_cannot_split():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    q = jnp.ones((2, 8, 6, 4))
    k = jnp.ones((2, 8, 2, 4))
    c = jnp.zeros((2, 6, 8), jnp.int32)
    with pytest.raises(kernel_sharding.KernelShardingError, match="must divide both the query heads"):
        kernel_sharding.sharded_block_sparse_attention(mesh, q, k, k, c, c, window=1, sink_tokens=1)


# ----------------------------------------------------------------------------- the trainer

def _tiny_run_config(model_dir, *overrides):
    import os

    from ultrametric_jax.cli.options import configs_dir, parse_flags
    from ultrametric_jax.run.settings import RunConfig
    tiny = os.path.join(configs_dir(), "tiny_random.py")
    config, _, _ = parse_flags(["--config", tiny, f"--config.model.path={model_dir}",
                                *[f"--config.{o}" for o in overrides]])
    return RunConfig.from_config_dict(config)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import os
    import runpy

    from ultrametric_jax.cli.options import configs_dir
    write = runpy.run_path(os.path.join(configs_dir(), "tiny_random.py"))["write_model"]
    return write(str(tmp_path_factory.mktemp("tiny")))


def _trainer(config, workdir):
    """The pipeline's trainer of a fresh setup (mesh checked first, as a run does)."""
    from ultrametric_jax.run.pipeline import check_mesh, inject, make_trainer, setup_run
    mesh = check_mesh(config)
    setup = setup_run(config)
    inject(config, setup.model)
    return make_trainer(config, setup, mesh, str(workdir), progress=False)


def _train(config, workdir):
    trainer = _trainer(config, workdir)
    try:
        outcome = trainer.train()
    finally:
        trainer.close()
    return trainer, outcome


@pytest.mark.slow
def test_trainer_on_a_mesh_matches_one_device(tiny_model_dir, tmp_path):
    steps = ["train.steps=1", "checkpoint.every=1"]
    single, out_1 = _train(_tiny_run_config(tiny_model_dir, *steps), tmp_path / "one")
    sharded, out_8 = _train(_tiny_run_config(tiny_model_dir, *steps, "mesh.data=2",
                                             "mesh.fsdp=-1", "mesh.tensor=2"), tmp_path / "mesh")
    assert dict(sharded.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    for key in ("loss", "ce", "balance_loss", "grad_norm"):
        np.testing.assert_allclose(out_8.last_metrics[key], out_1.last_metrics[key], rtol=1e-5)
    q = sharded.model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor")


def test_trainer_rejects_a_batch_the_mesh_cannot_split(tiny_model_dir, tmp_path):
    from ultrametric_jax.errors import ConfigError
    config = _tiny_run_config(tiny_model_dir, "mesh.data=-1", "train.batch_size=4")
    with pytest.raises(ConfigError, match="must split evenly over the 8 data-parallel devices"):
        _train(config, tmp_path)


def _key_data(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), tree)


@pytest.mark.slow
def test_mesh_run_compiles_its_step_once_and_resumes_in_place(tiny_model_dir, tmp_path, caplog):
    """A (2,2,2) run stopped right after saving step 3 (written once step 4 has shown the
    state sound), then resumed to step 6 in the same process, compiles its train step once,
    also for the trial step that confirms the final state; the resumed state is the saved one,
    bit for bit, with every optimiser moment sharded like its parameter."""
    import logging

    config = _tiny_run_config(tiny_model_dir, "train.steps=6", "checkpoint.every=3",
                              "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")

    class Killed(Exception):
        pass

    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        first = _trainer(config, tmp_path)
        save, written = first.save, []

        def save_then_die(snapshot):
            save(snapshot)
            written.append(snapshot)
            raise Killed

        first.save = save_then_die
        with pytest.raises(Killed):
            first.train()
        assert first.step == 4 and [s.step for s in written] == [3]
        saved = _key_data(written[0].state)
        first.close()
        second = _trainer(config, tmp_path)
        assert second.restore() == 3
        restored = _key_data(second._checkpoint_state())
        outcome = second.train()
        second.close()
    compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
    assert (outcome.step, outcome.resumed_from) == (6, 3)
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
    # Oracle: each parameter's spec from its logical axes; Adam's moments must match it.
    mesh = second.mesh
    expected = {path: sharding.logical_to_spec(sharding.variable_logical_axes(var),
                                               var.get_value().shape, mesh)
                for path, var in nnx.to_flat_state(second.params)}
    assert any(spec != P() for spec in expected.values())
    adam = [s for s in jax.tree.leaves(second.opt_state,
                                       is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moments in (adam[0].mu, adam[0].nu):
        placed = dict(nnx.to_flat_state(moments))
        assert placed.keys() == expected.keys()
        for path, var in placed.items():
            assert var.get_value().sharding.mesh.shape == mesh.shape
            assert var.get_value().sharding.spec == expected[path], path
    count = adam[0].count
    assert count.sharding.is_fully_replicated and count.sharding.mesh.shape == mesh.shape

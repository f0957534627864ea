"""Mesh construction, logical-axis rules and parameter placement."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ultrametric_jax.parallel import sharding
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.model.llama import LlamaForCausalLM

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]


def tiny_config(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    base.update(kw)
    return LlamaConfig(**base)


def test_eight_devices_available():
    assert jax.device_count() >= 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("request_, devices, expected", [
    ({"data": -1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
    ({"tensor": 4, "data": -1}, 8, (2, 1, 4)),
    ({"data": 1, "fsdp": 2, "tensor": 4}, 8, (1, 2, 4)),
    ({"data": 2, "tensor": 2}, 8, (2, 1, 2)),   # a sub-mesh of the first four devices
])
def test_mesh_shape_fills_one_axis(request_, devices, expected):
    assert sharding.mesh_shape(request_, devices) == expected


@pytest.mark.parametrize("request_, devices, message", [
    ({"data": -1, "tensor": -1}, 8, "at most one mesh axis may be -1"),
    ({"data": 3, "tensor": -1}, 8, "not divisible"),
    ({"data": 4, "tensor": 4}, 8, "needs 16 devices, but 8 are available"),
    ({"model": 2}, 8, "unknown mesh axes"),
    ({"data": 0}, 8, "positive or -1"),
])
def test_mesh_shape_errors(request_, devices, message):
    with pytest.raises(sharding.ShardingError, match=message):
        sharding.mesh_shape(request_, devices)


def test_mesh_without_fill_takes_the_first_devices():
    mesh = sharding.make_mesh({"data": 2, "tensor": 2})
    assert mesh.devices.size == 4
    assert set(mesh.devices.flat) == set(jax.devices()[:4])


def test_logical_to_spec_rules_and_indivisible_dims():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    assert sharding.logical_to_spec(("embed", "heads"), (32, 64), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    # 9 heads cannot be split four ways: replicated, not an error.
    assert sharding.logical_to_spec(("embed", "heads"), (32, 9), mesh) == P("fsdp", None)
    # A mesh axis is used once per array.
    assert sharding.logical_to_spec(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)
    with pytest.raises(sharding.ShardingError, match="logical axis 'bogus' has no rule"):
        sharding.logical_to_spec(("bogus",), (8,), mesh)


@pytest.mark.parametrize("shape", MESHES)
def test_llama_parameters_carry_their_shardings(shape):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    model = LlamaForCausalLM(tiny_config(), rngs=nnx.Rngs(0))
    reference = jax.device_get(nnx.state(model, nnx.Param))
    sharding.shard_module(model, mesh)
    data, fsdp, tensor = shape
    attn = model.model.layers[0].self_attn
    q_kernel = attn.q_proj.kernel[...]
    expected_q = P("fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None)
    assert q_kernel.sharding.spec == expected_q
    # Each device holds exactly its block of the kernel.
    assert q_kernel.addressable_shards[0].data.shape == (32 // fsdp, 32 // tensor)  # 8 heads * 4
    k_kernel = attn.k_proj.kernel[...]  # 4 kv heads * 4 = 16 columns
    assert k_kernel.addressable_shards[0].data.shape == (32 // fsdp, 16 // tensor)
    assert model.model.norm.weight[...].sharding.spec == P(None) or \
        model.model.norm.weight[...].sharding.is_fully_replicated
    # Placement never changes a value.
    placed = jax.device_get(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(placed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_global_batch_splits_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    local = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    arr = sharding.global_batch(local, mesh)
    assert arr.sharding.spec == P(("data", "fsdp"), None)
    assert arr.addressable_shards[0].data.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(arr), local)


def test_global_batch_splits_the_batch_dimension_it_is_given():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = np.arange(2 * 8 * 3, dtype=np.int32).reshape(2, 8, 3)   # [accum, batch, seq]
    arr = sharding.global_batch(batch, mesh, batch_dim=1)
    assert arr.shape == batch.shape
    assert arr.sharding.spec == P(None, ("data", "fsdp"), None)
    for shard in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch[shard.index])
        assert shard.data.shape == (2, 2, 3)


def test_distributed_initialize_takes_the_launcher_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("ULTRAMETRIC_DISTRIBUTED", raising=False)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.maybe_initialize_distributed() is False and calls == []
    monkeypatch.setenv("ULTRAMETRIC_DISTRIBUTED", "1")
    assert sharding.maybe_initialize_distributed() is True
    assert calls[-1] == {}                  # nothing set: jax discovers the cluster itself
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", " 2 ")
    monkeypatch.delenv("ULTRAMETRIC_DISTRIBUTED")
    assert sharding.maybe_initialize_distributed() is True   # the coordinator variable asks
    assert calls[-1] == {"coordinator_address": "host0:1234", "num_processes": 4,
                         "process_id": 2}
    sharding.maybe_initialize_distributed(True, process_id=0)    # an explicit argument wins
    assert calls[-1] == {"coordinator_address": "host0:1234", "num_processes": 4,
                         "process_id": 0}
    assert sharding.maybe_initialize_distributed(False) is False and len(calls) == 3


@pytest.mark.parametrize("var", ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"])
def test_distributed_environment_must_hold_integers(monkeypatch, var):
    from ultrametric_jax.errors import ConfigError
    monkeypatch.setattr(jax.distributed, "initialize",
                        lambda **kwargs: pytest.fail("initialised despite a bad variable"))
    monkeypatch.setenv(var, "two")
    with pytest.raises(ConfigError, match=f"environment variable {var}='two' must be an integer"):
        sharding.maybe_initialize_distributed(True)


def test_sharded_forward_equals_single_device():
    cfg = tiny_config()
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(1))
    ids = jax.random.randint(jax.random.key(2), (8, 16), 0, cfg.vocab_size)
    expected = np.asarray(model(ids))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharding.shard_module(model, mesh)
    got = nnx.jit(lambda m, x: m(x))(model, sharding.global_batch(np.asarray(ids), mesh))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)

"""Device mesh, logical axis rules and partition specs (MaxText style).

Every parameter carries logical axis names as NNX metadata (`out_sharding`, e.g.
("embed", "heads") for q_proj's kernel). A rule table maps each logical name to a mesh axis
(or None). The mesh has three axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters sharded along their `embed` dimension
  tensor  tensor parallelism over heads, kv heads, the MLP width and the vocabulary
A logical dimension whose size the mesh axis does not divide is replicated instead (a 9-head
model on tensor=2, say), so any model runs on any mesh.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ultrametric_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (a name, a tuple of names, or None to replicate).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("router_hidden", "tensor"),
    ("router_out", None),
    ("length", None),
    ("norm", None),
)

log = logging.getLogger(__name__)


class ShardingError(ValueError):
    """The mesh request cannot be satisfied; the message says why."""


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a {data, fsdp, tensor} request with at most one -1 into concrete sizes."""
    unknown = [k for k in axis_sizes if k not in MESH_AXES]
    if unknown:
        raise ShardingError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ShardingError(
                f"cannot fill mesh axis {MESH_AXES[fill[0]]!r}: {num_devices} devices are not "
                f"divisible by the other axes' product {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) > num_devices:
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(axis_sizes: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). -1 fills the remainder;
    without -1 the mesh takes the first data x fsdp x tensor devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(axis_sizes or {"data": -1}), len(devices))
    devices = devices[:math.prod(shape)]
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-physical device counts (CPU tests) fall back to a plain reshape
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _rule_table(rules: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {name: axes for name, axes in rules}


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def logical_to_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Iterable[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Maps logical dimension names to a PartitionSpec, replicating what the mesh cannot divide.

    A mesh axis is used at most once per array (the first dimension that asks for it wins).
    """
    table = _rule_table(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape):
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(a for a in names if a not in used and mesh.shape.get(a, 1) > 1)
        if names and size % _axis_size(mesh, names) == 0:
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    return PartitionSpec(*out)


def variable_logical_axes(var: nnx.Variable) -> Optional[tuple]:
    """The logical names a Variable was annotated with (flax renamed the key over versions)."""
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names:
            return tuple(names)
    return None


def _value_of(var: nnx.Variable):
    return var.get_value() if hasattr(var, "get_value") else var.value


def _variable_sharding(var: nnx.Variable, mesh: Mesh, rules) -> NamedSharding:
    shape = getattr(_value_of(var), "shape", ())
    names = variable_logical_axes(var)
    if names is None or len(names) != len(shape):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def state_shardings(tree: Any, mesh: Mesh,
                    rules: Iterable[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """The NamedSharding of every array of a pytree of NNX state (an nnx.State, or an optimiser
    state whose moments are States): a Variable's from its logical axes, any other array (an
    optimiser's step count, say) replicated. The result has the tree's structure, so it serves
    as jax.jit in/out shardings and as jax.device_put's target."""
    rules = tuple(rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(_variable_sharding(leaf, mesh, rules))
        return replicated

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh,
                 rules: Iterable[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> nnx.Module:
    """Places every array of `module` on `mesh` according to its logical axes, in place."""
    rules = tuple(rules)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable) and hasattr(_value_of(node), "shape"):
            placed = jax.device_put(_value_of(node), _variable_sharding(node, mesh, rules))
            if hasattr(node, "set_value"):
                node.set_value(placed)
            else:
                node.value = placed
    return module


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: data x fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Batch-major arrays: dimension `batch_dim` over (data, fsdp), the rest replicated."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
    if axes is not None and len(axes) == 1:
        axes = axes[0]
    spec = [None] * ndim
    spec[batch_dim] = axes
    return NamedSharding(mesh, PartitionSpec(*spec))


def global_batch(local: np.ndarray, mesh: Mesh, batch_dim: int = 0) -> jax.Array:
    """The global array of a batch from this process's share of it (the rows its data shard
    yields; with one process, the whole batch), split over the mesh's data-parallel axes: the
    global batch dimension is the processes' shares concatenated in process order."""
    local = np.asarray(local)
    sharding = batch_sharding(mesh, local.ndim, batch_dim)
    return jax.make_array_from_process_local_data(sharding, local)


def mesh_from_config(mesh_config: Mapping[str, int]) -> Mesh:
    """The mesh a run's `config.mesh` ({data, fsdp, tensor}, -1 fills) asks for."""
    return make_mesh({a: int(mesh_config.get(a, 1)) for a in MESH_AXES})


# jax.distributed.initialize argument <- the environment variable that supplies it.
DISTRIBUTED_ENV = (("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
                   ("num_processes", "JAX_NUM_PROCESSES"),
                   ("process_id", "JAX_PROCESS_ID"))


def distributed_arguments(environ: Mapping[str, str]) -> dict:
    """The jax.distributed.initialize arguments the launcher set as environment variables
    (only those that are set); a non-integer count or id is a ConfigError naming it."""
    kwargs = {}
    for arg, var in DISTRIBUTED_ENV:
        text = environ.get(var, "").strip()
        if text and arg == "coordinator_address":
            kwargs[arg] = text
        elif text:
            try:
                kwargs[arg] = int(text)
            except ValueError:
                raise ConfigError(f"environment variable {var}={text!r} must be an "
                                  "integer") from None
    return kwargs


def maybe_initialize_distributed(enabled: Optional[bool] = None, **kwargs) -> bool:
    """Calls jax.distributed.initialize() when asked by config or environment.

    Asked when `enabled` is True, or when it is None and the launcher set
    ULTRAMETRIC_DISTRIBUTED=1 (or JAX_COORDINATOR_ADDRESS). The coordinator address, process
    count and process id come from `kwargs`, else from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID where set; on TPU pod slices and SLURM/Open MPI GPU
    clusters jax discovers whatever is left unset.
    """
    if enabled is None:
        enabled = (os.environ.get("ULTRAMETRIC_DISTRIBUTED") == "1"
                   or "JAX_COORDINATOR_ADDRESS" in os.environ)
    if not enabled:
        return False
    jax.distributed.initialize(**{**distributed_arguments(os.environ), **kwargs})
    log.info("jax.distributed initialised: process %d of %d, %d global devices",
             jax.process_index(), jax.process_count(), jax.device_count())
    return True

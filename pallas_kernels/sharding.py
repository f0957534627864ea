"""The kernels on a device mesh: block_sparse_attention (or routed_attention) run per device
under shard_map.

A Pallas call is opaque to the SPMD partitioner, so on a mesh each device runs the kernel on its
own slice. Attention is independent per (sequence, head): the batch splits over `batch_axes` and
the heads over `head_axis`, with no communication (as splash attention owns its sharding).
"""
from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels.ops import block_sparse_attention
from pallas_kernels.routed import routed_attention


class KernelShardingError(ValueError):
    """The mesh cannot split this attention call (e.g. heads not divisible by the head axis)."""


def attention_specs(mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp"),
                    head_axis: str = "tensor") -> tuple[PartitionSpec, PartitionSpec]:
    """Specs of [B,S,heads,D] activations and [B,heads,S] cluster ids: batch over batch_axes,
    heads over head_axis (axes of size 1, or absent from the mesh, are left out)."""
    batch = tuple(a for a in batch_axes if mesh.shape.get(a, 1) > 1) or None
    if batch is not None and len(batch) == 1:
        batch = batch[0]
    heads = head_axis if mesh.shape.get(head_axis, 1) > 1 else None
    return PartitionSpec(batch, None, heads, None), PartitionSpec(batch, heads, None)


def _check_head_split(mesh, head_axis, q, k):
    tensor = mesh.shape.get(head_axis, 1)
    hq, hkv = q.shape[2], k.shape[2]
    if hq % tensor or hkv % tensor:
        raise KernelShardingError(
            f"{head_axis} axis of size {tensor} must divide both the query heads ({hq}) and the "
            f"kv heads ({hkv}) to shard attention over heads")


def _per_device(mesh, attention, q, k, v, ids, *, batch_axes, head_axis, return_lse):
    """attention(q, k, v, *ids) per device of mesh; ids are [B, heads, S] arrays."""
    _check_head_split(mesh, head_axis, q, k)
    act, id_spec = attention_specs(mesh, batch_axes, head_axis)
    lse_spec = PartitionSpec(act[0], act[2], None)  # lse is [B, heads, S]
    out_specs = (act, lse_spec) if return_lse else act
    return jax.shard_map(attention, mesh=mesh, in_specs=(act, act, act) + (id_spec,) * len(ids),
                         out_specs=out_specs, check_vma=False)(q, k, v, *ids)


def sharded_block_sparse_attention(mesh: Mesh, q, k, v, q_clusters, k_clusters, *,
                                   batch_axes: Sequence[str] = ("data", "fsdp"),
                                   head_axis: str = "tensor", **kwargs):
    """block_sparse_attention(q, k, v, q_clusters, k_clusters, **kwargs) per device of `mesh`.

    With GQA the head axis must divide the kv heads: query head h uses kv head h // (Hq // Hkv),
    and contiguous head slices keep each group whole.
    """
    def local(q, k, v, qc, kc):
        return block_sparse_attention(q, k, v, qc, kc, **kwargs)

    return _per_device(mesh, local, q, k, v, (q_clusters, k_clusters), batch_axes=batch_axes,
                       head_axis=head_axis, return_lse=kwargs.get("return_lse", False))


def sharded_routed_attention(mesh: Mesh, q, k, v, clusters, *,
                             batch_axes: Sequence[str] = ("data", "fsdp"),
                             head_axis: str = "tensor", **kwargs):
    """routed_attention(q, k, v, clusters, **kwargs) per device of `mesh` (the split of
    sharded_block_sparse_attention). The sort, gathers and schedules are per (batch, head), so
    each device sorts its own slice; layout="auto" decides per device."""
    def local(q, k, v, clusters):
        return routed_attention(q, k, v, clusters, **kwargs)

    return _per_device(mesh, local, q, k, v, (clusters,), batch_axes=batch_axes,
                       head_axis=head_axis, return_lse=kwargs.get("return_lse", False))

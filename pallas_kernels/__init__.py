"""pallas_kernels: exact block-sparse flash attention from cluster ids (GPU and TPU Pallas).

  reference_attention     dense jnp oracle (small sequences)
  build_schedule          block lists from cluster ids (BlockSchedule)
  natural_density_bound   a cheap upper bound on that schedule's density (layout choice)
  block_sparse_attention  the kernels, with a custom VJP
  routed_attention        self-attention on scattered routes (cluster-sorted layout)
  init_route_cache        a decode cache paged per cluster (decode.append, decode_attention)
  allowed_pairs           the token-level mask every path reproduces
  GpuTuning               the GPU kernels' tiles and variants (gpu_tuning=)
"""
from pallas_kernels.config import GpuTuning
from pallas_kernels.decode import RouteCache, decode_attention, init_route_cache
from pallas_kernels.masking import allowed_pairs
from pallas_kernels.ops import attention_with_schedule, block_sparse_attention
from pallas_kernels.reference import reference_attention
from pallas_kernels.routed import routed_attention
from pallas_kernels.schedule import BlockSchedule, build_schedule, natural_density_bound
from pallas_kernels.segment_schedule import band_schedule, segment_schedule
from pallas_kernels.sharding import sharded_block_sparse_attention, sharded_routed_attention

__all__ = ["allowed_pairs", "attention_with_schedule", "band_schedule", "block_sparse_attention",
           "reference_attention", "routed_attention", "segment_schedule",
           "sharded_block_sparse_attention", "sharded_routed_attention", "BlockSchedule",
           "build_schedule", "natural_density_bound", "RouteCache", "decode_attention",
           "init_route_cache", "GpuTuning"]

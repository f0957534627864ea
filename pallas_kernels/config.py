"""Static description of one attention call, shared by the kernels of every backend."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.common import cdiv
from pallas_kernels.validation import check_block_size, check_num_ids


@dataclasses.dataclass(frozen=True)
class GpuTuning:
    """Launch parameters of the GPU kernels. Each kernel walks the schedule's blocks in
    sub-tiles (divisors of block_q / block_k) so that its tiles fit registers and shared memory.
    The defaults are the fastest of a sweep on an H200 (bf16, D=128, 128 x 128 blocks); band_*
    and tree_* are those of the sorted layout's fused forward (experiments/fused_stages.py).

    Tiles are powers of two >= 16 (Triton's dot needs 16), so a tile either covers its
    power-of-two block or divides it; warps are powers of two and stages at least 1."""
    fwd_tile_k: int = 128
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_tile_q: int = 128
    dq_tile_k: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    dkv_tile_q: int = 64
    dkv_tile_k: int = 128
    dkv_warps: int = 8
    dkv_stages: int = 2
    band_tile_q: int = 16      # the sorted layout's window + sink pass (triton band_fwd_kernel)
    band_tile_k: int = 16
    band_warps: int = 4
    band_stages: int = 3
    band_heads: int = 4        # query heads of one kv group per band program (a power of two)
    tree_tile_q: int = 64      # the sorted layout's tree pass (triton segment_fwd_kernel):
    tree_tile_k: int = 32      # its query and key blocks, warps and stages
    tree_warps: int = 4
    tree_stages: int = 3
    tree_prefetch: int = 1     # 1: the tree pass loads each key block's order one block ahead
    tree_tail: int = 512       # programs the tree grid runs last: its cheapest query blocks (the
                               # first of each head), so the grid ends on short programs; 0: none
    rescale_slack: int = 8     # tree and band softmax: the running max moves only past this
                               # (base 2); 0: every tile (triton_kernels._online_softmax)
    band_by_position: int = 0  # 1: the band pass takes every window and sink pair, reading
                               # no ids, and the tree pass leaves them out; 0: the band takes
                               # other clusters' pairs only, the tree every same-cluster pair
    dq_atomic: int = 0         # 1: the backward is one launch (dkv_dq_kernel) that adds each
                               # tile's dq into float32 with atomics: 5 matrix products per
                               # tile, not 7; 0: separate dq and dk/dv kernels (deterministic)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"GpuTuning.{name} must be an int, got {type(value).__name__}")
            power_of_two = value > 0 and not value & (value - 1)
            if ("_tile" in name) and not (power_of_two and value >= 16):
                raise ValueError(f"GpuTuning.{name} must be a power of two >= 16, got {value}")
            if name.endswith(("_warps", "_heads")) and not power_of_two:
                raise ValueError(f"GpuTuning.{name} must be a positive power of two, got {value}")
            if name.endswith("_stages") and value < 1:
                raise ValueError(f"GpuTuning.{name} must be >= 1, got {value}")
            if name == "tree_tail" and value < 0:
                raise ValueError(f"GpuTuning.tree_tail must be >= 0, got {value}")
            if name == "rescale_slack" and not 0 <= value <= 16:
                raise ValueError(f"GpuTuning.rescale_slack must be in [0, 16] (the weights "
                                 f"stay below 2^slack), got {value}")
            if name.endswith(("_prefetch", "_by_position", "_atomic")) and value not in (0, 1):
                raise ValueError(f"GpuTuning.{name} must be 0 or 1, got {value}")

    @classmethod
    def for_dtype(cls, dtype, **changes):
        """The defaults for 2-byte inputs; 4-byte tiles need twice the shared memory, so
        float32 runs narrow, single-stage tiles. changes: fields set on top of them, e.g.
        GpuTuning.for_dtype(q.dtype, dq_atomic=1)."""
        if jnp.dtype(dtype).itemsize <= 2:
            return cls(**changes)
        return dataclasses.replace(cls._float32(), **changes)

    @classmethod
    def _float32(cls):
        return cls(fwd_tile_k=32, fwd_warps=4, fwd_stages=1, dq_tile_q=32, dq_tile_k=32,
                   dq_warps=4, dq_stages=1, dkv_tile_q=32, dkv_tile_k=32, dkv_warps=4,
                   dkv_stages=1, band_tile_q=32, band_tile_k=32, band_warps=4, band_stages=1,
                   band_heads=1, tree_tile_q=32, tree_tile_k=32, tree_warps=4, tree_stages=1)


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
    """Launch parameters of backend="mosaic" (mosaic_gpu.py): the number of shared-memory slots
    of the key/value ring (capped by what fits), whether the two consumer warpgroups ping-pong,
    whether the grid is persistent (ctas CTAs, default one per SM, each looping over query
    blocks) rather than one CTA per query block, and which kernels run the backward: "triton"
    (through jax_triton where it runs, else "pallas"), "pallas" (gpu.py) or "mosaic"
    (mosaic_gpu_bwd.py; 128 x 128 blocks). The defaults are the fastest measured on the H200
    (BENCHMARKS.md): the persistent grid and the Mosaic backward were slower there."""
    stages: int = 2
    pingpong: bool = True
    persistent: bool = False
    ctas: int | None = None
    backward: str = "triton"

    def __post_init__(self):
        for name in ("stages", "ctas"):
            value = getattr(self, name)
            if value is None and name == "ctas":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MosaicTuning.{name} must be an int >= 1, got {value!r}")
        if self.backward not in ("triton", "pallas", "mosaic"):
            raise ValueError(f"MosaicTuning.backward must be 'triton', 'pallas' or 'mosaic', "
                             f"got {self.backward!r}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Everything static about a call. Lengths are the real (unpadded) ones; the arrays handed
    to the kernels are padded to whole blocks. exclude_same_cluster switches the token mask to
    the local pairs of other clusters (masking.allowed_pairs); every block is then masked."""
    q_len: int
    kv_len: int
    q_offset: int
    window: int
    sink_tokens: int
    scale: float
    block_q: int
    block_k: int
    interpret: bool = False
    gpu: GpuTuning = GpuTuning()
    exclude_same_cluster: bool = False
    mosaic: MosaicTuning = MosaicTuning()
    # > 0: the cluster ids are promised in [0, num_ids) (routed_attention's num_clusters)
    num_ids: int = 0

    def __post_init__(self):
        check_block_size("block_q", self.block_q)
        check_block_size("block_k", self.block_k)
        check_num_ids(self.num_ids)

    @property
    def num_q_blocks(self):
        return cdiv(self.q_len, self.block_q)

    @property
    def num_k_blocks(self):
        return cdiv(self.kv_len, self.block_k)

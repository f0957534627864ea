"""Static description of one attention call, shared by the kernels of every backend."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuTuning:
    """Launch parameters of the GPU kernels. The backward kernels walk the schedule's blocks in
    sub-tiles (a divisor of block_q / block_k) to keep their accumulators in registers."""
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_tile_q: int = 64
    dq_tile_k: int = 64
    dq_warps: int = 4
    dq_stages: int = 2
    dkv_tile_q: int = 64
    dkv_tile_k: int = 64
    dkv_warps: int = 4
    dkv_stages: int = 2


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Everything static about a call. Lengths are the real (unpadded) ones; the arrays handed
    to the kernels are padded to whole blocks."""
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

    @property
    def num_q_blocks(self):
        return -(-self.q_len // self.block_q)

    @property
    def num_k_blocks(self):
        return -(-self.kv_len // self.block_k)

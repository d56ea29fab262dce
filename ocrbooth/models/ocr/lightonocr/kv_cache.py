"""KV-cache bookkeeping (pure: no torch): the paged layout's sizes, memory sizing, and the block allocator.

The cache is one pool of fixed-size blocks (`block_size` token positions of every layer's K and V). A page
reserves the blocks for its whole prompt plus its output budget when it is admitted and returns them the
moment it finishes, so admission never has to preempt anyone. Block 0 is never handed out: idle decode slots
write their (ignored) keys there, so a block that was freed and given to another page is never overwritten.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

TRASH_BLOCK = 0  # the block idle slots write into; never allocated


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape of the decoder's KV cache."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_size: int

    @property
    def bytes_per_token(self) -> int:
        """K and V of every layer for one position."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)


def kv_budget_bytes(
    *, total_bytes: int, free_bytes: int, used_bytes: int, activation_bytes: int, fraction: float, margin_bytes: int
) -> int:
    """Bytes the KV cache may take: what is left of `fraction` of the card after what this process already
    holds (weights, `used_bytes`) and its peak activations, and never more than is free now (other processes
    may share the card), `margin_bytes` kept back for the allocator's fragmentation and CUDA graphs."""
    by_fraction = int(total_bytes * fraction) - used_bytes - activation_bytes - margin_bytes
    by_free = free_bytes - activation_bytes - margin_bytes
    return max(0, min(by_fraction, by_free))


class BlockAllocator:
    """Free list of KV blocks; all or nothing per request."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(b for b in range(num_blocks) if b != TRASH_BLOCK)

    @property
    def capacity(self) -> int:
        """Blocks a single request could ever get."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

"""Paged KV-cache bookkeeping: a block allocator with a free list and reference counts, and the block
table of one sequence (logical page -> physical page), with copy-on-write of a shared partial page.

A prompt shared by n traces is prefilled once; every trace then *forks* its block table (one more
reference on each page). Full pages stay shared for ever (they are never written again); the last,
partial page is copied the first time a trace writes into it while another holder still references it.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """No free KV page is left (raise num_blocks or lower max_num_seqs)."""


class BlockAllocator:
    """Fixed pool of ``num_blocks`` KV pages of ``block_size`` tokens.

    ``allocate()`` takes a page from the free list with one reference; ``incref`` adds a holder;
    ``free`` drops one and returns the page to the free list when none is left. ``num_allocated`` /
    ``num_freed`` count page allocations and returns over the allocator's life, so a run that released
    everything leaves ``num_allocated == num_freed`` and ``num_free == num_blocks``."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockAllocator: expected positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.num_allocated = 0
        self.num_freed = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"out of KV pages: all {self.num_blocks} blocks of {self.block_size} tokens are in use")
        b = self._free.popleft()
        self._refs[b] = 1
        self.num_allocated += 1
        return b

    def incref(self, block: int) -> None:
        if self._refs[block] <= 0:
            raise RuntimeError(f"incref of free block {block}")
        self._refs[block] += 1

    def free(self, block: int) -> None:
        if self._refs[block] <= 0:
            raise RuntimeError(f"double free of block {block}")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)
            self.num_freed += 1


class BlockTable:
    """The pages of one sequence and the number of tokens whose keys/values they hold."""

    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.blocks: list[int] = []
        self.num_tokens = 0

    def fork(self) -> "BlockTable":
        """A new table sharing every page (one more reference each)."""
        t = BlockTable(self.allocator)
        for b in self.blocks:
            self.allocator.incref(b)
        t.blocks = list(self.blocks)
        t.num_tokens = self.num_tokens
        return t

    def blocks_needed(self, n_new: int) -> int:
        """Fresh pages that appending ``n_new`` tokens would take (a copy-on-write page counted)."""
        bs = self.allocator.block_size
        total = -(-(self.num_tokens + n_new) // bs) - len(self.blocks)
        if n_new and self.num_tokens % bs and self.allocator.refcount(self.blocks[-1]) > 1:
            total += 1
        return total

    def append_slots(self, n_new: int, copy_block) -> list[int]:
        """Reserve cache slots (``block * block_size + offset``) for the next ``n_new`` tokens, allocating
        pages as needed. If the partial last page is shared, it is first copied into a private page by
        ``copy_block(src, dst)`` (copy-on-write)."""
        a, bs = self.allocator, self.allocator.block_size
        if n_new and self.num_tokens % bs and a.refcount(self.blocks[-1]) > 1:
            src = self.blocks[-1]
            dst = a.allocate()
            copy_block(src, dst)
            a.free(src)
            self.blocks[-1] = dst
        slots = []
        for pos in range(self.num_tokens, self.num_tokens + n_new):
            if pos // bs == len(self.blocks):
                self.blocks.append(a.allocate())
            slots.append(self.blocks[pos // bs] * bs + pos % bs)
        self.num_tokens += n_new
        return slots

    def release(self) -> None:
        for b in self.blocks:
            self.allocator.free(b)
        self.blocks = []
        self.num_tokens = 0

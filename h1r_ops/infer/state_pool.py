"""The Mamba decode states of all live sequences: one pool of slots per layer, indexed per sequence.

conv[layer]: (num_slots, conv_dim, d_conv - 1) in the model dtype; ssm[layer]: (num_slots, heads,
head_dim, d_state) in ``ssm_dtype`` (the Engine passes the model dtype unless told otherwise, as
transformers' cache and vLLM's ``mamba_ssm_cache_dtype="auto"``; a 16-bit state halves the largest
per-trace memory and the bytes each decode step streams, at the cost of rounding the recurrent state at
every step; fp32 keeps it unrounded). The batched decode ops read/write the rows named by ``conv_state_indices`` /
``state_batch_indices``, so sequences keep their slot while others join and leave.
"""

from __future__ import annotations

import torch


class StatePool:
    def __init__(self, cfg, num_slots: int, dtype: torch.dtype, device, ssm_dtype: torch.dtype = torch.float32):
        self.num_slots = num_slots
        L = cfg.num_hidden_layers
        self.conv = torch.zeros(L, num_slots, cfg.conv_dim, cfg.mamba_d_conv - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(L, num_slots, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state,
                               dtype=ssm_dtype, device=device)
        self._free = list(range(num_slots - 1, -1, -1))
        self.num_allocated = 0
        self.num_freed = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"out of Mamba state slots (all {self.num_slots} in use)")
        self.num_allocated += 1
        return self._free.pop()

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"double free of state slot {slot}")
        self.num_freed += 1
        self._free.append(slot)

    def copy(self, src: int, dst: int) -> None:
        """Copy the conv and SSM states of every layer from slot ``src`` to ``dst`` (a trace forking a prompt)."""
        self.conv[:, dst].copy_(self.conv[:, src])
        self.ssm[:, dst].copy_(self.ssm[:, src])

    def bytes_per_slot(self) -> int:
        return (self.conv[:, 0].numel() * self.conv.element_size() + self.ssm[:, 0].numel() * self.ssm.element_size())

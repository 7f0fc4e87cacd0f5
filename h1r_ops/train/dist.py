"""Data parallelism on torch.distributed (gloo on CPU, nccl on GPU), DDP-style but explicit.

The trainers normalize every loss by a GLOBAL token count (all-reduced before the backward), so each rank's
loss is ``local_token_sum / global_count`` and the gradients are SUMMED over ranks: the result is the
per-token mean over the whole global batch, whatever the split of tokens between ranks. (Equivalently,
DDP's mean over ranks of ``local_token_sum * world / global_count``, the verl / prime-rl formulation.)
Grads are flattened into one buffer per dtype so each step does one all-reduce per dtype."""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def init_from_env(backend: str | None = None) -> bool:
    """Initialize the default process group when launched by torchrun (WORLD_SIZE set); returns whether
    the run is distributed. Backend: nccl when CUDA is available, else gloo (or ``backend``)."""
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend)
    return True


def shutdown() -> None:
    """Wait for every rank (e.g. rank 0's evaluation) and tear the process group down."""
    if is_dist():
        tdist.barrier()
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place and returned); a no-op on one process."""
    if is_dist():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_params(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (same start everywhere)."""
    if not is_dist():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            tdist.broadcast(t.data, src)


def all_reduce_grads(params) -> None:
    """Sum the gradients of ``params`` over ranks, one flat all-reduce per dtype (params without a grad
    contribute zeros so every rank sends the same layout)."""
    if not is_dist():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        off = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n

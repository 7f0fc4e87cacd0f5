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


# ----------------------------------------------------------------------------------------------------
# FSDP2 (torch.distributed.fsdp.fully_shard)
# ----------------------------------------------------------------------------------------------------
def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was wrapped by :func:`shard_model` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_model(model: torch.nn.Module, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Data parallelism with FSDP2: every decoder layer, then the root (embedding, final norm, lm head), is
    wrapped by ``fully_shard`` over all ranks, so each rank holds 1/world of every parameter, gradient and
    AdamW state; parameters are all-gathered per layer for forward/backward and gradients reduce-scattered.

    The trainers' losses are normalized by the GLOBAL token count, so gradients must be SUMMED over ranks:
    the reduce-scatter is a plain SUM with divide factor 1 (FSDP's default averages). ``hidden_states`` (the method
    the trainers call instead of ``forward``) is registered as a forward method so the root's parameters
    are gathered for it; the root is not resharded after forward (FSDP2's own default for the root), so
    the lm head weight that the fused loss reads after ``hidden_states`` is the gathered one, and its
    gradient is reduce-scattered with the root's in the backward. Rank 0's initial weights are broadcast first. Every rank must run
    the same number of forward/backward passes per step (the CLI gives every rank equal batches).
    Works on CPU with gloo (tested) and on GPUs with nccl."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not is_dist():
        raise RuntimeError("shard_model: FSDP needs an initialized process group (torchrun, or init_process_group)")
    broadcast_params(model)
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")
    for m in [*model.model.layers, model]:   # each FSDP module has its own reduce-scatter settings
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)   # plain SUM (gloo has no PREMUL_SUM)
    return model


def full_state_dict(module: torch.nn.Module) -> dict:
    """The module's state dict with every DTensor gathered into a plain full tensor (a collective under
    FSDP: every rank must call it); plain modules return their state dict (detached tensors)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach()
    return out


def unsharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself when it is not sharded, else a plain copy with the full weights on every rank (a
    collective): for evaluation and HF export on one rank."""
    if not is_sharded(model):
        return model
    sd = full_state_dict(model)
    copy = type(model)(model.config)
    copy.load_state_dict(sd)
    return copy.to(next(iter(sd.values())).device)

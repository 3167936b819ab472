"""The trainer's ranks: FSDP2 sharding of the model and the few small all-reduces of `step()`.

On one process (no `torch.distributed` group, or a group of one) every function here is a
no-op, so the trainer runs the same code on one rank and on N.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's rank in the trainer's group; 0 for a trainer of one rank."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the trainer's process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (token counts, loss sums)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """`t`'s largest value over the ranks (how many updates and micro-batches every rank runs)."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """Reduce a small tensor over the rank group (a no-op on one process); NCCL needs it on the GPU."""
    if world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    reduced = t.to(device)
    dist.all_reduce(reduced, op=op)
    return reduced.to(t.device)


def shard_model(model: torch.nn.Module, bf16: bool) -> None:
    """`fully_shard` each decoder layer (the model's `_no_split_modules`), then the root, on the
    rank's device (its GPU, set by the rank group, or the CPU); every rank then holds rank 0's values.

    Rank 0's weights are the run's. The other ranks may hold the model on the meta device
    (`trainer.empty_model`): they get storage for their own shards only and receive them from
    rank 0 a tensor at a time, so no rank but rank 0 ever holds the whole model.

    Gradients are summed, not averaged, over ranks: each rank's loss is already divided
    by the update's target tokens over all ranks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    on_meta = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    if not on_meta:
        model.to(device)
    full = model.state_dict() if rank() == 0 else {}  # rank 0's unsharded tensors, kept until they are sent

    policy = MixedPrecisionPolicy()
    if bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: Gloo has no PREMUL_SUM or AVG
    if on_meta:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # not sharded, and the non-persistent ones (rotary tables) are in no state dict
        dist.broadcast(buffer, src=0)

"""Multi-process helpers for contrastive training: rank information and all-gathers.

Contrastive losses need every process to see the whole global batch of negatives. The gathers
here support uneven local batch sizes (the last batch of an epoch, or a sharded data set whose
shards differ in length): sizes are exchanged first, every process pads to the largest size,
gathers, and the padding is stripped again. All helpers are no-ops in a single process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

__all__ = ["world_info", "is_distributed", "gather_with_grad", "gather_no_grad", "launch_mismatch", "warn_launch_mismatch"]
log = logging.getLogger("domainclip.train")
CPU_LAUNCH_HINT = ("on CPU, start N processes with `accelerate launch --multi_gpu --num_processes N --num_machines 1 "
                   "--mixed_precision no --dynamo_backend no -m domainclip.core.cli train RECIPE train.cpu=true` "
                   "(with ACCELERATE_USE_CPU=1 CUDA_VISIBLE_DEVICES=''); `accelerate launch --cpu --num_processes N` "
                   "starts one process")


def launch_mismatch(processes: int, env: Mapping[str, str] | None = None) -> str:
    """Why the ``processes`` that started differ from what the launcher asked for, or ``""``.

    A launcher that asks for several processes sets ``WORLD_SIZE`` (torchrun, ``accelerate launch
    --multi_gpu``); ``accelerate launch --cpu --num_processes N`` sets only ``MASTER_ADDR`` /
    ``MASTER_PORT`` and starts one process.
    """
    env = os.environ if env is None else env
    asked = env.get("WORLD_SIZE")
    if asked is not None and asked.isdigit() and int(asked) != processes:
        return f"the launcher asked for WORLD_SIZE={asked} processes but {processes} joined the run; {CPU_LAUNCH_HINT}"
    if asked is None and processes == 1 and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return (f"a multi-process launch was requested (MASTER_ADDR/MASTER_PORT are set) but this run has 1 process "
                f"(world size 1); {CPU_LAUNCH_HINT}")
    return ""


def warn_launch_mismatch(processes: int) -> None:
    """Log a warning (console and run log) when the world size is not what the launch asked for."""
    reason = launch_mismatch(processes)
    if reason:
        log.warning("world size %d: %s", processes, reason)


def is_distributed() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_info() -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _gather_sizes(local_size: int, device: torch.device) -> list[int]:
    """All-gather the local dim-0 sizes so that each process knows everyone's rows."""
    world_size = dist.get_world_size()
    size_tensor = torch.tensor([local_size], dtype=torch.long, device=device)
    size_buffers = [torch.zeros_like(size_tensor) for _ in range(world_size)]
    dist.all_gather(size_buffers, size_tensor)
    return [int(size.item()) for size in size_buffers]


def _padded_all_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather ``x`` (no autograd) when ranks hold ``sizes`` rows each; returns them in rank order."""
    max_size = max(sizes)
    padded = x.new_zeros((max_size, *x.shape[1:]))
    padded[: x.shape[0]] = x
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded)
    return torch.cat([buffer[:size] for buffer, size in zip(buffers, sizes)], dim=0)


def _check_gatherable(x: torch.Tensor) -> None:
    if x.dim() == 0:
        raise ValueError(
            f"gather expects a tensor with a batch dimension (dim 0), got a 0-d tensor {x!r}"
        )


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of every rank.

    Every rank uses the gathered tensor in its own loss, so the gradient of the total objective
    (the sum of all ranks' losses) with respect to this rank's rows is the sum over ranks of the
    incoming gradients, restricted to this rank's slice: an all-reduce then a slice.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, sizes: list[int], offset: int
    ) -> torch.Tensor:
        ctx.offset = offset
        ctx.local_size = x.shape[0]
        return _padded_all_gather(x.contiguous(), sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        summed = grad_output.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.offset : ctx.offset + ctx.local_size], None, None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` along dim 0 across processes, keeping the autograd graph.

    Returns the concatenation of every rank's rows in rank order and this rank's row offset in it.
    Local batch sizes may differ between ranks. In backward, the gradient reaching this rank's
    rows is the SUM over ranks of the gradients of the gathered tensor (so each rank's loss
    contributes to every rank's parameters). Single process: returns ``(x, 0)`` unchanged.
    """
    _check_gatherable(x)
    if not is_distributed():
        return x, 0
    rank = dist.get_rank()
    sizes = _gather_sizes(x.shape[0], x.device)
    offset = sum(sizes[:rank])
    if max(sizes) == 0:
        return x, 0
    return _GatherWithGrad.apply(x, sizes, offset), offset


def gather_no_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` along dim 0 without gradient (labels, indices); uneven sizes allowed.

    Returns the concatenation in rank order and this rank's row offset, like
    :func:`gather_with_grad`. Single process: returns ``(x, 0)`` unchanged.
    """
    _check_gatherable(x)
    if not is_distributed():
        return x, 0
    rank = dist.get_rank()
    sizes = _gather_sizes(x.shape[0], x.device)
    offset = sum(sizes[:rank])
    if max(sizes) == 0:
        return x, 0
    with torch.no_grad():
        gathered = _padded_all_gather(x.detach().contiguous(), sizes)
    return gathered, offset

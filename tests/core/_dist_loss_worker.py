"""Worker for tests/core/test_losses_distributed.py, run under ``accelerate launch`` on 2 CPUs.

Each rank takes an UNEQUAL slice of a fixed global batch (5 and 3 rows), runs a tiny DDP model and
one of the contrastive losses, and backpropagates. Rank 0 writes, per loss configuration, the loss
averaged over ranks and the DDP-averaged parameter gradients to ``<out>/<config>.safetensors``, and
checks of the raw gather helpers to ``<out>/gather_checks.json``. The test imports
:func:`build_model`, :func:`global_batch` and :data:`CONFIGS` from this file to compute the
single-process reference on the full batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

IMAGE_INPUT_DIM = 6
TEXT_INPUT_DIM = 5
FEATURE_DIM = 8
GLOBAL_BATCH = 8
# Rows [0, 5) go to rank 0 and [5, 8) to rank 1: uneven on purpose.
RANK_SLICES = ((0, 5), (5, 8))
# Classes 1 and 2 each appear on both ranks, so label-aware masking crosses the rank boundary.
GLOBAL_LABELS = (0, 1, 0, 2, -1, 1, -1, 2)

# name -> (loss name, local_loss, label_aware)
CONFIGS: dict[str, tuple[str, bool, bool]] = {
    "clip_local": ("clip", True, False),
    "clip_global": ("clip", False, False),
    "siglip": ("siglip", True, False),
    "clip_label_aware": ("clip", True, True),
}


class TinyDualEncoder(nn.Module):
    """Two linear towers with L2-normalised outputs and a learnable scale (and bias for SigLIP)."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__()
        self.image_tower = nn.Linear(IMAGE_INPUT_DIM, FEATURE_DIM)
        self.text_tower = nn.Linear(TEXT_INPUT_DIM, FEATURE_DIM)
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(-3.0)) if with_bias else None

    def forward(self, image_inputs: torch.Tensor, text_inputs: torch.Tensor):
        image_features = nn.functional.normalize(self.image_tower(image_inputs), dim=-1)
        text_features = nn.functional.normalize(self.text_tower(text_inputs), dim=-1)
        return image_features, text_features, self.log_scale.exp(), self.bias


def build_model(config: str) -> TinyDualEncoder:
    """The model every rank (and the single-process reference) starts from, seeded."""
    loss_name = CONFIGS[config][0]
    torch.manual_seed(1234)
    return TinyDualEncoder(with_bias=loss_name == "siglip")


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed global batch: image inputs, text inputs and class labels."""
    generator = torch.Generator().manual_seed(99)
    image_inputs = torch.randn(GLOBAL_BATCH, IMAGE_INPUT_DIM, generator=generator)
    text_inputs = torch.randn(GLOBAL_BATCH, TEXT_INPUT_DIM, generator=generator)
    return image_inputs, text_inputs, torch.tensor(GLOBAL_LABELS, dtype=torch.long)


def _run_config(config: str, accelerator, out_dir: Path) -> None:
    from safetensors.torch import save_file

    from domainclip.core.losses import LossConfig, build_loss

    loss_name, local_loss, label_aware = CONFIGS[config]
    loss_fn = build_loss(LossConfig(name=loss_name, local_loss=local_loss, label_aware=label_aware))
    model = accelerator.prepare(build_model(config))
    start, stop = RANK_SLICES[accelerator.process_index]
    image_inputs, text_inputs, labels = (tensor[start:stop] for tensor in global_batch())

    image_features, text_features, logit_scale, logit_bias = model(image_inputs, text_inputs)
    loss = loss_fn(image_features, text_features, logit_scale, logit_bias, labels=labels)
    accelerator.backward(loss)

    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    mean_loss /= accelerator.num_processes
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        tensors = {
            f"grad.{name}": param.grad.detach().clone() for name, param in unwrapped.named_parameters()
        }
        tensors["loss"] = mean_loss.reshape(1)
        save_file(tensors, str(out_dir / f"{config}.safetensors"))


def _check_gathers(accelerator, out_dir: Path) -> None:
    """Exercise the raw helpers: uneven gathers, offsets, and the summed backward of the gather."""
    from domainclip.core.distributed import gather_no_grad, gather_with_grad, world_info

    rank, world_size = world_info()
    start, stop = RANK_SLICES[rank]
    labels, label_offset = gather_no_grad(torch.tensor(GLOBAL_LABELS[start:stop]))
    local_rows = torch.arange(start, stop, dtype=torch.float64)[:, None].repeat(1, 3).requires_grad_()
    gathered_rows, row_offset = gather_with_grad(local_rows)
    # Rank r weights the whole gathered tensor by (r + 1): each local row's gradient must be the
    # sum of the weights of all ranks, 1 + 2 = 3 for two ranks.
    (gathered_rows * (rank + 1)).sum().backward()
    offsets, _ = gather_no_grad(torch.tensor([row_offset]))
    if accelerator.is_main_process:
        checks = {
            "world_size": world_size,
            "gathered_labels": labels.tolist(),
            "label_offset_rank0": label_offset,
            "offsets": offsets.tolist(),
            "gathered_rows_first_column": gathered_rows[:, 0].tolist(),
            "local_row_grad_rank0": local_rows.grad.tolist(),
        }
        (out_dir / "gather_checks.json").write_text(json.dumps(checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for rank 0's results")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes != len(RANK_SLICES):
        raise SystemExit(f"expected {len(RANK_SLICES)} processes, got {accelerator.num_processes}")
    args.out.mkdir(parents=True, exist_ok=True)
    _check_gathers(accelerator, args.out)
    for config in args.configs:
        _run_config(config, accelerator, args.out)
    accelerator.wait_for_everyone()
    # tear gloo down before interpreter exit: a process group destroyed by exit handlers while its
    # threads still run aborts the process ("terminate called without an active exception")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    # leave without interpreter finalisation: gloo's threads can still hold work of the DDP-wrapped
    # models, and freeing it there aborts the process now and then (1 run in 6 under pytest on
    # 2026-12-06); every result is on disk by now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

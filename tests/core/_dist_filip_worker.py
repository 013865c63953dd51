"""Worker for tests/core/test_filip_distributed.py, run under ``accelerate launch`` on 2 CPUs.

Each rank takes an UNEQUAL slice (5 and 3 rows) of a fixed global batch of token inputs; rank 1's
captions are shorter, so the ranks hold text tokens of different lengths (as a tokenizer padding to
the longest caption gives). A tiny DDP model projects and normalises the tokens, FilipLoss runs and
backpropagates. Rank 0 writes, per configuration, the loss averaged over ranks and the DDP-averaged
gradients to ``<out>/<config>.safetensors``. The test imports :func:`build_model`,
:func:`global_batch`, :func:`rank_batch` and :data:`CONFIGS` for the single-process reference.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

INPUT_DIM, FEATURE_DIM, IMAGE_TOKENS, TEXT_TOKENS = 6, 8, 4, 7
RANK_SLICES = ((0, 5), (5, 8))
TEXT_LENGTHS = (7, 3, 5, 1, 6, 2, 4, 3)  # real tokens per caption; rank 1's longest is 4
GLOBAL_LABELS = (0, 1, 0, 2, -1, 1, -1, 2)

# name -> (local_loss, label_aware, clip_weight, chunk_size)
CONFIGS: dict[str, tuple[bool, bool, float, int]] = {
    "filip_local": (True, False, 0.0, 2),
    "filip_global": (False, False, 0.0, 0),
    "filip_clip_label_aware": (True, True, 0.5, 3),
}


class TinyTokenEncoder(nn.Module):
    """Linear token projections, per-token L2 normalisation, mean-pooled global features."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(INPUT_DIM, FEATURE_DIM)
        self.text = nn.Linear(INPUT_DIM, FEATURE_DIM)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, image_inputs, image_mask, text_inputs, text_mask):
        image_tokens = self.image(image_inputs)
        text_tokens = self.text(text_inputs)
        pooled_text = (text_tokens * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
        return {
            "image_features": nn.functional.normalize(image_tokens.mean(1), dim=-1),
            "text_features": nn.functional.normalize(pooled_text, dim=-1),
            "logit_scale": self.log_scale.exp(), "logit_bias": None,
            "image_tokens": nn.functional.normalize(image_tokens, dim=-1), "image_token_mask": image_mask,
            "text_tokens": nn.functional.normalize(text_tokens, dim=-1), "text_token_mask": text_mask,
        }


def build_model() -> TinyTokenEncoder:
    torch.manual_seed(1234)
    return TinyTokenEncoder()


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    size = len(TEXT_LENGTHS)
    return {
        "image_inputs": torch.randn(size, IMAGE_TOKENS, INPUT_DIM, generator=g),
        "image_mask": torch.ones(size, IMAGE_TOKENS, dtype=torch.bool),
        "text_inputs": torch.randn(size, TEXT_TOKENS, INPUT_DIM, generator=g),
        "text_mask": torch.arange(TEXT_TOKENS)[None, :] < torch.tensor(TEXT_LENGTHS)[:, None],
        "labels": torch.tensor(GLOBAL_LABELS),
    }


def rank_batch(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s rows, its text tokens trimmed to its own longest caption."""
    start, stop = RANK_SLICES[rank]
    batch = {key: value[start:stop] for key, value in global_batch().items()}
    longest = max(TEXT_LENGTHS[start:stop])
    batch["text_inputs"], batch["text_mask"] = batch["text_inputs"][:, :longest], batch["text_mask"][:, :longest]
    return batch


def build_loss(config: str):
    from domainclip.core.losses import FilipLoss

    local_loss, label_aware, clip_weight, chunk_size = CONFIGS[config]
    return FilipLoss(clip_weight=clip_weight, chunk_size=chunk_size, local_loss=local_loss, label_aware=label_aware)


def loss_of(model, loss_fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from domainclip.core.losses import loss_inputs

    out = model(batch["image_inputs"], batch["image_mask"], batch["text_inputs"], batch["text_mask"])
    args, kwargs = loss_inputs(out, batch["labels"], loss_fn)
    return loss_fn(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from accelerate import Accelerator
    from safetensors.torch import save_file

    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes != len(RANK_SLICES):
        raise SystemExit(f"expected {len(RANK_SLICES)} processes, got {accelerator.num_processes}")
    args.out.mkdir(parents=True, exist_ok=True)
    for config in CONFIGS:
        model = accelerator.prepare(build_model())
        loss = loss_of(model, build_loss(config), rank_batch(accelerator.process_index))
        accelerator.backward(loss)
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        mean_loss /= accelerator.num_processes
        if accelerator.is_main_process:
            tensors = {f"grad.{n}": p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
            tensors["loss"] = mean_loss.reshape(1)
            save_file(tensors, str(args.out / f"{config}.safetensors"))
    accelerator.wait_for_everyone()
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

"""How much faster can the zero-shot forward pass get at the same precision? Eager against two faster kernels.

Issue #16 asks ``ZeroShotClassifier`` for 2x ``transformers.pipeline`` at the same batch size and
precision. Both run the same Hugging Face CLIP model, so the kit can win only by what it overlaps
(decoding) and by running the *same* forward pass faster. This bench measures the second part on
the zero-shot bench's ViT-B/32-sized vision tower (``zeroshot_throughput.save_vit_b32_clip``'s
configuration, random init) on the CPU (oneDNN), model-only (pre-made pixel tensors), one precision for all:

* ``eager``: the module as the pipeline runs it (and the kit with ``pack_linears=False``);
* ``prepacked``: every ``nn.Linear`` replaced by the kit's ``PackedLinear`` (``core/encode.py``,
  what a bf16 ``FrozenEncoder`` on a CPU runs since 2026-12-06): oneDNN's product with the weight
  reordered into oneDNN's blocked layout once (``torch.ops.mkldnn._reorder_linear_weight`` /
  ``_linear_pointwise``, what inductor's freezing pass emits) instead of at every call;
* ``compiled``: ``torch.compile`` with inductor's ``freezing`` (prepacked weights, fused
  element-wise operations); its compile time is reported, not timed.

Same batch size, threads and precision for all; rounds alternate the order after an unmeasured
warm-up; images/s are medians over rounds; each contender's largest difference from eager's
output is reported. The share of eager's time spent in matrix products comes from one profiled
pass. The 1-minute load average is recorded around every contender; on a busy machine nothing is
written (exit status 3).

    python bench/forward_ceiling.py                              # bf16, batch 16, 5 rounds
    python bench/forward_ceiling.py --precision fp32 --json forward_ceiling_fp32.json
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

from measure import LoadLog, alternating, threaded_bench_main

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATRIX_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "mkldnn::_linear_pointwise",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::mkldnn_convolution")


def vision_tower(dtype: torch.dtype) -> torch.nn.Module:
    """The zero-shot bench's ViT-B/32-sized CLIP vision tower with projection, random init, eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, projection_dim=512)
    return CLIPVisionModelWithProjection(config).eval().to(dtype)


def matrix_share(forward: Callable[[], Any]) -> dict[str, float]:
    """Share of one profiled eager pass's self CPU time per matrix-product operator, and their sum."""
    from torch.profiler import profile

    with profile() as prof:
        forward()
    total = sum(event.self_cpu_time_total for event in prof.key_averages())
    shares = {event.key: event.self_cpu_time_total / total for event in prof.key_averages() if event.key in MATRIX_OPS}
    return {**{key: round(value, 3) for key, value in shares.items()}, "all": round(sum(shares.values()), 3)}


def run(args: argparse.Namespace) -> tuple[dict[str, Any], LoadLog]:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.precision]
    model = vision_tower(dtype)
    pixels = torch.randn(args.batch_size, 3, 224, 224).to(dtype)
    from domainclip.core.encode import pack_cpu_linears

    packed_model = copy.deepcopy(model)
    pack_cpu_linears(packed_model)

    def eager() -> torch.Tensor:
        return model(pixel_values=pixels).image_embeds

    def packed() -> torch.Tensor:
        return packed_model(pixel_values=pixels).image_embeds

    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled_model = torch.compile(model)

    def compiled() -> torch.Tensor:
        return compiled_model(pixel_values=pixels).image_embeds

    contenders = {"eager": eager, "prepacked": packed, "compiled": compiled}
    per_round: dict[str, list[float]] = {name: [] for name in contenders}
    load = LoadLog()
    with torch.no_grad():
        reference = eager().float()
        started = time.perf_counter()
        outputs = {name: fn().float() for name, fn in contenders.items()}  # warm-up; compiles
        compile_s = time.perf_counter() - started
        share = matrix_share(eager)
        for round_index in range(args.rounds):
            for name in alternating(list(contenders), round_index):
                with load.around(name, round_index):
                    started = time.perf_counter()
                    for _ in range(args.iters):
                        contenders[name]()
                    per_round[name].append(args.iters * args.batch_size / (time.perf_counter() - started))
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    result = {
        "bench": "forward_ceiling", "model": "CLIP ViT-B/32 vision tower + projection (random init)",
        "precision": args.precision, "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds,
        "iters_per_round": args.iters, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "images_per_s": {name: round(value, 2) for name, value in medians.items()},
        "per_round": {name: [round(v, 2) for v in values] for name, values in per_round.items()},
        "ratio_to_eager": {name: round(value / medians["eager"], 3) for name, value in medians.items()},
        "max_abs_diff_to_eager": {name: float((out - reference).abs().max()) for name, out in outputs.items()},
        "eager_matrix_product_share": share,
        "warmup_and_compile_s": round(compile_s, 1), "command": " ".join(["python", *sys.argv]),
    }
    return result, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch-size", type=int, default=16, help="the zero-shot bench's batch size")
    parser.add_argument("--iters", type=int, default=10, help="forward passes per contender per round")
    return threaded_bench_main(parser, run, rounds=5)


if __name__ == "__main__":
    sys.exit(main())

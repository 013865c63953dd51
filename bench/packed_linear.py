"""Packed linear layers on the CPU: the kit's bf16 encoder with and without ``PackedLinear``.

A bf16 ``FrozenEncoder`` on a CPU replaces its copy's ``nn.Linear`` layers with ``PackedLinear``
(``core/encode.py``): oneDNN's product on a weight reordered once, where eager ``F.linear``
reorders every weight at every call. That reorder costs the same whatever the batch, so it weighs
most on small batches (one image at a time, as the service receives them; a few prompts). This
bench times the two on the zero-shot bench's ViT-B/32-sized Hugging Face CLIP (random init,
``zeroshot_throughput.save_vit_b32_clip``), built with ``ZeroShotClassifier.from_pretrained(...,
precision="bf16")``: the classifier's own encoder against a ``FrozenEncoder`` of the same model
with ``pack_linears=False``:

* images: ``encode_image`` on pre-made pixel tensors, for each of ``--batch-sizes``;
* texts: ``encode_tokens`` on ``--texts`` tokenised prompts.

Model only (no decoding); same threads, dtype and inputs for both; rounds alternate the order
after an unmeasured warm-up; milliseconds per call are medians over rounds. The features of the
two must be equal bit for bit. The 1-minute load average is recorded around every contender; on
a busy machine nothing is written (exit status 3).

    python bench/packed_linear.py                          # batches 1, 4, 16, 64; 4 prompts
    python bench/packed_linear.py --rounds 5 --json packed_linear.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from measure import LoadLog, alternating, threaded_bench_main
from zeroshot_throughput import save_vit_b32_clip


def per_call_ms(fn: Callable[[], torch.Tensor], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000 * (time.perf_counter() - started) / calls


def run(args: argparse.Namespace) -> tuple[dict[str, Any], LoadLog]:
    from domainclip.core.encode import FrozenEncoder
    from domainclip.core.zeroshot import ZeroShotClassifier

    torch.set_num_threads(args.threads)
    load = LoadLog()
    with tempfile.TemporaryDirectory() as tmp:
        classifier = ZeroShotClassifier.from_pretrained(save_vit_b32_clip(Path(tmp) / "clip-vit-b32"), device="cpu",
                                                        precision="bf16")
    encoders = {"packed": classifier.encoder,  # the classifier's own: packed by default
                "eager": FrozenEncoder(classifier.model, "bf16", "cpu", pack_linears=False)}
    if not encoders["packed"].packed_linears:
        raise SystemExit("this CPU or torch build has no oneDNN bf16 linear layers: nothing to compare")
    torch.manual_seed(0)
    tokens = encoders["packed"].tokenize([f"a photo of a leaf with disease {i}" for i in range(args.texts)])
    cases: dict[str, tuple[Callable[[Any], Callable[[], torch.Tensor]], int]] = {}
    for batch in args.batch_sizes:
        pixels = torch.randn(batch, 3, 224, 224)
        cases[f"images_batch_{batch}"] = ((lambda enc, p=pixels: lambda: enc.encode_image(p)),
                                          max(3, args.images_per_round // batch))
    cases[f"texts_{args.texts}"] = ((lambda enc: lambda: enc.encode_tokens(tokens)), args.text_calls)
    results: dict[str, Any] = {}
    for case, (make, calls) in cases.items():
        fns = {name: make(encoder) for name, encoder in encoders.items()}
        outputs = {name: fn() for name, fn in fns.items()}  # warm-up, and the features compared
        per_round: dict[str, list[float]] = {name: [] for name in fns}
        for round_index in range(args.rounds):
            for name in alternating(list(fns), round_index):
                with load.around(f"{case}:{name}", round_index):
                    per_round[name].append(per_call_ms(fns[name], calls))
        medians = {name: statistics.median(values) for name, values in per_round.items()}
        results[case] = {
            "calls_per_round": calls, "ms_per_call": {k: round(v, 2) for k, v in medians.items()},
            "per_round_ms": {k: [round(v, 2) for v in values] for k, values in per_round.items()},
            "speedup_packed": round(medians["eager"] / medians["packed"], 3),
            "equal_bit_for_bit": bool(torch.equal(outputs["packed"], outputs["eager"])),
        }
        print(f"{case}: packed {medians['packed']:.1f} ms, eager {medians['eager']:.1f} ms, "
              f"{results[case]['speedup_packed']:.3f}x, equal {results[case]['equal_bit_for_bit']}", flush=True)
    result = {
        "bench": "packed_linear", "model": "Hugging Face CLIP ViT-B/32 size (random init), bf16, CPU",
        "packed_linears": encoders["packed"].packed_linears, "threads": args.threads, "rounds": args.rounds,
        "results": results,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
        "command": " ".join(["python", *sys.argv]),
    }
    return result, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--images-per-round", type=int, default=64, help="images each contender encodes per round")
    parser.add_argument("--texts", type=int, default=4, help="prompts per text call")
    parser.add_argument("--text-calls", type=int, default=20, help="text calls per contender per round")
    return threaded_bench_main(parser, run, rounds=3)


if __name__ == "__main__":
    sys.exit(main())

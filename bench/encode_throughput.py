"""Image encoding throughput by precision: the kit's fp32 path, bf16 autocast, bf16 weights (and fp16).

One open_clip image tower (``--model``, random init: a random tower costs what a pretrained one
costs) encodes the same images with:

* ``fp32``: ``FrozenEncoder(model, "fp32")``, the kit's fp32 path;
* ``bf16_autocast``: the fp32 weights under ``torch.autocast(bf16)`` (what evaluation did before
  ``core/encode.py``: every weight is cast again at every call);
* ``bf16_weights``: ``FrozenEncoder(model, "bf16")``: a frozen copy held in bf16, cast once;
* ``fp16_weights`` (``--fp16``, GPUs): the same in fp16.

Two modes, each timed for every contender in alternating rounds (A B C, C B A, ...):

* ``model``: the forward pass alone on pre-decoded tensors (the images decoded and preprocessed
  once, before timing), ``--batch-size`` per pass;
* ``end_to_end``: ``ZeroShotClassifier.encode_images`` on the image files (decoding in
  ``--workers`` threads overlapping the forward pass), with the share of time in decoding and
  in the forward pass.

Images/s is the median over rounds; ratios are against ``fp32`` in the same run; the minimum
cosine similarity to the fp32 features says what each precision costs in accuracy. MFU is the
model FLOPs per image (``torch.utils.flop_counter``) times images/s over the measured matmul peak
of the device in that dtype. The 1-minute load average is recorded around every contender; above
half the core count (1.0 on 2 cores) nothing is written and the exit status is 3.

    python bench/encode_throughput.py --images 64 --rounds 3 --json encode.json          # CPU
    python bench/encode_throughput.py --device cuda --model ViT-B-16 --batch-size 256 --images 2048 --fp16

Images: PlantVillage apple test leaves from the shared data when present, else the bundled sample
(recipes/sample_data, 80 leaves), repeated to ``--images``.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from measure import LoadLog, alternating, finish, forward_flops, matmul_peak_flops

REPO_ROOT = Path(__file__).resolve().parents[1]


def image_paths(count: int) -> list[str]:
    """``count`` leaf images (shared PlantVillage test split, else the bundled sample), cycled."""
    env = os.environ.get("DOMAINCLIP_SHARED_DATA")
    shared = (Path(env) if env else REPO_ROOT.parent / "shared" / "data") / "agriculture" / "plantvillage_apple"
    root = shared if (shared / "test.csv").is_file() else REPO_ROOT / "recipes" / "sample_data" / "plantvillage_apple"
    with open(root / "test.csv", newline="") as handle:
        paths = [str(root / row["path"]) for row in csv.DictReader(handle)]
    return [paths[i % len(paths)] for i in range(count)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], LoadLog]:
    from domainclip.core.backbones import ModelConfig, create_backbone
    from domainclip.core.encode import FrozenEncoder
    from domainclip.core.zeroshot import ImagePreparer, ZeroShotClassifier

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(kind="open_clip", name=args.model)).to(device).eval()
    paths = image_paths(args.images)
    pixels = torch.cat(list(ImagePreparer(model.preprocess, workers=args.workers).batches(paths, args.batch_size)))
    batches = [pixels[i:i + args.batch_size].to(device) for i in range(0, len(pixels), args.batch_size)]

    encoders = {"fp32": FrozenEncoder(model, "fp32"), "bf16_weights": FrozenEncoder(model, "bf16")}
    if args.fp16:
        encoders["fp16_weights"] = FrozenEncoder(model, "fp16")

    def autocast_encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return model.encode_image(images, normalize=True).float()

    model_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32": encoders["fp32"].encode_image, "bf16_autocast": autocast_encode,
        **{name: enc.encode_image for name, enc in encoders.items() if name != "fp32"}}
    classifiers = {name: ZeroShotClassifier(model, device=device, batch_size=args.batch_size, workers=args.workers,
                                            precision=name.split("_")[0] if name != "bf16_autocast" else "fp32")
                   for name in model_fns if name != "bf16_autocast"}
    device_decoded = {}
    if args.decode_on_device:  # JPEGs decoded, resized and normalised on the device (nvJPEG on a GPU)
        device_decoded["bf16_weights_device_decode"] = ZeroShotClassifier(
            model, device=device, batch_size=args.batch_size, workers=args.workers, precision="bf16",
            decode_on_device=True)

    def model_only(name: str) -> torch.Tensor:
        out = torch.cat([model_fns[name](batch) for batch in batches])
        synchronize(device)
        return out

    for name in model_fns:  # warm-up: kernels picked, allocator grown
        model_fns[name](batches[0])
        if name in classifiers:
            classifiers[name].encode_images(paths[:args.batch_size])
    for classifier in device_decoded.values():
        classifier.encode_images(paths[:args.batch_size])
    synchronize(device)

    load = LoadLog()
    seconds: dict[str, dict[str, list[float]]] = {"model": {n: [] for n in model_fns},
                                                  "end_to_end": {n: [] for n in [*classifiers, *device_decoded]}}
    features: dict[str, torch.Tensor] = {}
    timing: dict[str, list[dict[str, float]]] = {n: [] for n in [*classifiers, *device_decoded]}
    decoded_features: dict[str, torch.Tensor] = {}
    for round_index in range(args.rounds):
        for name in alternating(list(model_fns), round_index):
            with load.around(f"model:{name}", round_index):
                started = time.perf_counter()
                features[name] = model_only(name).cpu()
                seconds["model"][name].append(time.perf_counter() - started)
            if name in classifiers:
                with load.around(f"end_to_end:{name}", round_index):
                    started = time.perf_counter()
                    classifiers[name].encode_images(paths)
                    seconds["end_to_end"][name].append(time.perf_counter() - started)
                timing[name].append(classifiers[name].last_timing.to_dict())
            print(f"round {round_index} {name}: model {len(paths) / seconds['model'][name][-1]:.1f} images/s"
                  + (f", end to end {len(paths) / seconds['end_to_end'][name][-1]:.1f}" if name in classifiers else ""),
                  flush=True)
        for name, classifier in device_decoded.items():
            with load.around(f"end_to_end:{name}", round_index):
                started = time.perf_counter()
                decoded_features[name] = classifier.encode_images(paths).cpu()
                seconds["end_to_end"][name].append(time.perf_counter() - started)
            timing[name].append(classifier.last_timing.to_dict())
            print(f"round {round_index} {name}: end to end {len(paths) / seconds['end_to_end'][name][-1]:.1f} "
                  f"images/s", flush=True)

    rates = {mode: {n: len(paths) / statistics.median(v) for n, v in per.items()} for mode, per in seconds.items()}
    flops_per_image = forward_flops(lambda: model.encode_image(batches[0][:1])) if not args.skip_peak else 0
    peaks = {} if args.skip_peak else {  # small sizes: on a CPU without bf16 instructions bf16 is emulated
        dtype: matmul_peak_flops(dtype, sizes=(1024, 2048), repeats=3, device=args.device)["flops_per_s"]
        for dtype in ("float32", "bfloat16")}
    dtype_of = {"fp32": "float32", "bf16_autocast": "bfloat16", "bf16_weights": "bfloat16", "fp16_weights": "bfloat16"}
    mfu = {n: flops_per_image * r / peaks[dtype_of[n]] for n, r in rates["model"].items()} if peaks else {}
    reference = features["fp32"]
    return {
        "model": args.model, "device": str(device), "images": len(paths), "batch_size": args.batch_size,
        "workers": args.workers, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "images_per_second": rates,
        "ratio_vs_fp32": {mode: {n: r / per["fp32"] for n, r in per.items()} for mode, per in rates.items()},
        "min_cosine_vs_fp32": {n: float((f * reference).sum(-1).min()) for n, f in features.items()},
        # the device decoder's pixels differ from PIL's: its features against fp32 on PIL's pixels
        "min_cosine_device_decode_vs_fp32": {n: float((f * reference).sum(-1).min())
                                             for n, f in decoded_features.items()},
        "end_to_end_timing_median": {n: {k: statistics.median(t[k] for t in ts) for k in ts[0]}
                                     for n, ts in timing.items()},
        "flops_per_image": flops_per_image, "matmul_peak_flops_per_s": peaks, "mfu_model_only": mfu,
        "seconds": seconds,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else ""},
        "command": " ".join(["python", *sys.argv]),
    }, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decode threads of the end-to-end contenders")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fp16", action="store_true", help="also time fp16 weights (GPUs)")
    parser.add_argument("--decode-on-device", action="store_true",
                        help="also time bf16 weights end to end with JPEGs decoded on --device (nvJPEG on a GPU)")
    parser.add_argument("--skip-peak", action="store_true", help="skip the FLOP count and matmul peak (no MFU)")
    parser.add_argument("--json", default="", help="write the results here (only on a quiet machine)")
    args = parser.parse_args(argv)
    result, load = run(args)
    return finish(result, load, args.json)


if __name__ == "__main__":
    sys.exit(main())

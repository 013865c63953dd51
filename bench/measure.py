"""Measurement helpers for the benchmarks: load-average guard, process-tree memory, matmul peak,
training and encoding FLOPs.

Kept apart from the benchmark drivers so each driver reads as "what is compared" while this
file holds "how a number is measured".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import torch


REFUSED_EXIT = 3
"""Exit status of a bench that ran but refused to record its figures (the machine was busy)."""


def load_limit(cpus: int | None = None) -> float:
    """Highest 1-minute load average at which a bench may start: half the cores (1.0 on 2)."""
    return 0.5 * (cpus or os.cpu_count() or 1)


def foreign_limit(cpus: int | None = None) -> float:
    """Most CPU (in cores) other processes may use while a contender is timed: a tenth of the
    machine (0.2 cores on 2)."""
    return 0.1 * (cpus or os.cpu_count() or 1)


def machine_user_seconds() -> float:
    """CPU seconds the whole machine has spent in user space since boot (``/proc/stat``: user +
    nice). Kernel time is left out: the kernel's writeback, page compaction and interrupt work
    that a bench's own checkpoints, file reads and allocations set off would count as foreign."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:3]]
    return sum(values) / os.sysconf("SC_CLK_TCK")


def own_user_seconds() -> float:
    """User-space CPU seconds of this process, the children it reaped, and its live descendants
    (server and trainer subprocesses, data workers) with the children they reaped."""
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.children_user
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.children_user
    return total


@dataclass
class LoadSample:
    """One contender's timed run: the 1-minute load average just before and after it, and the
    CPU other processes used meanwhile (cores, averaged over the run)."""

    contender: str
    round: int
    before: float
    after: float
    foreign_cores: float = 0.0
    seconds: float = 0.0


@dataclass
class LoadLog:
    """The load around every contender of a bench, and whether its figures may be recorded.

    A contender that keeps both cores busy for 30 s raises the 1-minute load average to about 1.0
    by itself, so the average *after* a contender cannot tell the bench's own work from another
    job's. Two checks do: the machine must be quiet when the bench starts (the first
    :meth:`around` waits up to ``settle_s`` for the load average to fall to ``limit``, and the
    bench is refused if it does not), and while each contender is timed, the CPU used by other
    processes (the machine's user-space time from ``/proc/stat`` minus this process tree's) must
    stay under ``foreign`` cores. The load averages before and after every contender are
    recorded with the result.
    """

    limit: float = field(default_factory=load_limit)
    foreign: float = field(default_factory=foreign_limit)
    settle_s: float = field(default_factory=lambda: float(os.environ.get("DOMAINCLIP_BENCH_SETTLE_S", "300")))
    samples: list[LoadSample] = field(default_factory=list)
    start_load: float | None = None

    def settle(self) -> float:
        """Wait (at most ``settle_s``) for the 1-minute load average to fall to ``limit``."""
        deadline = time.monotonic() + self.settle_s
        while os.getloadavg()[0] > self.limit and time.monotonic() < deadline:
            time.sleep(5)
        return round(os.getloadavg()[0], 2)

    @contextmanager
    def around(self, contender: str, round_index: int) -> Iterator[None]:
        if self.start_load is None:
            self.start_load = self.settle()
        before = os.getloadavg()[0]
        busy, own, started = machine_user_seconds(), own_user_seconds(), time.monotonic()
        yield
        seconds = time.monotonic() - started
        others = (machine_user_seconds() - busy) - (own_user_seconds() - own)
        self.samples.append(LoadSample(contender, round_index, round(before, 2), round(os.getloadavg()[0], 2),
                                       round(max(others, 0.0) / max(seconds, 1e-9), 3), round(seconds, 2)))

    def disturbed(self) -> list[str]:
        """Why the figures are not a measurement (empty: they are)."""
        reasons = []
        if self.start_load is not None and self.start_load > self.limit:
            reasons.append(f"the 1-minute load average was {self.start_load:.2f} when the bench started (limit "
                           f"{self.limit:.1f} on this {os.cpu_count()}-core machine)")
        reasons += [f"other processes used {s.foreign_cores:.2f} cores while {s.contender} (round {s.round}) ran "
                    f"(limit {self.foreign:.2f})" for s in self.samples if s.foreign_cores > self.foreign]
        return reasons

    def to_dict(self) -> dict[str, Any]:
        return {"start_limit": self.limit, "foreign_cores_limit": self.foreign, "cpus": os.cpu_count(),
                "load_at_start": self.start_load, "quiet": not self.disturbed(),
                "highest_foreign_cores": max((s.foreign_cores for s in self.samples), default=0.0),
                "samples": [asdict(s) for s in self.samples]}


def alternating(contenders: list[str], round_index: int) -> list[str]:
    """Contender order of a round: as given in even rounds, reversed in odd ones (A B C, C B A)."""
    return list(contenders) if round_index % 2 == 0 else list(reversed(contenders))


def threaded_bench_main(parser: argparse.ArgumentParser,
                        run: Callable[[argparse.Namespace], tuple[dict[str, Any], LoadLog]], rounds: int) -> int:
    """What the in-process benches share after their own options: ``--threads``, ``--rounds`` and
    ``--json`` are added, the bench runs, and :func:`finish` writes the result on a quiet machine."""
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--json", default="", help="write the results here (only on a quiet machine)")
    args = parser.parse_args()
    result, load = run(args)
    return finish(result, load, args.json)


def finish(result: dict[str, Any], load: LoadLog, json_path: str = "", interim: bool = False) -> int:
    """Attach the load log to ``result``, print it, and write ``json_path`` only on a quiet machine.

    Returns 0, or :data:`REFUSED_EXIT` when :meth:`LoadLog.disturbed`: the numbers printed are
    then not a measurement, nothing is written, and the bench must be rerun later. ``interim``:
    a partial result that a later call completes; it is written (when quiet) but not printed.
    """
    result["load"] = load.to_dict()
    if not interim:
        print(json.dumps(result, indent=2))
    reasons = load.disturbed()
    if reasons:
        if not interim:
            print("REFUSED: " + "; ".join(reasons) + ". These figures are not a measurement and were not written; "
                  "rerun on a quiet machine.")
        return REFUSED_EXIT
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {json_path}")
    return 0


@dataclass
class TreeMemoryPeak:
    """Peak memory of a process and all its descendants, sampled while it ran.

    Attributes:
        rss_bytes: largest sum of RSS over the tree at one sample (counts pages shared by
            forked data workers once per process, so it over-states real use).
        pss_bytes: largest sum of PSS at one sample (shared pages split between sharers: the
            tree's real footprint); 0 when the platform cannot report PSS.
        main_hiwater_bytes: the kernel's exact high-water RSS of the largest single process
            (``wait4`` rusage: the main process or any descendant it reaped).
        samples: how many times the tree was sampled.
        max_processes: most processes alive in the tree at one sample.
    """

    rss_bytes: int = 0
    pss_bytes: int = 0
    main_hiwater_bytes: int = 0
    samples: int = 0
    max_processes: int = 0


class TreeMemorySampler:
    """Poll a process tree's RSS and PSS on a background thread until ``stop()``."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = TreeMemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def stop(self) -> TreeMemoryPeak:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval_s)

    def sample_once(self) -> None:
        """Add one sample of the tree (processes that vanish mid-sample are skipped)."""
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        for process in processes:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied:
                info = process.memory_info()
            rss += info.rss
            pss += getattr(info, "pss", 0)
        self.peak.samples += 1
        self.peak.max_processes = max(self.peak.max_processes, len(processes))
        self.peak.rss_bytes = max(self.peak.rss_bytes, rss)
        self.peak.pss_bytes = max(self.peak.pss_bytes, pss)


@dataclass
class ProcessRun:
    """One finished command: exit code, wall time, memory peak and where its output went."""

    command: list[str]
    returncode: int
    wall_s: float
    memory: TreeMemoryPeak
    output_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def output_tail(self, lines: int = 30) -> str:
        text = self.output_path.read_text(errors="replace") if self.output_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def run_measured(command: list[str], output_path: Path, cwd: Path, env: dict[str, str],
                 interval_s: float = 0.2, timeout_s: float = 1800.0) -> ProcessRun:
    """Run ``command`` to completion, sampling its process tree's memory; stdout+stderr to a file.

    The exit status comes from ``os.wait4`` so the kernel's high-water RSS of the largest
    process in the tree is known exactly, independent of the sampling interval.
    """
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "wb") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        sampler = TreeMemorySampler(process.pid, interval_s).start()
        deadline = started + timeout_s
        status = rusage = None
        while status is None:
            pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                status, rusage = wait_status, usage
            elif time.perf_counter() > deadline:
                process.kill()
            else:
                time.sleep(0.05)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen from waiting again
    peak = sampler.stop()
    peak.main_hiwater_bytes = int(rusage.ru_maxrss) * 1024  # Linux reports KiB
    return ProcessRun(command, process.returncode, wall, peak, output_path)


def matmul_peak_flops(dtype_name: str = "bfloat16", sizes: tuple[int, ...] = (1024, 2048, 3072, 4096),
                      repeats: int = 10, device: str = "cpu") -> dict[str, Any]:
    """Best FLOP/s of large square matmuls on ``device`` (CPU: torch's default thread count).

    The best of ``repeats`` per size (the least disturbed by other work on the machine), then the
    best size, is the machine's practical peak for that dtype; MFU figures divide by it.
    """
    dtype = getattr(torch, dtype_name)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        sizes = tuple(sorted(set(sizes) | {8192}))
    per_size: dict[int, float] = {}
    for size in sizes:
        generator = torch.Generator().manual_seed(size)
        left = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        right = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        left @ right  # warm-up: oneDNN/MKL/cuBLAS pick and cache their kernels
        best = float("inf")
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            left @ right
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        per_size[size] = 2 * size**3 / best
    return {"dtype": dtype_name, "device": device, "threads": torch.get_num_threads(),
            "flops_per_s": max(per_size.values()),
            "per_size_flops_per_s": {str(k): v for k, v in per_size.items()}, "repeats": repeats}


def forward_flops(step: Callable[[], Any]) -> int:
    """Model FLOPs (matmuls, convolutions, attention) of one call of ``step``, without autograd."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops})
    with counter, torch.no_grad():
        step()
    return int(counter.get_total_flops())


def _count_flops(step: Callable[[], torch.Tensor]) -> tuple[int, dict[str, int]]:
    """FLOPs of ``step()`` (a forward returning a scalar) plus its backward.

    Run in fp32: the count does not depend on the precision, and bf16 autocast is emulated, tens of
    times slower, on a CPU without bf16 instructions (where this used to seem to hang).

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention
    (the usual "model FLOPs"; element-wise work is not counted). The CPU attention kernels have
    no formula registered in torch; they take the same leading (query, key, value) /
    (grad_out, query, key, value) arguments as the GPU ones, so the same formulas are used.
    """
    from torch.utils import flop_counter

    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        step().backward()
    by_op = {str(op): int(count) for op, count in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def training_flops(model_name: str, caption_batches: list[list[str]], device: str = "cpu") -> dict[str, Any]:
    """Training FLOPs per sample of the model + CLIP loss: nominal and as domainclip executes them.

    ``nominal``: one forward + backward of the open_clip model (random init) and the CLIP loss on
    a batch of ``len(caption_batches[0])`` random images and those captions padded to the full
    context, which is what open_clip's own trainer computes for every batch. ``executed``: the
    same with the text tower's FLOPs replaced by those of domainclip's backbone on each of
    ``caption_batches`` (the batches a run measured), averaged; it differs from nominal only
    when the backbone skips work (``text_trim.encode_text_trimmed`` drops padding after the
    end-of-text token, which cannot change the result). The passes run for real, on ``device``
    (the bench's own: a CPU count of ViT-B/16 at batch 256 is slow beside a GPU run).
    """
    from domainclip.core.backbones.factory import ModelConfig, create_backbone
    from domainclip.core.losses import LossConfig, build_loss

    torch.manual_seed(0)
    backbone = create_backbone(ModelConfig(kind="open_clip", name=model_name)).to(device)
    clip = backbone.model  # the bare open_clip model: full-context text tower
    loss_fn = build_loss(LossConfig())
    batch_size = len(caption_batches[0])
    size = backbone.preprocess.image_size
    images = torch.randn(batch_size, backbone.preprocess.channels, size, size).to(device)
    tokens = [backbone.tokenize(captions)["input_ids"].to(device) for captions in caption_batches]

    def model_and_loss() -> torch.Tensor:
        image_features = clip.encode_image(images, normalize=True)
        text_features = clip.encode_text(tokens[0], normalize=True)
        return loss_fn(image_features.float(), text_features.float(), clip.logit_scale.exp())

    nominal, by_op = _count_flops(model_and_loss)
    text_full, _ = _count_flops(lambda: clip.encode_text(tokens[0]).float().sum())
    text_executed = [_count_flops(lambda t=t: backbone.encode_text({"input_ids": t}).float().sum())[0]
                     for t in tokens]
    executed = nominal - text_full + sum(text_executed) / len(text_executed)
    return {"model": model_name, "batch_size": batch_size, "nominal_flops_per_sample": nominal / batch_size,
            "executed_flops_per_sample": executed / batch_size, "text_flops_per_sample_full": text_full / batch_size,
            "text_flops_per_sample_executed": [f / batch_size for f in text_executed],
            "text_lengths": [int(t.argmax(dim=-1).max()) + 1 for t in tokens], "context_length": int(tokens[0].shape[1]),
            "nominal_by_op": by_op,
            "parameters": sum(p.numel() for p in backbone.parameters())}


def _attention_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)



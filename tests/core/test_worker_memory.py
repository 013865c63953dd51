"""Forked data workers drop their inherited copy of the trainer's tensors (core/train/worker_memory.py)."""
from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from tests.conftest import tiny_recipe

from domainclip.core import config as config_lib
from domainclip.core.run_config import RunConfig
from domainclip.core.train.loop import train
from domainclip.core.train.worker_memory import (ReleaseInheritedTensors, base_loader, host_tensor_ranges, page_interior,
                                                 release_trainer_tensors_in_workers, trainer_tensors)

PAGE = mmap.PAGESIZE
MIB = 2**20


def test_page_interior_keeps_the_block_header_and_partial_pages() -> None:
    assert page_interior(10 * PAGE, 4 * PAGE, PAGE) == (11 * PAGE, 3 * PAGE)  # first page holds the header
    assert page_interior(10 * PAGE + 100, 4 * PAGE, PAGE) == (11 * PAGE, 3 * PAGE)  # both ends partial
    assert page_interior(10 * PAGE - 64, 2 * PAGE + 64, PAGE) == (10 * PAGE, 2 * PAGE)  # header just before
    assert page_interior(10 * PAGE, PAGE + 10, PAGE) is None


def test_ranges_are_per_storage_and_host_only() -> None:
    big = torch.zeros(4 * MIB // 4)
    ranges = host_tensor_ranges([big, big[10:], big.view(-1, 4), torch.zeros(8), torch.zeros(3, device="meta")])
    assert len(ranges) == 1
    start, length = ranges[0]
    address = big.untyped_storage().data_ptr()
    assert start % PAGE == 0 and address < start and start + length <= address + big.numel() * 4
    assert length >= 4 * MIB - 2 * PAGE


def test_a_call_outside_a_forked_worker_releases_nothing() -> None:
    weights = torch.full((2 * MIB,), 3.0)
    calls = []
    release = ReleaseInheritedTensors(lambda: [weights], then=calls.append)
    release(7)  # this process is not a child of the one that built it
    assert release.released_bytes == 0 and calls == [7]
    assert bool((weights == 3.0).all())


class WorkerMemory(Dataset):
    """Each item: the worker's resident memory after its worker_init_fn, and a value of its own."""

    def __init__(self) -> None:
        self.values = torch.arange(64, dtype=torch.float64)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict[str, float]:
        return {"rss": float(psutil.Process(os.getpid()).memory_info().rss), "value": float(self.values[index + 5])}


def worker_rss(worker_init_fn) -> tuple[float, list[float]]:
    loader = DataLoader(WorkerMemory(), batch_size=None, num_workers=1, multiprocessing_context="fork",
                        worker_init_fn=worker_init_fn)
    items = list(loader)
    return items[0]["rss"], [item["value"] for item in items]


def test_a_forked_worker_gives_up_the_weights_pages_and_still_reads_its_data() -> None:
    weights = torch.ones(256 * MIB // 4)  # resident: the fork shares all of its pages
    kept, values = worker_rss(None)
    released, values_after = worker_rss(ReleaseInheritedTensors(lambda: [weights]))
    assert kept - released > 0.9 * 256 * MIB, (kept / MIB, released / MIB)
    assert values == values_after == [5.0, 6.0]
    assert bool((weights == 1.0).all())  # the parent's tensor is untouched


def test_training_loaders_get_the_release_only_when_their_workers_fork() -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    data = list(range(8))
    assert not release_trainer_tensors_in_workers(DataLoader(data), model, optimizer)
    assert not release_trainer_tensors_in_workers(DataLoader(data, num_workers=1, multiprocessing_context="spawn"),
                                                  model, optimizer)
    own = []
    loader = DataLoader(data, num_workers=1, multiprocessing_context="fork", worker_init_fn=own.append)
    assert release_trainer_tensors_in_workers(loader, model, optimizer)
    assert isinstance(loader.worker_init_fn, ReleaseInheritedTensors) and loader.worker_init_fn.then == own.append


def test_trainer_tensors_cover_parameters_buffers_and_optimizer_state() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    found = {id(t) for t in trainer_tensors(model, optimizer)()}
    expected = [*model.parameters(), *model.buffers(),
                *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))]
    assert {id(t) for t in expected} <= found and len(expected) == 4 + 3 + 4 * 3


def test_a_training_run_releases_in_its_workers(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2)
    recipe["data"]["num_workers"] = 1
    result = train(config_lib.load(RunConfig, None, (), base=recipe))
    log_text = (result.run_dir / "logs" / "train.log").read_text()
    assert "data workers (forked) drop their inherited copy" in log_text
    dropped = re.findall(r"data worker 0 dropped ([0-9.]+) MiB", log_text)
    assert len(dropped) == 1 and float(dropped[0]) > 0, log_text  # the worker did release, once


def test_the_release_reaches_the_loader_inside_accelerates_wrapper(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())

    def own_init(worker_id: int) -> None:  # runs in the worker: leaves a file the test can see
        (tmp_path / f"worker_{worker_id}").write_text(str(os.getpid()))

    prepared = Accelerator(cpu=True).prepare(DataLoader(list(range(8)), num_workers=1,
                                                        multiprocessing_context="fork", worker_init_fn=own_init))
    assert release_trainer_tensors_in_workers(prepared, model, optimizer)
    released = base_loader(prepared).worker_init_fn
    assert isinstance(released, ReleaseInheritedTensors) and released.then is own_init
    assert sorted(int(x) for batch in prepared for x in batch) == list(range(8))
    assert int((tmp_path / "worker_0").read_text()) != os.getpid()  # the chained init ran, in the worker

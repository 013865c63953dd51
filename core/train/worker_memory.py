"""Forked data workers that keep no stale copy of the trainer's weights.

A data-loader worker started with ``fork`` shares its parent's memory copy-on-write. The trainer
rewrites its weights (and optimizer state) at every step, so the kernel copies each written page
for the parent while the workers keep the old one: after the first step the host holds a second,
stale copy of the model that nobody reads (about 450 MiB of tree PSS for ViT-B/32 in CPU
training, docs/benchmarks.md). :class:`ReleaseInheritedTensors`, the training loader's
``worker_init_fn``, drops a forked worker's view of those pages when it starts
(``madvise(MADV_DONTNEED)``: the parent's pages stay as they are) and freezes the garbage
collector's inherited objects, so the worker's collections do not copy the parent's Python heap
page by page either (what the ``gc.freeze`` documentation recommends before a fork).

Only whole pages strictly inside a tensor's storage are dropped, never the allocator's bookkeeping
at a block's start or a neighbouring block's page. The workers never read the model; a worker
that did would read zeros there, not crash. Workers started with ``spawn`` / ``forkserver``
inherit no memory, and nothing is done in them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import mmap
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

log = logging.getLogger("domainclip.train")

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
# glibc keeps a free block's list pointers in its first 32 bytes; the page holding them is kept
_BLOCK_HEADER_BYTES = 64


def page_interior(address: int, nbytes: int, page_size: int = mmap.PAGESIZE) -> tuple[int, int] | None:
    """(start, length) of the whole pages strictly inside ``[address, address + nbytes)``, leaving out
    the block's first ``_BLOCK_HEADER_BYTES``; None when no whole page is left."""
    start = -(-(address + _BLOCK_HEADER_BYTES) // page_size) * page_size
    end = (address + nbytes) // page_size * page_size
    return (start, end - start) if end > start else None


def host_tensor_ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The droppable page ranges of the distinct host-memory storages of ``tensors``."""
    seen: set[int] = set()
    ranges = []
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            continue
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address == 0 or address in seen:
            continue
        seen.add(address)
        interior = page_interior(address, storage.nbytes())
        if interior is not None:
            ranges.append(interior)
    return ranges


def trainer_tensors(model: torch.nn.Module, optimizer: Any) -> Callable[[], Iterator[torch.Tensor]]:
    """The tensors the training step rewrites: the model's parameters and buffers and every tensor
    the optimizer holds (its parameters, e.g. fp32 masters, and its state)."""

    def tensors() -> Iterator[torch.Tensor]:
        yield from model.parameters()
        yield from model.buffers()
        for group in optimizer.param_groups:
            yield from group["params"]
        for state in optimizer.state.values():
            yield from (value for value in state.values() if isinstance(value, torch.Tensor))

    return tensors


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


class ReleaseInheritedTensors:
    """A ``worker_init_fn``: in a forked worker, drop the pages of ``tensors()`` and freeze the GC.

    Args:
        tensors: called in the worker; yields the parent's tensors the worker never reads (its
            forked copies of the objects have the parent's addresses).
        then: a ``worker_init_fn`` to call afterwards (the loader's own, if it had one).

    The release happens only in a process forked from the one that built this object (its
    parent's pid and this object's own address must both match); a call anywhere else, including
    a spawned worker that unpickled a copy, only calls ``then``. ``released_bytes`` is what the
    last release dropped in this process (0 when it did nothing).
    """

    def __init__(self, tensors: Callable[[], Iterable[torch.Tensor]],
                 then: Callable[[int], None] | None = None):
        self.tensors = tensors
        self.then = then
        self.parent_pid = os.getpid()
        self.address_in_parent = id(self)
        self.released_bytes = 0

    def __call__(self, worker_id: int) -> None:
        if os.getppid() == self.parent_pid and id(self) == self.address_in_parent:
            gc.freeze()
            self.released_bytes = self.release(host_tensor_ranges(self.tensors()))
            log.info("data worker %d dropped %.1f MiB of inherited weights and optimizer state",
                     worker_id, self.released_bytes / 2**20)
        if self.then is not None:
            self.then(worker_id)

    @staticmethod
    def release(ranges: list[tuple[int, int]]) -> int:
        """Drop this process's view of ``ranges``; the bytes dropped (0 without ``madvise``)."""
        madvise = _madvise()
        if madvise is None:
            return 0
        dropped = 0
        for start, length in ranges:
            if madvise(start, length, _MADV_DONTNEED) == 0:
                dropped += length
        return dropped


def start_method(loader: DataLoader) -> str:
    """How ``loader`` starts its workers: ``fork``, ``spawn`` or ``forkserver``."""
    context = loader.multiprocessing_context
    if context is None:
        return multiprocessing.get_start_method()
    return context if isinstance(context, str) else context.get_start_method()


def base_loader(loader: Any) -> DataLoader:
    """The torch ``DataLoader`` that starts the workers: Accelerate's prepared loader wraps one
    (``base_dataloader``) and reads its ``worker_init_fn`` from there, not from the wrapper."""
    while isinstance(vars(loader).get("base_dataloader"), DataLoader):
        loader = vars(loader)["base_dataloader"]
    return loader


def release_trainer_tensors_in_workers(loader: Any, model: torch.nn.Module, optimizer: Any) -> bool:
    """Make ``loader``'s forked workers drop their copy of ``model``'s and ``optimizer``'s tensors.

    Call before the loader's first iteration; ``loader`` may be a torch ``DataLoader`` or the one
    ``Accelerator.prepare`` returned. Returns False (and changes nothing) when the loader has no
    workers or does not fork them.
    """
    loader = base_loader(loader)
    if loader.num_workers == 0 or start_method(loader) != "fork":
        return False
    loader.worker_init_fn = ReleaseInheritedTensors(trainer_tensors(model, optimizer), then=loader.worker_init_fn)
    return True

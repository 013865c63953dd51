"""Micro-batching: concurrent requests' images encoded in one forward pass.

Requests put their preprocessed images on a queue and wait on a future. One worker thread takes
the first waiting image, then keeps taking until ``max_batch`` images are gathered or
``max_wait_ms`` has passed since the first, runs the model once on the stacked batch, and hands
each request its rows. ``max_batch=1`` turns batching off (every image its own forward pass, no
waiting). Other model work (text encodings, label heads) is queued with :meth:`MicroBatcher.call`
and runs in the same thread between batches, so no two forward passes compete for the cores. A
request cancelled while waiting (a client gone, a timeout) is skipped; it never stops the thread.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

_STOP = object()


class _Call:
    """Model work other than image batches, run alone in the batcher's thread."""

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args, self.future = fn, args, Future()


class MicroBatcher:
    """Collects ``(C, S, S)`` tensors from many threads into batches for ``encode`` (batch -> (B, D) array)."""

    def __init__(self, encode: Callable[[torch.Tensor], np.ndarray], max_batch: int = 16, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.encode, self.max_batch, self.max_wait = encode, max_batch, max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._held: Any = None  # an item _gather took but left for the next round (a call, the stop)
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (``/health`` reports it)."""
        return self._thread.is_alive()

    def submit(self, images: list[torch.Tensor]) -> list[Future]:
        """One future per image; each resolves to its ``(D,)`` embedding."""
        if not self.alive:
            raise RuntimeError("the micro-batcher is stopped")
        futures = []
        for image in images:
            future: Future = Future()
            self._queue.put((image, future))
            futures.append(future)
        return futures

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` in the batcher's thread, between image batches; the future gets its result."""
        if not self.alive:
            raise RuntimeError("the micro-batcher is stopped")
        job = _Call(fn, args)
        self._queue.put(job)
        return job.future

    def _next_item(self) -> Any:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return self._queue.get()

    def _gather(self, first: tuple) -> list:
        """Images that arrive within ``max_wait`` of ``first``, up to ``max_batch``; cancelled ones left out."""
        batch = [first] if first[1].set_running_or_notify_cancel() else []
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP or isinstance(item, _Call):
                self._held = item  # runs after this batch
                break
            if item[1].set_running_or_notify_cancel():  # False: the request was cancelled while queued
                batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            item = self._next_item()
            if item is _STOP:
                return
            if isinstance(item, _Call):
                if item.future.set_running_or_notify_cancel():
                    try:
                        item.future.set_result(item.fn(*item.args))
                    except Exception as error:  # the caller gets it, the worker lives on
                        item.future.set_exception(error)
                continue
            batch = self._gather(item)
            if not batch:
                continue
            try:
                embeddings = self.encode(torch.stack([image for image, _ in batch]))
            except Exception as error:  # the requests fail, the worker lives on
                for _, future in batch:
                    future.set_exception(error)
                continue
            self.batches += 1
            self.items += len(batch)
            for row, (_, future) in zip(embeddings, batch):
                future.set_result(row)  # running futures cannot be cancelled any more

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued work, then stop the worker thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

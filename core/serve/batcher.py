"""Micro-batching: concurrent requests' images encoded in one forward pass.

Requests put their preprocessed images on a queue and wait on a future. One worker thread takes
the first waiting image, then keeps taking until ``max_batch`` images are gathered or
``max_wait_ms`` has passed since the first, runs the model once on the stacked batch, and hands
each request its rows. ``max_batch=1`` turns batching off (every image its own forward pass, no
waiting). The model runs only in this thread, so no two forward passes compete for the cores.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

_STOP = object()


class MicroBatcher:
    """Collects ``(C, S, S)`` tensors from many threads into batches for ``encode`` (batch -> (B, D) array)."""

    def __init__(self, encode: Callable[[torch.Tensor], np.ndarray], max_batch: int = 16, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.encode, self.max_batch, self.max_wait = encode, max_batch, max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, images: list[torch.Tensor]) -> list[Future]:
        """One future per image; each resolves to its ``(D,)`` embedding."""
        if not self._thread.is_alive():
            raise RuntimeError("the micro-batcher is stopped")
        futures = []
        for image in images:
            future: Future = Future()
            self._queue.put((image, future))
            futures.append(future)
        return futures

    def _gather(self, first) -> list:
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = self._gather(first)
            try:
                embeddings = self.encode(torch.stack([image for image, _ in batch]))
            except Exception as error:  # the requests fail, the worker lives on
                for _, future in batch:
                    future.set_exception(error)
                continue
            self.batches += 1
            self.items += len(batch)
            for row, (_, future) in zip(embeddings, batch):
                future.set_result(row)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued work, then stop the worker thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

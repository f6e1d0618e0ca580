"""Micro-batching: images of concurrent requests share one forward pass.

`submit(served, decode)` queues one image, given as a function that decodes it to (H, W, 3) uint8, and
returns an asyncio future. One loop takes the first waiting image, waits up to `window_s` for more (up to
`max_batch`), groups them by model version, and on a single scoring thread decodes and preprocesses them
(resize and crop, as the model was trained) and scores each preprocessed size with one `detector.score`
call. An image that fails to decode fails its own future only.

One thread for all of it. torch: the detector's own OpenMP threads use the cores, and torch work from a
second long-lived thread would slow every forward pass (models.py says why). Decoding: done in a thread
pool beside the scoring thread, the same PNG decode left the median alone but made about 3 % of batch-1
passes 10 ms slower (cookie 768x576 PNG, 2 cores: scoring-thread p99 22 ms against 14 ms when the scoring
thread decodes itself), which is the whole single-client tail. Under load nothing is lost: the decodes of
the next batch are work the cores would do anyway, and the in-process baseline decodes serially too.
While a batch is scored, new images queue up and form the next batch, so under load batches fill up
without waiting, and a lone request waits at most `window_s`.

    batcher = MicroBatcher(max_batch=32, window_s=0.0)
    score, amap, scored = await batcher.submit(served, lambda: decode_image(data, name))
    # amap (h', w'), scored (3, h', w'): the map and the image as scored
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from flows.service.models import Served

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    served: Served
    decode: Callable[[], np.ndarray]  # -> (H, W, 3) uint8; raises what the request should fail with
    future: asyncio.Future


class MicroBatcher:
    """See the module docstring. `on_batch(size)` is called after each forward pass (metrics)."""

    def __init__(self, max_batch: int = 32, window_s: float = 0.002,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch must be >= 1 and window_s >= 0, got {max_batch}, {window_s}")
        self.max_batch, self.window_s, self.on_batch = max_batch, window_s, on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="defectops-score")

    def submit(self, served: Served, decode: Callable[[], np.ndarray]) -> asyncio.Future:
        """Queue one image: `decode()` -> (H, W, 3) uint8; the future resolves to (image
        score, anomaly map (h, w), the preprocessed image (3, h, w) that was scored), or fails with what
        decode() raised."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(), name="defectops-batcher")
        future = loop.create_future()
        self._queue.put_nowait(_Item(served, decode, future))
        return future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _collect(self) -> list[_Item]:
        queue = self._queue
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = [item for item in await self._collect() if not item.future.done()]  # drop cancelled
            try:
                await self._score_groups(batch)
            except Exception as exc:  # noqa: BLE001 - the requests get the error, the loop goes on
                logger.exception("scoring a batch of %d failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)

    async def _score_groups(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        groups: dict[tuple, list[_Item]] = {}
        for item in batch:
            groups.setdefault(item.served.key, []).append(item)
        for items in groups.values():
            try:
                outcomes = await loop.run_in_executor(self._executor, _score, items)
            except Exception as exc:  # noqa: BLE001 - this group's requests get the error, the others go on
                logger.exception("scoring %d images failed", len(items))
                outcomes = [exc] * len(items)
            for item, outcome in zip(items, outcomes, strict=True):
                if item.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)
            scored = sum(not isinstance(o, BaseException) for o in outcomes)
            if self.on_batch is not None and scored:
                self.on_batch(scored)


def _score(items: list[_Item]) -> list[tuple[float, np.ndarray, torch.Tensor] | Exception]:
    """Decode and preprocess images of one model version, score each preprocessed size in one forward pass
    -> per item (score, map (h, w), image (3, h, w)), or the exception its decode or preprocessing raised."""
    pre = items[0].served.preprocess
    outcomes: list = [None] * len(items)
    by_shape: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for i, item in enumerate(items):
        try:
            tensor = pre.image(item.decode())
        except Exception as exc:  # noqa: BLE001 - that request fails with it (a 4xx from the decode)
            outcomes[i] = exc
            continue
        by_shape.setdefault(tuple(tensor.shape), []).append((i, tensor))
    for members in by_shape.values():
        images = torch.stack([tensor for _, tensor in members])
        start = 0
        for size in chunk_sizes(len(members)):  # a few batch shapes only: PatchCore's frozen graph is built per shape
            out = items[0].served.detector.score(images[start:start + size])
            for j in range(size):
                outcomes[members[start + j][0]] = (float(out.image_scores[j]), out.anomaly_maps[j], images[start + j])
            start += size
    return outcomes


def chunk_sizes(n: int) -> list[int]:
    """n as powers of two, largest first (13 -> [8, 4, 1]): forward passes then come in at most
    log2(max_batch) + 1 shapes, each warmed up at load (models.warm_up), instead of one new shape (a graph
    build of about 2 s for PatchCore's frozen backbone) per batch size seen."""
    return [1 << bit for bit in range(n.bit_length() - 1, -1, -1) if n >> bit & 1]

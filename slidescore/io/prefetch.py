"""Read ahead: decode the next blocks in background threads while the model scores this one.

:func:`prefetch` yields ``(item, result, seconds)`` in the order of ``items``, where ``result =
read(item)`` was computed in a small thread pool up to ``depth`` items ahead of the consumer.
Memory is bounded: at most ``depth`` results wait besides the one being consumed. A ``read`` that
raises re-raises the same exception when the consumer reaches its item (so a decode error is the
sample's error, exactly as without prefetching); items after it are cancelled. ``read`` decides
which items need no I/O (return ``None``: a block without foreground is never read).

Decoders (imagecodecs JPEG/Deflate, zarr codecs) release the GIL, so reading overlaps with torch,
which releases it too. ``depth=0`` reads nothing here: the consumer reads inline, as before.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _timed(read: Callable[[T], R], item: T) -> tuple[R, float]:
    t0 = time.perf_counter()
    result = read(item)
    return result, time.perf_counter() - t0


def prefetch(items: Sequence[T], read: Callable[[T], R], *, depth: int = 2, workers: int | None = None
             ) -> Iterator[tuple[T, R | None, float | None]]:
    """Yield ``(item, read(item), read_seconds)`` in order, reading up to ``depth`` items ahead.

    With ``depth == 0`` it yields ``(item, None, None)`` and reads nothing (the caller reads).
    ``workers`` reader threads (default: one per two CPU cores, at most ``depth``; on a 2-core
    machine a second decoding thread only takes time from the model's threads).
    Pending reads are cancelled, and running ones awaited, when the consumer stops early (an
    exception or ``close()``), so nothing reads from a reader the caller is about to close.
    """
    if depth <= 0:
        for item in items:
            yield item, None, None
        return
    if workers is None:
        workers = max(1, (os.cpu_count() or 2) // 2)
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, depth)), thread_name_prefix="slidescore-prefetch")
    pending: deque[tuple[T, Future[tuple[R, float]]]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append((item, pool.submit(_timed, read, item)))
            if len(pending) > depth:
                break
        while pending:
            item, fut = pending.popleft()
            nxt = next(it, None) if len(pending) < depth else None
            if nxt is not None:
                pending.append((nxt, pool.submit(_timed, read, nxt)))
            result, seconds = fut.result()  # re-raises the reader's exception
            yield item, result, seconds
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

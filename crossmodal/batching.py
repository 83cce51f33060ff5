"""Micro-batching of concurrent search queries (``crossmodal.serve``): the text (and upload)
queries that arrive together are encoded in one call of the encoder.

:class:`MicroBatcher`: each caller hands in one item and blocks; one worker thread takes the
oldest waiting item, then whatever else arrives until ``max_wait_ms`` after that item arrived (at
most ``max_batch`` items), calls ``fn(items) -> rows`` once and hands each caller its row. While
a batch is being encoded, new callers queue, so under load the batches grow by themselves and
nobody waits for the timer (the oldest item's deadline has passed already); a lone caller waits
at most ``max_wait_ms`` (0: never, only what is already queued is batched with it).
A batch that raises is retried item by item, so an exception reaches only the caller whose item
failed. :meth:`MicroBatcher.close` encodes what is queued, then stops the worker; a call after
it raises ``RuntimeError``.

:class:`QueryEncoders`: a :class:`~crossmodal.serve.Searcher`'s two query encoders (caption
encoder + text head; image encoder + image head), each batched (batch size > 1), or with a
batch size of 0 one query at a time under a lock (a fast tokenizer is not re-entrant), as before
batching existed. By default text queries are batched and uploads are not: with a batch size of
1 they are encoded in parallel, as many at once as the decode slots (``Limits.upload_slots``).

Equal output: mean pooling over the attention mask ignores padding, so a sentence's row in a
batch equals its row alone up to float rounding (``tests/test_batching.py`` bounds it).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_MAX_BATCH = 8  # queries encoded together at most (0: no batching); MiniLM per query: flat past 8
# longest a query waits for others to join its batch. 0: none; under load the batches fill anyway
# (queries queue while a batch is encoded). Full COCO, 8 clients: text p95 49.4 ms at 0 against
# 59.9 at 2 ms; one client: 12.1 against 16.8 ms (BENCHMARKS.md, "Search app")
DEFAULT_WAIT_MS = 0.0
# uploads: not batched by default but encoded in parallel, one per decode slot (the cores). On one CPU
# thread EfficientNet-Lite0 at 256 px took 28.7 ms per image alone and 42-49 ms per image in batches
# of 2-8, so a batch only makes its members wait (BENCHMARKS.md, "Search app"). 0: one at a time
DEFAULT_MAX_IMAGE_BATCH = 1


_NONE = object()  # no result yet


class _Job:
    __slots__ = ("item", "arrived", "started", "batch", "done", "result", "error")

    def __init__(self, item):
        self.item, self.arrived = item, time.monotonic()
        self.started, self.batch, self.result, self.error = None, 0, _NONE, None
        self.done = threading.Event()


class MicroBatcher:
    """``fn(list of B items) -> B rows`` (anything indexable, e.g. an array (B, ...)), called on
    one worker thread with the items that arrived together; thread-safe. ``stats``: batches,
    items, largest batch so far."""

    def __init__(self, fn: Callable[[list], Sequence], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_WAIT_MS, name: str = "batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn, self.max_batch, self.max_wait = fn, int(max_batch), max_wait_ms / 1000
        self.name = name
        self.stats = {"batches": 0, "items": 0, "largest": 0}
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def __call__(self, item):
        """``item``'s row (blocks until its batch is encoded); ``fn``'s exception for this item."""
        return self.submit(item)[0]

    def submit(self, item) -> tuple[object, dict]:
        """(``item``'s row, {"wait": seconds queued before its batch started, "batch": its size})."""
        job = _Job(item)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            if self._thread is None:  # started on first use: a Searcher that never queries holds no thread
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result, {"wait": job.started - job.arrived, "batch": job.batch}

    def close(self, timeout: float = 30.0) -> None:
        """Encode what is queued, then stop the worker (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job and those that join it before its deadline; None when closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if not self._queue:
                return None
            deadline = self._queue[0].arrived + self.max_wait
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            started = time.monotonic()
            for j in batch:
                j.started, j.batch = started, len(batch)
            try:
                self._run(batch)
            finally:
                for j in batch:
                    if j.result is _NONE and j.error is None:  # never leave a caller waiting
                        j.error = RuntimeError(f"{self.name}: no result for this item")
                    j.done.set()
            s = self.stats
            s["batches"], s["items"], s["largest"] = s["batches"] + 1, s["items"] + len(batch), max(s["largest"],
                                                                                                    len(batch))

    def _run(self, batch: list[_Job]) -> None:
        try:
            rows = self.fn([j.item for j in batch])
            if len(rows) != len(batch):
                raise RuntimeError(f"{self.name}: {len(batch)} items gave {len(rows)} rows")
        except Exception as e:
            if len(batch) == 1:
                batch[0].error = e
                return
            for j in batch:  # one bad item must not fail the others: each alone
                try:
                    j.result = self.fn([j.item])[0]
                except Exception as e1:
                    j.error = e1
            return
        for j, r in zip(batch, rows, strict=True):
            j.result = r


class _Unbatched:
    """The unbatched path: ``fn([item])[0]``, at most ``parallel`` calls at once (1: under a lock),
    same interface as :class:`MicroBatcher`."""

    def __init__(self, fn: Callable[[list], Sequence], parallel: int = 1):
        self.fn, self._lock = fn, threading.BoundedSemaphore(max(parallel, 1))

    def __call__(self, item):
        return self.submit(item)[0]

    def submit(self, item) -> tuple[object, dict]:
        t0 = time.monotonic()
        with self._lock:
            t1 = time.monotonic()
            return self.fn([item])[0], {"wait": t1 - t0, "batch": 1}

    def close(self, timeout: float = 30.0) -> None:
        pass


def batcher(fn: Callable[[list], Sequence], max_batch: int, max_wait_ms: float, name: str, parallel: int = 1):
    """A :class:`MicroBatcher`, or with ``max_batch`` 0 or 1 unbatched calls, ``parallel`` at once
    (with ``max_batch`` 0 always one at a time)."""
    if max_batch <= 1:
        return _Unbatched(fn, parallel if max_batch == 1 else 1)
    return MicroBatcher(fn, max_batch, max_wait_ms, name)


class QueryEncoders:
    """A searcher's query encoders. ``text(sentence)`` / ``image(preprocessed (3, S, S) tensor)``
    -> (query (1, d) float32 after the head, {"wait": s, "batch": n})."""

    def __init__(self, searcher, max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_WAIT_MS,
                 max_image_batch: int = DEFAULT_MAX_IMAGE_BATCH):
        self.searcher, self.max_wait_ms = searcher, max_wait_ms
        self.max_batch, self.max_image_batch = max_batch, max_image_batch
        self._text = batcher(self.text_rows, max_batch, max_wait_ms, "text-batcher")
        limits = getattr(searcher, "limits", None)
        self.image_parallel = (limits.upload_slots if limits else 1) if max_image_batch == 1 else 1
        self._image = batcher(self.image_rows, max_image_batch, max_wait_ms, "image-batcher", self.image_parallel)

    def describe(self) -> dict:
        """Queries per encoder call at most (0: one call at a time), uploads encoded at once when
        not batched, and the longest wait for a batch to fill."""
        return {"max_batch": self.max_batch, "max_image_batch": self.max_image_batch,
                "image_parallel": self.image_parallel, "wait_ms": self.max_wait_ms}

    def text_rows(self, texts: list[str]) -> np.ndarray:
        """(B,) sentences -> (B, d) queries: caption encoder, then the text head."""
        import torch

        s = self.searcher
        feats = s.text_encoder.encode(texts)
        with torch.inference_mode():
            return s.txt_head(torch.from_numpy(feats)).numpy()

    def image_rows(self, xs: list) -> np.ndarray:
        """(B,) preprocessed images (C, H, W) -> (B, d) queries: image encoder, then the image head.
        Images are encoded together only with others of their shape: an encoder of variable-size
        inputs (Faster R-CNN) pads a batch to its largest image, which would change the features.
        An ensemble's input is a tuple of its distinct encoders' inputs (``ensemble.StackedEncoder``)."""
        import torch

        s = self.searcher
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(_shape_key(x), []).append(i)
        out = None
        with torch.inference_mode():
            for rows in groups.values():
                q = s.img_head(s.image_encoder([xs[i] for i in rows])).numpy()
                if out is None:
                    out = np.empty((len(xs), q.shape[1]), dtype=q.dtype)
                out[rows] = q
        return out

    def text(self, text: str) -> tuple[np.ndarray, dict]:
        row, meta = self._text.submit(text)
        return np.asarray(row)[None], meta

    def image(self, x) -> tuple[np.ndarray, dict]:
        row, meta = self._image.submit(x)
        return np.asarray(row)[None], meta

    def close(self) -> None:
        self._text.close()
        self._image.close()


def _shape_key(x) -> tuple:
    """A preprocessed input's shape; for an ensemble's tuple of inputs, the tuple of their shapes."""
    return tuple(x.shape) if hasattr(x, "shape") else tuple(_shape_key(p) for p in x)

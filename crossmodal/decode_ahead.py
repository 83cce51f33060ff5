"""Decoding ahead: the next batches of images decoded in a background thread while the encoder
runs on this one (:func:`crossmodal.extract.extract_images`, with no DataLoader workers)."""

from __future__ import annotations

import queue
import threading


class Ahead:
    """Iterate ``batches`` in a background thread, at most ``depth`` items ahead of the consumer,
    so that decoding the next batch overlaps the encoder on this one (Pillow's decoding and
    resizing, numpy and the runtimes release the GIL). Items come in order; an exception of the
    iteration is raised in the consumer at its place. As a context manager: leaving it (also by
    an exception) stops the thread after at most the batch it is decoding."""

    _END = object()

    def __init__(self, batches, depth: int):
        self._queue, self._stop = queue.Queue(max(1, depth)), threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches,), name="image-decoding", daemon=True)

    def _fill(self, batches) -> None:
        try:
            for item in batches:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((None, e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __enter__(self):
        self._thread.start()
        return self

    def __iter__(self):
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

"""Uploads to the search server (``crossmodal.serve``), bounded in bytes, pixels and concurrency.

An upload goes through three gates, each refusing with a one-line message:

1. **admission** (before its body is read): at most ``upload_slots + upload_queue`` uploads are
   in the server at once (reading, waiting or decoding); one more gets 503 at once, so request
   bodies in memory stay under that many times the byte limit;
2. **the body** is read up to ``max_upload_bytes`` (413 past it), its image header parsed:
   width x height over ``max_pixels`` is 413 before anything is decoded;
3. **a decode slot**: at most ``upload_slots`` uploads are decoded and preprocessed at once, and
   the pixels of those together stay within ``pixel_budget`` (pixels known from the header).
   An upload waits for both up to ``upload_wait_s`` seconds, then gets 503. The budget counts
   RGB pixels: one with transparency counts 2.5 (its decode peaks at 20 bytes per pixel, not 8),
   at most the whole budget.

The decodes run on ``upload_slots`` threads of their own, so freed pixels stay in that many malloc
arenas (not in one per request thread); when a large decode (>= 4 MP) ends, freed heap memory is
handed back to the kernel (:func:`crossmodal.perf.return_freed_memory`), so RSS stays near idle
plus the decodes in flight and falls back near idle after a burst.
"""

from __future__ import annotations

import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from .cli import available_cores
from .errors import DataError
from .perf import return_freed_memory

MAX_DEFAULT_SLOTS = 8
# an image with transparency is composited on white while decoded: 20 bytes per pixel at its peak,
# against 8 for RGB (measured, 40 MP PNGs), so it counts 2.5 pixels of the budget per pixel
TRANSPARENT_COST = 2.5
TRIM_PIXELS = 4_000_000  # a decode this large gives its freed memory back to the kernel when it ends


def default_upload_slots() -> int:
    """Decode slots: one per core this process may use (at most 8)."""
    return max(1, min(available_cores(), MAX_DEFAULT_SLOTS))


class QueryError(Exception):
    """A bad request: becomes HTTP ``status`` with a one-line JSON message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    """Bounds on every request. ``None`` in the upload fields means: sized to the machine
    (slots: the cores, at most 8; queue: 4 x slots; pixel budget: ``max_pixels`` x min(slots, 2),
    so that at most two of the largest images are decoded at once, whatever the cores)."""

    max_text_chars: int = 500
    max_k: int = 100
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000  # decoded width x height; PIL's own bomb check comes on top
    thumb_size: int = 256
    upload_slots: int | None = None
    upload_queue: int | None = None
    pixel_budget: int | None = None
    upload_wait_s: float = 30.0  # longest wait for a decode slot
    body_timeout_s: float = 30.0  # longest time to receive an upload's body (slow senders hold a place)

    def __post_init__(self):
        slots = self.upload_slots if self.upload_slots is not None else default_upload_slots()
        queue = self.upload_queue if self.upload_queue is not None else 4 * slots
        budget = self.pixel_budget if self.pixel_budget is not None else self.max_pixels * min(slots, 2)
        for name, v in (("max_upload_bytes", self.max_upload_bytes), ("max_pixels", self.max_pixels),
                        ("upload_slots", slots), ("upload_wait_s", self.upload_wait_s),
                        ("body_timeout_s", self.body_timeout_s)):
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if queue < 0:
            raise ValueError(f"upload_queue must be >= 0, got {queue}")
        if budget < self.max_pixels:
            raise ValueError(f"pixel_budget ({budget}) must be at least max_pixels ({self.max_pixels}): "
                             "else the largest allowed image could never be decoded")
        object.__setattr__(self, "upload_slots", slots)
        object.__setattr__(self, "upload_queue", queue)
        object.__setattr__(self, "pixel_budget", budget)

    def public(self) -> dict:
        return {"max_text_chars": self.max_text_chars, "max_k": self.max_k, "max_upload_bytes": self.max_upload_bytes,
                "max_pixels": self.max_pixels, "upload_slots": self.upload_slots,
                "upload_queue": self.upload_queue, "pixel_budget": self.pixel_budget}


class UploadGate:
    """Admission and decode slots of :class:`Limits` (see the module docstring); thread-safe.
    ``peak`` records the most uploads admitted, decoding and pixels in flight seen together."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._cond = threading.Condition()
        self.admitted = self.running = self.pixels = 0
        self.peak = {"admitted": 0, "running": 0, "pixels": 0}
        # the pixel work runs on these threads only: glibc keeps a thread's freed memory in that
        # thread's arena, so RSS stays within one decode per slot however many request threads
        # there are (on the request threads themselves, 50 uploads of 40 MP peaked at 3.3 GB)
        self._pool = ThreadPoolExecutor(max_workers=limits.upload_slots, thread_name_prefix="upload-decode")

    def _busy(self, what: str) -> QueryError:
        return QueryError(503, f"the server is busy ({what}); try again in a few seconds")

    @contextmanager
    def admit(self):
        lim = self.limits
        with self._cond:
            if self.admitted >= lim.upload_slots + lim.upload_queue:
                raise self._busy(f"{self.admitted} uploads in progress, at most {lim.upload_slots} decoded "
                                 f"at once and {lim.upload_queue} waiting")
            self.admitted += 1
            self.peak["admitted"] = max(self.peak["admitted"], self.admitted)
        try:
            yield
        finally:
            with self._cond:
                self.admitted -= 1

    def run(self, pixels: int, fn, *args):
        """``fn(*args)`` on a decode thread, holding a slot and ``pixels`` of the budget."""
        with self.decoding(pixels):
            return self._pool.submit(fn, *args).result()

    @contextmanager
    def decoding(self, pixels: int):
        """Hold a decode slot and ``pixels`` of the budget (waits up to ``upload_wait_s``, then 503)."""
        lim = self.limits
        with self._cond:
            free = self._cond.wait_for(lambda: self.running < lim.upload_slots
                                       and self.pixels + pixels <= lim.pixel_budget, timeout=lim.upload_wait_s)
            if not free:
                raise self._busy(f"{self.running} uploads decoding, {self.pixels} of {lim.pixel_budget} pixels "
                                 f"in use, waited {lim.upload_wait_s:g} s")
            self.running += 1
            self.pixels += pixels
            self.peak["running"] = max(self.peak["running"], self.running)
            self.peak["pixels"] = max(self.peak["pixels"], self.pixels)
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                self.pixels -= pixels
                self._cond.notify_all()
            # only after large decodes: a trim makes the next query fault its pages in again, which
            # cost +20 ms (33%) on each upload of a 640x480 photo here, and under 1% on a 40 MP one
            if pixels >= TRIM_PIXELS:
                return_freed_memory()


def decode_upload(data: bytes, limits: Limits = Limits(), gate: UploadGate | None = None, prepare=None):
    """Uploaded bytes -> PIL RGB image (or ``prepare(image)``, computed while the decode slot is
    held, after which the full-size image is dropped), or :class:`QueryError`: empty, too many
    bytes, not a JPEG/PNG, too many pixels (checked from the header, before decoding), truncated
    or corrupt. With a ``gate``, the decode waits for a slot and its pixels in the budget."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise QueryError(422, "the upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise QueryError(413, f"the upload has {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:  # reads the header only
                w, h, fmt = im.width, im.height, im.format
                transparent = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise QueryError(413, f"the image is too large to decode safely: {e}") from None
        except UnidentifiedImageError:
            raise QueryError(415, "the upload is not a JPEG or PNG image") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise QueryError(422, f"the image cannot be decoded (truncated or corrupt): {e}") from None
    if w < 1 or h < 1:
        raise QueryError(422, f"the image is empty ({w}x{h})")
    if w * h > limits.max_pixels:
        raise QueryError(413, f"the image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
    if gate is None:
        out, err = _decode(data, fmt, prepare)
    else:  # any error object is dropped before the slot ends
        cost = min(round(w * h * (TRANSPARENT_COST if transparent else 1)), limits.pixel_budget)
        out, err = gate.run(cost, _decode, data, fmt, prepare)
    if err is not None:
        raise err
    return out


def _decode(data: bytes, fmt: str, prepare):
    """(image or prepare(image), None) or (None, QueryError), with no exception left holding the pixels."""
    from PIL import Image

    from .coco import load_image

    message = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = load_image(io.BytesIO(data))  # full decode: truncated files fail here
    except DataError as e:
        cause = e.__cause__ or e
        if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            message = (413, f"the image is too large to decode safely: {cause}")
        else:
            first = (str(cause).splitlines() or [type(cause).__name__])[0]
            message = (422, f"the {fmt} image cannot be decoded (truncated or corrupt): {first}")
    except (OSError, SyntaxError, ValueError, MemoryError) as e:  # MemoryError: a decoder's own allocation
        message = (422, f"the {fmt} image cannot be decoded (truncated or corrupt): {type(e).__name__}: {e}")
    if message is not None:
        return None, QueryError(*message)
    try:
        return (prepare(image) if prepare is not None else image), None
    finally:
        del image  # the full-size pixels go before the slot is given back


async def read_upload(request, limits: Limits) -> bytes:
    """The uploaded image's bytes: a multipart form (field ``file``) or the raw request body.
    Never reads more than the byte limit (plus room for the form's headers)."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect

    cap = limits.max_upload_bytes + 64 * 1024
    too_big = QueryError(413, f"the upload is larger than the limit of {limits.max_upload_bytes} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise too_big
    import anyio

    body = bytearray()
    try:
        with anyio.fail_after(limits.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > cap:
                    raise too_big
    except TimeoutError:
        raise QueryError(408, f"the upload's body did not arrive within {limits.body_timeout_s:g} s") from None
    except ClientDisconnect:  # the client went away (or lied about Content-Length): nobody gets the answer
        raise QueryError(400, "the client disconnected before its upload arrived") from None
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return bytes(body)

    async def one_chunk():
        yield bytes(body)

    try:
        form = await MultiPartParser(request.headers, one_chunk(), max_files=1, max_fields=4).parse()
    except MultiPartException as e:
        raise QueryError(422, f"bad multipart upload: {e.message}") from None
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise QueryError(422, "the multipart upload has no file field named 'file'")
    try:
        return await file.read()
    finally:
        await form.close()

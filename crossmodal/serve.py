"""Search a trained run, or an ensemble of runs, in the browser: type a sentence, see images;
click an image, read its captions; drop a photo, read its nearest captions. This module is the
HTTP app over a :class:`crossmodal.searcher.Searcher` and its command line.

    python -m crossmodal.serve --run runs/demo/img2text_bert --split val --coco-root data/demo
    python -m crossmodal.serve --run runs/demo --split val --coco-root data/demo   # best model of a pipeline
    python -m crossmodal.serve --run runs/demo/img2text_bert --run runs/demo/text2img_bert ...  # an ensemble
    make search                                                                     # the same, after make demo

Everything is loaded once at start-up and checked against each other by :mod:`crossmodal.runs`
(checkpoint, feature sidecars, embeddings, Faiss indexes, the split's annotations); a run whose
files do not fit is refused with one line (exit 2). Several ``--run`` serve their ensemble: the
averaged similarity of the members (:mod:`crossmodal.ensemble`), which must embed the same split
with the same ids; ``/api/info`` names every member. Endpoints (see the README for ``curl`` examples):

- ``GET  /api/info``                      the run, split, counts, index kind, validation metrics, limits
- ``GET  /api/text?q=SENTENCE&k=K``       nearest images of a sentence (its true image marked if it is a caption)
- ``GET  /api/image/{image_id}?k=K``      nearest captions of a split image (true ones marked) + more like it
- ``POST /api/upload?k=K``                a JPEG/PNG (multipart field ``file``, or the raw bytes): nearest
                                          captions and images of a photo from outside the dataset
- ``GET  /thumbs/{image_id}.jpg``, ``GET /images/{image_id}``  split images by COCO id only (thumbnails
                                          cached under ``<run>/serve_cache/``, or the user's cache
                                          folder when the run's cannot be written)

Every request is bounded (text length, k, upload bytes and pixels); a bad one gets a 4xx with
a one-line JSON ``{"error": ...}`` and the server keeps serving.
"""

import argparse
import errno
import logging
import threading
from pathlib import Path

from .batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_IMAGE_BATCH, DEFAULT_WAIT_MS
from .cli import (
    add_dataset_arg,
    int_in_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_script,
    setup_logging,
)
from .runs import resolve_run
from .searcher import CACHE_DIRNAME, Gallery, Searcher, caption_key, set_threads
from .serve_uploads import Limits, QueryError, decode_upload, read_upload

__all__ = ["Gallery", "Limits", "QueryError", "Searcher", "caption_key", "create_app", "decode_upload", "main",
           "resolve_run", "set_threads"]  # the query logic is crossmodal.searcher's; runs are opened by crossmodal.runs

log = logging.getLogger("crossmodal.serve")  # the same name under python -m

STATIC_DIR = Path(__file__).with_name("static")


# --- the web app ---------------------------------------------------------------------------


def create_app(searcher: Searcher):
    """The FastAPI app over one :class:`Searcher`: the JSON API, the page and the images."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    lim = searcher.limits
    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN, and this app works offline
    app = FastAPI(title="crossmodal search", description=__doc__.split("\n\n")[0], version="1",
                  docs_url=None, redoc_url=None)
    app.state.searcher = searcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(QueryError)
    async def _query_error(request, exc: QueryError):
        response = error(exc.status, exc.message)
        if exc.status == 503:  # busy: the upload slots and their queue are full
            response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {}
        name = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
        got = f", got {e['input']!r}" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
        return error(422, f"{name}: {e.get('msg', 'invalid')}{got}"[:300])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("error serving %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server keeps serving")

    k_query = Query(12, description=f"results to return, 1..{lim.max_k}")

    @app.get("/api/info")
    def info():
        return searcher.public_info()

    # the query answers are plain JSON types already (str, int, float, bool, lists, dicts): returned
    # as a JSONResponse they skip FastAPI's jsonable_encoder, whose walk over an answer's ~400
    # values was 1-1.5 ms of CPU per request, most of the app's own cost (BENCHMARKS.md, "Search app")
    @app.get("/api/text", response_class=JSONResponse)
    def text_query(q: str = Query(..., description=f"a sentence, at most {lim.max_text_chars} characters"),
                   k: int = k_query):
        return JSONResponse(searcher.text_query(q, k))

    @app.get("/api/image/{image_id}", response_class=JSONResponse)
    def image_query(image_id: int, k: int = k_query):
        return JSONResponse(searcher.image_query(image_id, k))

    @app.post("/api/upload", response_class=JSONResponse)
    async def upload_query(request: Request, k: int = k_query):
        searcher.check_k(k)
        with searcher.uploads.admit():  # 503 at once past slots + queue, before the body is read
            data = await read_upload(request, lim)
            return JSONResponse(await run_in_threadpool(searcher.upload_query, data, k))

    @app.get("/thumbs/{image_id}.jpg")
    def thumb(image_id: int):
        return FileResponse(thumbnail_file(searcher, image_id), media_type="image/jpeg",
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/images/{image_id}")
    def image(image_id: int):
        path = searcher.image_path(image_id)
        media = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower())
        if media is None:
            raise QueryError(415, f"image {image_id} is not a JPEG or PNG file")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)
_thumb_lock = threading.Lock()
_temp_caches: set[Path] = set()


def thumbnail_file(searcher, image_id: int) -> Path:
    """The thumbnail of a split image (:meth:`Searcher.thumbnail`), from a cache this process can
    write: when the run's (read-only storage, another user's folder, a full disk) cannot be, the
    thumbnails move, once and logged, to the user's cache folder
    (``~/.cache/crossmodal/thumbs/<digest of the run folder>``), then to a private temporary folder."""
    import tempfile

    from .outputs import json_digest
    from .runtimes import cache_dir

    while True:
        tried = searcher.cache_dir
        try:
            return searcher.thumbnail(image_id)
        except OSError as e:
            if e.errno not in _NOT_WRITABLE:
                raise
            with _thumb_lock:
                if searcher.cache_dir != tried:  # another request moved it already
                    continue
                user = cache_dir() / "thumbs" / json_digest(str(Path(searcher.run_dir).resolve()))
                if tried in _temp_caches:  # the last resort failed too: a 500, logged
                    raise
                nxt = user if tried != user else Path(tempfile.mkdtemp(prefix="crossmodal-thumbs-"))
                if nxt != user:
                    _temp_caches.add(nxt)
                log.warning("thumbnail cache %s cannot be written (%s): thumbnails go to %s", tried,
                            e.strerror or e, nxt)
                searcher.cache_dir = nxt


# --- command line --------------------------------------------------------------------------


def upload_mb(text: str) -> float:
    """A finite number of MB > 0 that is at least one byte and at most 1 TB."""
    v = positive_float(text)
    if not 2**-20 <= v <= 2**20:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: give a number of MB from 0.000001 to 1048576")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a trained run, or an ensemble of runs: a JSON API and a search "
                                            "page in the browser.")
    p.add_argument("--run", required=True, action="append",
                   help="a run folder (runs/<name>), or a pipeline output (runs/demo) for its best model by rsum; "
                        "repeat it to serve an ensemble (the runs' similarities averaged; same split and ids)")
    p.add_argument("--split", default="val", help="the split whose embeddings and index are served")
    p.add_argument("--coco-root", required=True, help="the COCO folder the split's images and captions are in")
    p.add_argument("--karpathy-file", default=None)
    add_dataset_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int_in_range(0, 65535), default=8000, help="port (0: any free one)")
    p.add_argument("--detector-weights", default=None, help="fasterrcnn runs: the weights file the features used")
    p.add_argument("--cache-dir", default=None, help=f"thumbnail cache (default <run>/{CACHE_DIRNAME})")
    p.add_argument("--max-upload-mb", type=upload_mb, default=Limits.max_upload_bytes / 2**20,
                   help="largest upload in MB (default %(default)g)")
    p.add_argument("--max-pixels", type=positive_int, default=Limits.max_pixels,
                   help="largest upload in decoded pixels, width x height (default %(default)d)")
    p.add_argument("--upload-slots", type=positive_int, default=None,
                   help="uploads decoded at once (default: the cores this process may use, at most 8)")
    p.add_argument("--upload-queue", type=non_negative_int, default=None,
                   help="uploads that may wait for a slot; more get 503 at once (default 4 x slots)")
    p.add_argument("--pixel-budget", type=positive_int, default=None,
                   help="pixels of all uploads decoded at once, >= --max-pixels (default max-pixels x min(slots, 2))")
    p.add_argument("--max-connections", type=positive_int, default=100,
                   help="open connections; more get 503 from uvicorn (default %(default)d)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch/Faiss threads per query (default 1: robust on busy cores, concurrent queries "
                        "use the others; BENCHMARKS.md)")
    p.add_argument("--max-batch", type=non_negative_int, default=DEFAULT_MAX_BATCH,
                   help="concurrent text queries encoded together at most (0: one at a time; default %(default)d)")
    p.add_argument("--max-upload-batch", type=non_negative_int, default=DEFAULT_MAX_IMAGE_BATCH,
                   help="the same for uploads (default %(default)d: not batched, no faster per image on a CPU; "
                        "encoded in parallel, one per --upload-slots; 0: one at a time)")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=DEFAULT_WAIT_MS,
                   help="longest a query waits for others to join its batch (default %(default)g)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(argv=None) -> None:
    p = parser()
    a = p.parse_args(argv)
    if a.pixel_budget is not None and a.pixel_budget < a.max_pixels:
        p.error(f"argument --pixel-budget: {a.pixel_budget} is below --max-pixels {a.max_pixels}: the largest "
                "allowed upload could never be decoded")
    if a.batch_wait_ms > 1000:
        p.error(f"argument --batch-wait-ms: {a.batch_wait_ms:g} is over 1000: every query alone would wait that long")
    setup_logging(a.verbose)
    set_threads(a.threads)
    limits = Limits(max_upload_bytes=int(a.max_upload_mb * 2**20), max_pixels=a.max_pixels,
                    upload_slots=a.upload_slots, upload_queue=a.upload_queue, pixel_budget=a.pixel_budget)
    log.info("uploads: %d decoded at once, %d more may wait, %d pixels in flight at most", limits.upload_slots,
             limits.upload_queue, limits.pixel_budget)
    searcher = Searcher.from_run(a.run, a.split, a.coco_root, a.karpathy_file, a.detector_weights, limits,
                                 a.cache_dir, a.dataset)
    searcher.set_batching(a.max_batch, a.batch_wait_ms, a.max_upload_batch)
    log.info("batching: %s", searcher.encoders.describe())
    if any(c != "given" for c in searcher.info["chosen"].split(" + ")):
        log.info("%s: %s", searcher.run_dir, searcher.info["chosen"])
    log.info("%s", searcher.startup_line())
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("bound to %s: the search page is reachable from other machines", a.host)
    import gc

    import uvicorn

    # what is loaded now lives as long as the server: out of the collector's scans, whose full
    # passes over a full-COCO gallery (760K objects) stopped every query for 135 ms (BENCHMARKS.md)
    gc.freeze()
    if a.port:
        check_port(a.host, a.port)
        log.info("open http://%s:%d/ (Ctrl-C stops)", a.host, a.port)
    else:  # the port is chosen when uvicorn binds: its own line says which
        log.info("--port 0: uvicorn's line below gives the address to open (Ctrl-C stops)")
    uvicorn.run(create_app(searcher), host=a.host, port=a.port, log_level="warning" if a.port else "info",
                access_log=False, limit_concurrency=a.max_connections)


def check_port(host: str, port: int) -> int:
    """``port`` if the server can listen on it, tried by binding it as uvicorn does
    (``SO_REUSEADDR``) before the page's address is printed (0: a free port's number). A port in
    use or an address that cannot be bound is one :class:`DataError` line (exit 2), not the page's
    address followed by uvicorn's error and exit code 3."""
    import socket

    from .errors import DataError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            return int(sock.getsockname()[1])
    except OSError as e:
        raise DataError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}"
                        f"{'; pick another --port (0: any free one)' if e.errno == errno.EADDRINUSE else ''}") from None


def main(argv=None) -> None:
    run_script(lambda: run(argv))


if __name__ == "__main__":
    main()

"""Search a trained run in the browser: type a sentence, see images; click an image, read its
captions; drop a photo, read its nearest captions. A JSON API and one offline page over it.

    python -m crossmodal.serve --run runs/demo/img2text_bert --split val --coco-root data/demo
    python -m crossmodal.serve --run runs/demo --split val --coco-root data/demo   # best model of a pipeline
    make search                                                                     # the same, after make demo

Everything is loaded once at start-up and checked against each other (checkpoint, feature
sidecars, embeddings, Faiss indexes, the split's annotations); a run whose files do not fit
is refused with one line (exit 2). Endpoints (see the README for ``curl`` examples):

- ``GET  /api/info``                      the run, split, counts, index kind, validation metrics, limits
- ``GET  /api/text?q=SENTENCE&k=K``       nearest images of a sentence (its true image marked if it is a caption)
- ``GET  /api/image/{image_id}?k=K``      nearest captions of a split image (true ones marked) + more like it
- ``POST /api/upload?k=K``                a JPEG/PNG (multipart field ``file``, or the raw bytes): nearest
                                          captions and images of a photo from outside the dataset
- ``GET  /thumbs/{image_id}.jpg``, ``GET /images/{image_id}``  split images by COCO id only (thumbnails
                                          cached under ``<run>/serve_cache/``)

Every request is bounded (text length, k, upload bytes and pixels); a bad one gets a 4xx with
a one-line JSON ``{"error": ...}`` and the server keeps serving.
"""

import argparse
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_IMAGE_BATCH, DEFAULT_WAIT_MS, QueryEncoders
from .cli import (
    has_visible_text,
    int_in_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_script,
    setup_logging,
)
from .errors import DataError, FeatureError, ModelError
from .serve_uploads import Limits, QueryError, UploadGate, decode_upload, read_upload

__all__ = ["Gallery", "Limits", "QueryError", "Searcher", "caption_key", "create_app", "decode_upload", "main",
           "resolve_run", "set_threads"]

log = logging.getLogger("crossmodal.serve")  # the same name under python -m

STATIC_DIR = Path(__file__).with_name("static")
_THREADS = {"n": None}  # set_threads(): threads per query, applied in every worker thread
_local = threading.local()
CACHE_DIRNAME = "serve_cache"


@dataclass
class Gallery:
    """The split as the index sees it. Rows follow the embeddings' order.

    ``img_ids`` (N_img,), ``cap_ids`` / ``cap_img_ids`` (N_cap,), ``cap_text`` (N_cap,) str;
    ``img_emb`` (N_img, d) for image-id queries; ``img_index`` over images, ``txt_index`` over captions."""

    img_ids: np.ndarray
    cap_ids: np.ndarray
    cap_img_ids: np.ndarray
    cap_text: list[str]
    img_emb: np.ndarray
    img_index: object
    txt_index: object
    image_paths: dict[int, Path] = field(default_factory=dict)

    def __post_init__(self):
        self.img_row = {int(i): r for r, i in enumerate(self.img_ids)}
        self.caps_of: dict[int, list[int]] = {}
        for r, i in enumerate(self.cap_img_ids.tolist()):
            self.caps_of.setdefault(int(i), []).append(r)
        self.images_of_text: dict[str, set[int]] = {}
        for t, i in zip(self.cap_text, self.cap_img_ids.tolist(), strict=True):
            self.images_of_text.setdefault(caption_key(t), set()).add(int(i))


def caption_key(text: str) -> str:
    """What makes a typed sentence "the same" as a caption: case, spacing and a final period ignored."""
    return " ".join(text.split()).casefold().rstrip(" .")


def rsum_of(metrics: dict) -> float:
    return float(sum(metrics.get(f"{d}_R@{k}", 0.0) for d in ("img2text", "text2img") for k in (1, 5, 10)))


def resolve_run(run: str | Path) -> tuple[Path, str]:
    """A run folder, or a pipeline output (``runs/demo``: ``summary.json``, one folder per model)
    -> its best model by validation rsum. Returns (run folder, how it was chosen)."""
    run = Path(run)
    summary = run / "summary.json"
    if not run.is_dir():
        hint = " (run `make demo` first)" if run.parts[-2:] == ("runs", "demo") or str(run) == "runs/demo" else ""
        raise FeatureError(f"--run {run}: no such folder{hint}")
    if any(run.glob("*.pt")):
        return run, "given"
    if not summary.is_file():
        raise FeatureError(f"--run {run} is neither a training run (no checkpoint .pt in it) nor a pipeline "
                           f"output (no summary.json): give runs/<name> or runs/<pipeline out>")
    try:
        results = json.loads(summary.read_text())["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FeatureError(f"{summary} is not a pipeline summary: {e}") from e
    ranked = sorted(((rsum_of(m), name) for name, m in results.items() if (run / name).is_dir()), reverse=True)
    if not ranked:
        raise FeatureError(f"{summary} names no model folder inside {run}")
    best_rsum, best = ranked[0]
    return run / best, f"best of {len(ranked)} models in {summary} by rsum ({best_rsum:.1f})"


def _same_encoder(recorded: dict, rebuilt: dict) -> list[str]:
    """Keys in which a rebuilt encoder differs from the one a feature file records. Paths
    (``file``, ``name_or_path``) may move between machines; digests and settings may not."""
    diff = [k for k in ("encoder", "settings") if recorded.get(k) != rebuilt.get(k)]
    rw, bw = recorded.get("weights") or {}, rebuilt.get("weights") or {}
    skip = {"file", "name_or_path"} if "sha256_16" in rw or "name_or_path" in rw else set()
    if {k: v for k, v in rw.items() if k not in skip} != {k: v for k, v in bw.items() if k not in skip}:
        diff.append("weights")
    return diff


def _feature_meta(run_dir: Path, recorded: str | None, what: str) -> tuple[Path, dict]:
    """The feature file an embedding sidecar names (recorded relative to the run folder) and its sidecar."""
    from .store import read_meta

    path = run_dir / str(recorded)
    if not recorded or not path.with_suffix(".json").is_file():
        raise FeatureError(f"the {what} features the embeddings were made from ({path}) cannot be found; "
                           "they were moved or deleted since get_features_captions.py ran")
    return path, read_meta(path)


class Searcher:
    """A run's heads, encoders, embeddings and indexes, loaded and checked once; thread-safe queries."""

    def __init__(self, run_dir: Path, split_name: str, gallery: Gallery, img_head, txt_head, text_encoder,
                 image_encoder, info: dict, limits: Limits | None = None, cache_dir: Path | None = None):
        self.run_dir, self.split_name, self.gallery = Path(run_dir), split_name, gallery
        self.img_head, self.txt_head = img_head, txt_head
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.info, self.limits = info, limits or Limits()
        self.cache_dir = Path(cache_dir) if cache_dir else self.run_dir / CACHE_DIRNAME
        # concurrent queries are encoded in batches; a text and an image batch may run at once,
        # each on its own core (see set_threads). set_batching() changes it (crossmodal.batching)
        self.encoders = QueryEncoders(self)
        self.uploads = UploadGate(self.limits)  # decode slots, pixel budget, queue (serve_uploads)

    # --- loading ---------------------------------------------------------------------

    @classmethod
    def from_run(cls, run: str | Path, split: str, coco_root: str | Path, karpathy_file: str | None = None,
                 detector_weights: str | None = None, limits: Limits | None = None, cache_dir: str | None = None):
        """Load and cross-check everything; raises the project's errors (one line each) on a misfit."""
        from .coco import load_split
        from .embed import embedding_paths, load_embeddings
        from .image_encoders import build_image_encoder
        from .index import describe, load_index
        from .retrieve import text_encoder_from_sidecar
        from .store import load_features
        from .train import check_features_fit, heads_from_checkpoint, load_checkpoint

        run_dir, chosen = resolve_run(run)
        img, txt, _, im, tm = load_embeddings(run_dir, split)
        for meta, what in ((im, "image"), (tm, "caption")):
            if meta.get("split") != split:
                raise FeatureError(f"{run_dir}: the {what} embeddings are of split {meta.get('split')!r}, "
                                   f"not {split!r}")
        # load_embeddings has checked that this checkpoint (relative to the run) is the one they came from
        ck_path = run_dir / im["checkpoint"]
        ck = load_checkpoint(ck_path)
        img_head, txt_head = heads_from_checkpoint(ck)
        out_dim = ck["head_config"]["img"]["out_dim"]
        if img.shape[1] != out_dim or txt.shape[1] != out_dim:
            raise FeatureError(f"embeddings in {run_dir / 'embeddings'} are {img.shape[1]}-d, the checkpoint's "
                               f"heads {out_dim}-d")
        paths = embedding_paths(run_dir, split)
        img_index = load_index(paths["img_index"], expect_ntotal=len(img))
        txt_index = load_index(paths["text_index"], expect_ntotal=len(txt))
        for index, p in ((img_index, paths["img_index"]), (txt_index, paths["text_index"])):
            if index.d != out_dim:
                raise FeatureError(f"Faiss index {p} is {index.d}-d, the embeddings {out_dim}-d")
        img_fpath, img_fmeta = _feature_meta(run_dir, im.get("features"), "image")
        txt_fpath, txt_fmeta = _feature_meta(run_dir, tm.get("features"), "caption")
        check_features_fit(ck, img_fmeta, txt_fmeta, f"({img_fpath}, {txt_fpath})")
        _check_heads_reproduce(img_head, img_fpath, im, img, "image", load_features)
        _check_heads_reproduce(txt_head, txt_fpath, tm, txt, "caption", load_features)

        sp = load_split(coco_root, split, karpathy_file, skip_bad=True)
        img_ids = np.asarray(im["ids"], dtype=np.int64)
        cap_ids = np.asarray(tm["ids"], dtype=np.int64)
        missing = np.setdiff1d(img_ids, sp.image_ids)
        text_of = dict(zip(sp.caption_ids.tolist(), sp.captions, strict=True))
        missing_caps = [c for c in cap_ids.tolist() if c not in text_of]
        if len(missing) or missing_caps:
            raise DataError(f"the embeddings of {run_dir} list {len(missing)} image ids and {len(missing_caps)} "
                            f"caption ids that split {split!r} of {coco_root} does not have (first: "
                            f"{(missing.tolist() + missing_caps)[:5]}): wrong --coco-root or --split?")
        file_of = {int(i): sp.image_path(r) for r, i in enumerate(sp.image_ids)}
        gallery = Gallery(img_ids=img_ids, cap_ids=cap_ids, cap_img_ids=np.asarray(tm["image_ids"], dtype=np.int64),
                          cap_text=[text_of[c] for c in cap_ids.tolist()], img_emb=np.ascontiguousarray(img),
                          img_index=img_index, txt_index=txt_index,
                          image_paths={i: file_of[i] for i in img_ids.tolist()})

        text_encoder = text_encoder_from_sidecar(txt_fmeta, txt_fpath)
        settings = dict(img_fmeta.get("settings") or {})
        weights = img_fmeta.get("weights") or {}
        if img_fmeta["encoder"] == "fasterrcnn":
            src = weights.get("source")
            if src == "file" and not detector_weights:
                raise ModelError(f"the image features of {run_dir} come from Faster R-CNN weights in a file "
                                 f"({weights.get('file')}): give the same file to --detector-weights")
            if src == "random":
                raise ModelError("the image features come from a Faster R-CNN with random weights (a test run)")
            settings = {"detector_weights": detector_weights or "torchvision", "detector_version": settings.get("arch"),
                        "top_n": settings.get("top_n"), "pooling": settings.get("pooling"),
                        "min_size": settings.get("min_size"), "max_size": settings.get("max_size")}
        image_encoder = build_image_encoder(img_fmeta["encoder"], **settings)
        for enc, meta, what in ((image_encoder, img_fmeta, "image"), (text_encoder, txt_fmeta, "caption")):
            diff = _same_encoder(meta, enc.describe())
            if diff:
                raise ModelError(f"the rebuilt {what} encoder differs from the one that made {what} features "
                                 f"({meta.get('encoder')}) in {', '.join(diff)}")
        image_encoder.eval()
        info = {
            "run": run_dir.name, "run_dir": str(run_dir), "chosen": chosen, "checkpoint": ck_path.name,
            "epoch": ck.get("epoch"), "split": split, "images": int(len(img_ids)), "captions": int(len(cap_ids)),
            "dim": int(out_dim), "index": describe(img_index)["type"],
            "direction": (ck.get("args") or {}).get("direction"),
            "text_encoder": f"{txt_fmeta['encoder']} ({(txt_fmeta.get('weights') or {}).get('model', 'trained')})",
            "image_encoder": img_fmeta["encoder"], "metrics": _run_metrics(run_dir, split, ck),
        }
        return cls(run_dir, split, gallery, img_head, txt_head, text_encoder, image_encoder, info, limits,
                   Path(cache_dir) if cache_dir else None)

    def startup_line(self) -> str:
        i = self.info
        return (f"serving {i['run']} ({i['checkpoint']}, epoch {i['epoch']}; {i['text_encoder']} captions, "
                f"{i['image_encoder']} images) on split {i['split']}: {i['images']} images, {i['captions']} "
                f"captions, index {i['index']} ({i['dim']}-d)")

    def public_info(self) -> dict:
        return {**{k: v for k, v in self.info.items() if k != "run_dir"}, "limits": self.limits.public(),
                "batching": self.encoders.describe()}

    def set_batching(self, max_batch: int, wait_ms: float, max_image_batch: int = DEFAULT_MAX_IMAGE_BATCH) -> None:
        """Encode up to ``max_batch`` concurrent text queries (``max_image_batch`` uploads) together, a
        query waiting at most ``wait_ms`` for others; 0: one query at a time (an upload batch of 1:
        unbatched uploads, one per decode slot at once). See :mod:`crossmodal.batching`."""
        self.encoders.close()
        self.encoders = QueryEncoders(self, max_batch, wait_ms, max_image_batch)

    # --- queries -----------------------------------------------------------------------

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise QueryError(422, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def text_query(self, text: str, k: int) -> dict:
        t0 = time.perf_counter()
        self.check_k(k)
        text = " ".join((text or "").split())
        if not has_visible_text(text):
            raise QueryError(422, "the query text is blank (no visible character): type some words")
        if len(text) > self.limits.max_text_chars:
            raise QueryError(413, f"the query text has {len(text)} characters; the limit is "
                                  f"{self.limits.max_text_chars}")
        q, batch = self.encoders.text(text)  # (1, d): encoder + head, in a batch with concurrent queries
        t2 = time.perf_counter()
        true_ids = self.gallery.images_of_text.get(caption_key(text), set())
        images = self._images(q, k, true_ids)
        t3 = time.perf_counter()
        return {"query": {"type": "text", "text": text, "k": k, "is_caption": bool(true_ids),
                          "true_image_ids": sorted(true_ids)}, "images": images,
                "ms": {**_ms(encode=t2 - t0, wait=batch["wait"], search=t3 - t2, total=t3 - t0),
                       "batch": batch["batch"]}}

    def image_query(self, image_id: int, k: int) -> dict:
        t0 = time.perf_counter()
        self.check_k(k)
        row = self.gallery.img_row.get(int(image_id))
        if row is None:
            raise QueryError(404, f"image {image_id} is not in split {self.split_name}")
        q = self.gallery.img_emb[row : row + 1]
        caps = self._captions(q, k, true_image=int(image_id))
        images = self._images(q, k + 1, {int(image_id)})
        images = [r for r in images if r["image_id"] != int(image_id)][:k]  # "more like this": not itself
        t1 = time.perf_counter()
        return {"query": {"type": "image", "image_id": int(image_id), "k": k, "url": _image_url(image_id),
                          "thumb_url": _thumb_url(image_id), "captions": self._true_captions(int(image_id))},
                "captions": caps, "images": images, "ms": _ms(search=t1 - t0, total=t1 - t0)}

    def upload_query(self, data: bytes, k: int) -> dict:
        """Nearest captions and images of an uploaded JPEG/PNG (bytes)."""
        t0 = time.perf_counter()
        self.check_k(k)
        # decoded and preprocessed in a decode slot; only the small input tensor leaves it
        x, (width, height) = decode_upload(data, self.limits, self.uploads,
                                           prepare=lambda im: (self.image_encoder.preprocess(im), im.size))
        t1 = time.perf_counter()
        q, batch = self.encoders.image(x)  # (1, d): encoder + head, in a batch with concurrent uploads
        t3 = time.perf_counter()
        caps = self._captions(q, k, true_image=None)
        images = self._images(q, k, set())
        t4 = time.perf_counter()
        return {"query": {"type": "upload", "k": k, "width": width, "height": height,
                          "bytes": len(data)},
                "captions": caps, "images": images,
                "ms": {**_ms(decode=t1 - t0, encode=t3 - t1, wait=batch["wait"], search=t4 - t3, total=t4 - t0),
                       "batch": batch["batch"]}}

    def _images(self, q: np.ndarray, k: int, true_ids: set[int]) -> list[dict]:
        from .index import search

        g = self.gallery
        _faiss_threads()
        D, I = search(g.img_index, q, k)
        out = []
        for s, r in zip(D[0].tolist(), I[0].tolist(), strict=True):
            if r < 0:
                continue
            iid = int(g.img_ids[r])
            out.append({"image_id": iid, "score": round(float(s), 4), "true": iid in true_ids,
                        "url": _image_url(iid), "thumb_url": _thumb_url(iid), "captions": self._true_captions(iid)})
        return out

    def _captions(self, q: np.ndarray, k: int, true_image: int | None) -> list[dict]:
        from .index import search

        g = self.gallery
        _faiss_threads()
        D, I = search(g.txt_index, q, k)
        out = []
        for s, r in zip(D[0].tolist(), I[0].tolist(), strict=True):
            if r < 0:
                continue
            iid = int(g.cap_img_ids[r])
            out.append({"caption_id": int(g.cap_ids[r]), "text": g.cap_text[r], "score": round(float(s), 4),
                        "image_id": iid, "true": iid == true_image, "url": _image_url(iid),
                        "thumb_url": _thumb_url(iid)})
        return out

    def _true_captions(self, image_id: int) -> list[str]:
        return [self.gallery.cap_text[r] for r in self.gallery.caps_of.get(image_id, [])]

    # --- images ------------------------------------------------------------------------

    def image_path(self, image_id: int) -> Path:
        path = self.gallery.image_paths.get(int(image_id))
        if path is None:
            raise QueryError(404, f"image {image_id} is not in split {self.split_name}")
        if not path.is_file():
            raise QueryError(404, f"image {image_id}: its file is missing on the server")
        return path

    def thumbnail(self, image_id: int) -> Path:
        """A JPEG thumbnail (longer side ``thumb_size``), made once and cached on disk (atomic write)."""
        from .coco import load_image

        src = self.image_path(image_id)
        from .store import safe_split_name

        out = self.cache_dir / safe_split_name(self.split_name) / f"{int(image_id)}_{self.limits.thumb_size}.jpg"
        if out.is_file():
            return out
        try:
            image = load_image(src, int(image_id))
        except DataError as e:
            raise QueryError(404, str(e)) from None
        image.thumbnail((self.limits.thumb_size, self.limits.thumb_size))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        image.save(tmp, format="JPEG", quality=85)
        os.replace(tmp, out)
        return out


def set_threads(n: int | None = None) -> int:
    """Threads of one query's torch and Faiss calls: ``n``, or the cores available to this
    process (:func:`crossmodal.cli.set_threads`). Returns the number set. The server uses 1: on
    this shared 2-core machine a second thread made a median text query 12.5 ms -> 480 ms while
    other jobs held the other core (every parallel region waits for its time slice), and saved
    under 20% when it was free (BENCHMARKS.md)."""
    from .cli import set_threads as set_torch_threads

    n = set_torch_threads(n)  # torch applies it in every thread
    _THREADS["n"] = n
    _faiss_threads()
    return n


def _faiss_threads() -> None:
    """Faiss's OpenMP thread count is per calling thread: set it once in each worker thread."""
    n = _THREADS["n"]
    if n is not None and getattr(_local, "faiss_threads", None) != n:
        import faiss

        faiss.omp_set_num_threads(n)
        _local.faiss_threads = n


def _check_heads_reproduce(head, feat_path: Path, emb_meta: dict, emb: np.ndarray, what: str, load_features,
                           n: int = 8) -> None:
    """The checkpoint's head applied to a few rows of the features must give the stored embeddings."""
    import torch

    feats, fmeta = load_features(feat_path)
    pos = {int(i): r for r, i in enumerate(fmeta["ids"])}
    rows = np.linspace(0, len(emb) - 1, min(n, len(emb))).astype(int)
    try:
        frows = [pos[int(emb_meta["ids"][r])] for r in rows]
    except KeyError:
        raise FeatureError(f"the {what} embeddings list ids that {feat_path} does not have") from None
    with torch.inference_mode():
        got = head(torch.from_numpy(np.array(feats[frows], dtype=np.float32))).numpy()
    if not np.allclose(got, emb[rows], atol=1e-3):
        raise FeatureError(f"the {what} embeddings do not come from this checkpoint's head applied to {feat_path} "
                           f"(max difference {np.abs(got - emb[rows]).max():.3g}): rerun get_features_captions.py")


def _run_metrics(run_dir: Path, split: str, ck: dict) -> dict:
    """Validation metrics to show: the split's scored metrics if any, else the best epoch's."""
    from .store import safe_split_name

    out: dict = {}
    for direction in ("img2text", "text2img"):
        p = run_dir / "retrieval" / f"{safe_split_name(split)}_{direction}_full_metrics.json"
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.update({k: v for k, v in rec.items() if k.startswith(direction + "_") and isinstance(v, (int, float))})
    if out:
        return {"source": f"retrieval on {split}", **out}
    best = ck.get("best") or {}
    vals = {k[4:]: v for k, v in best.items() if k.startswith("val_") and isinstance(v, (int, float))}
    return {"source": f"validation, best epoch {best.get('epoch')}", **vals} if vals else {}


def _ms(**secs) -> dict:
    return {k: round(v * 1000, 2) for k, v in secs.items()}


def _image_url(image_id: int) -> str:
    return f"/images/{int(image_id)}"


def _thumb_url(image_id: int) -> str:
    return f"/thumbs/{int(image_id)}.jpg"


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

    @app.get("/api/text")
    def text_query(q: str = Query(..., description=f"a sentence, at most {lim.max_text_chars} characters"),
                   k: int = k_query):
        return searcher.text_query(q, k)

    @app.get("/api/image/{image_id}")
    def image_query(image_id: int, k: int = k_query):
        return searcher.image_query(image_id, k)

    @app.post("/api/upload")
    async def upload_query(request: Request, k: int = k_query):
        searcher.check_k(k)
        with searcher.uploads.admit():  # 503 at once past slots + queue, before the body is read
            data = await read_upload(request, lim)
            return await run_in_threadpool(searcher.upload_query, data, k)

    @app.get("/thumbs/{image_id}.jpg")
    def thumb(image_id: int):
        return FileResponse(searcher.thumbnail(image_id), media_type="image/jpeg",
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


# --- command line --------------------------------------------------------------------------


def upload_mb(text: str) -> float:
    """A finite number of MB > 0 that is at least one byte and at most 1 TB."""
    v = positive_float(text)
    if not 2**-20 <= v <= 2**20:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: give a number of MB from 0.000001 to 1048576")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a trained run: a JSON API and a search page in the browser.")
    p.add_argument("--run", required=True,
                   help="a run folder (runs/<name>), or a pipeline output (runs/demo) for its best model by rsum")
    p.add_argument("--split", default="val", help="the split whose embeddings and index are served")
    p.add_argument("--coco-root", required=True, help="the COCO folder the split's images and captions are in")
    p.add_argument("--karpathy-file", default=None)
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
                                 a.cache_dir)
    searcher.set_batching(a.max_batch, a.batch_wait_ms, a.max_upload_batch)
    log.info("batching: %s", searcher.encoders.describe())
    if searcher.info["chosen"] != "given":
        log.info("%s: %s", searcher.run_dir, searcher.info["chosen"])
    log.info("%s", searcher.startup_line())
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("bound to %s: the search page is reachable from other machines", a.host)
    import gc

    import uvicorn

    # what is loaded now lives as long as the server: out of the collector's scans, whose full
    # passes over a full-COCO gallery (760K objects) stopped every query for 135 ms (BENCHMARKS.md)
    gc.freeze()
    log.info("open http://%s:%d/ (Ctrl-C stops)", a.host, a.port)
    uvicorn.run(create_app(searcher), host=a.host, port=a.port, log_level="warning", access_log=False,
                limit_concurrency=a.max_connections)


def main(argv=None) -> None:
    run_script(lambda: run(argv))


if __name__ == "__main__":
    main()

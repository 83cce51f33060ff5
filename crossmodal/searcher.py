"""The search server's query logic: a run (or an ensemble of runs) loaded once as a
:class:`Searcher`, and its thread-safe queries (a sentence -> images, a split image -> captions
and images, an uploaded photo -> captions and images), thumbnails and image files.

The runs are opened and every cross-check is made by :mod:`crossmodal.runs`; the HTTP app and
the command line are :mod:`crossmodal.serve`.
"""

from __future__ import annotations

import os
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batching import DEFAULT_MAX_IMAGE_BATCH, QueryEncoders
from .cli import has_visible_text
from .errors import DataError
from .serve_uploads import Limits, QueryError, UploadGate, decode_upload

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



class Searcher:
    """A run's (or an ensemble's) heads, encoders, embeddings and indexes, loaded once; thread-safe queries."""

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
    def from_run(cls, run, split: str, coco_root: str | Path, karpathy_file: str | None = None,
                 detector_weights: str | None = None, limits: Limits | None = None, cache_dir: str | None = None,
                 dataset: str = "auto"):
        """Load a run, or several (a list: their ensemble, :mod:`crossmodal.ensemble`), checked by
        :mod:`crossmodal.runs`; raises the project's errors (one line each) on a misfit."""
        from .coco import load_split
        from .index import describe
        from .runs import open_runs

        runs = [run] if isinstance(run, str | Path) else list(run)
        with open_runs(runs, split) as scored:  # no retraining while it loads
            members = scored.members()
            img_index, txt_index = scored.index("img"), scored.index("text")
            text_encoder, txt_head, image_encoder, img_head = scored.query_side(members, True, detector_weights)
        img, _, _, im, tm = scored.emb
        img_ids = np.asarray(im["ids"], dtype=np.int64)
        cap_ids = np.asarray(tm["ids"], dtype=np.int64)
        sp = load_split(coco_root, split, karpathy_file, skip_bad=True, dataset=dataset)
        scored.check_split(sp, coco_root)  # its ids, and the data its features were made from, as it is now
        text_of = dict(zip(sp.caption_ids.tolist(), sp.captions, strict=True))
        file_of = {int(i): sp.image_path(r) for r, i in enumerate(sp.image_ids)}
        gallery = Gallery(img_ids=img_ids, cap_ids=cap_ids, cap_img_ids=np.asarray(tm["image_ids"], dtype=np.int64),
                          cap_text=[text_of[c] for c in cap_ids.tolist()], img_emb=np.ascontiguousarray(img),
                          img_index=img_index, txt_index=txt_index,
                          image_paths={i: file_of[i] for i in img_ids.tolist()})
        described = [_describe(m) for m in members]
        info = {k: " + ".join(str(d[k]) for d in described) if scored.is_ensemble else described[0][k]
                for k in described[0]}
        info.update(run=scored.label, run_dir=str(scored.folder), split=split, images=int(len(img_ids)),
                    captions=int(len(cap_ids)), dim=int(img.shape[1]), index=describe(img_index)["type"],
                    caption_index=describe(txt_index)["type"],
                    runtimes={"text": runtime_of(text_encoder), "image": runtime_of(image_encoder)},
                    metrics=scored.metrics(members),
                    **({"members": [{"run": m.run.dir.name, **d} for m, d in zip(members, described, strict=True)]}
                       if scored.is_ensemble else {}))
        return cls(scored.folder, split, gallery, img_head, txt_head, text_encoder, image_encoder, info, limits,
                   Path(cache_dir) if cache_dir else members[0].run.dir / CACHE_DIRNAME)

    def startup_line(self) -> str:
        i = self.info
        return (f"serving {i['run']} ({i['checkpoint']}, epoch {i['epoch']}; {i['text_encoder']} captions, "
                f"{i['image_encoder']} images) on split {i['split']}: {i['images']} images, {i['captions']} "
                f"captions, index {i['index']} / {i['caption_index']} ({i['dim']}-d); query encoders: "
                f"{i['runtimes']['text']} (captions), {i['runtimes']['image']} (images)")

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
        # control characters (NUL, ESC, ...) separate words like white space; they never reach the encoder
        text = " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in (text or "")).split())
        if not has_visible_text(text):
            raise QueryError(422, "the query text is blank (no visible character): type some words")
        if "\ufffd" in text:
            raise QueryError(422, "the query text holds bytes that are not UTF-8 (shown as U+FFFD): type plain text")
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
        g = self.gallery
        out = []
        for score, r in _hits(g.img_index, q, k):
            iid = int(g.img_ids[r])
            out.append({"image_id": iid, "score": score, "true": iid in true_ids,
                        "url": _image_url(iid), "thumb_url": _thumb_url(iid), "captions": self._true_captions(iid)})
        return out

    def _captions(self, q: np.ndarray, k: int, true_image: int | None) -> list[dict]:
        g = self.gallery
        out = []
        for score, r in _hits(g.txt_index, q, k):
            iid = int(g.cap_img_ids[r])
            out.append({"caption_id": int(g.cap_ids[r]), "text": g.cap_text[r], "score": score,
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
        """A JPEG thumbnail (longer side ``thumb_size``), made once and cached on disk (atomic write).
        Its name carries the source file's size, modification and change time (as the feature
        stage's data digest does), so an image replaced since never gets its old thumbnail."""
        from .coco import load_image
        from .outputs import json_digest
        from .store import safe_split_name

        src = self.image_path(image_id)
        st = src.stat()
        stamp = json_digest([st.st_size, st.st_mtime_ns, st.st_ctime_ns])[:8]
        out = (self.cache_dir / safe_split_name(self.split_name) /
               f"{int(image_id)}_{self.limits.thumb_size}_{stamp}.jpg")
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


def _hits(index, q: np.ndarray, k: int) -> list[tuple[float, int]]:
    """The ``k`` nearest rows of ``index`` to one query ``q`` (1, d): (score rounded to 4 places, row), best
    first; Faiss's -1 fillers (fewer than ``k`` rows) left out."""
    from .index import search

    _faiss_threads()
    D, I = search(index, q, k)
    return [(round(float(s), 4), r) for s, r in zip(D[0].tolist(), I[0].tolist(), strict=True) if r >= 0]


def _ms(**secs) -> dict:
    return {k: round(v * 1000, 2) for k, v in secs.items()}


def _image_url(image_id: int) -> str:
    return f"/images/{int(image_id)}"


def _thumb_url(image_id: int) -> str:
    return f"/thumbs/{int(image_id)}.jpg"


def runtime_of(encoder) -> str:
    """What runs a query encoder and on how many threads, e.g. ``openvino bf16, 1 thread``
    (:mod:`crossmodal.runtimes`; ``torch`` for an encoder without another runtime, fastText
    included); an ensemble's encoders joined by `` + ``."""
    if hasattr(encoder, "unique"):  # crossmodal.ensemble.StackedEncoder
        return " + ".join(runtime_of(u) for u in encoder.unique)
    session = getattr(encoder, "session", None)
    if session is None:
        import torch

        return f"torch, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}"
    prec = getattr(session, "precision", None) or getattr(encoder, "precision", "fp32")
    return f"{encoder.runtime} {prec}, {session.threads} thread{'s' * (session.threads != 1)}"


def _describe(m) -> dict:
    """What ``/api/info`` says of one member (:class:`crossmodal.runs.Member`)."""
    t = m.txt_meta
    return {"chosen": m.run.chosen, "checkpoint": Path(m.checkpoint).name, "epoch": m.ck.get("epoch"),
            "direction": (m.ck.get("args") or {}).get("direction"),
            "text_encoder": f"{t['encoder']} ({(t.get('weights') or {}).get('model', 'trained')})",
            "image_encoder": m.img_meta["encoder"]}

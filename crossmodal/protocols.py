"""The standard test protocols (COCO 5K/1K, Flickr8k/Flickr30k 1K), exactly as published, and the
extra-positive metrics.

- **5K / 1K** (VSE++, SCAN, VSE∞, CLIP): the Karpathy test split, 5,000 images with exactly 5
  captions each, the 25,000 captions in the order that ``eccv-caption`` ships
  (``eccv_caption/data/coco_test_ids.npy``); images in the order of their captions' first
  appearance (5 consecutive captions per image). 1K fold f = captions 5,000·f to 5,000·(f+1)
  and their 1,000 images; metrics averaged over the five folds. Whatever the row order of a
  split's embeddings, :func:`standard_order` selects and reorders their rows into this order;
  the 6th/7th captions some test images have are dropped. The numbers themselves come from the
  project's exact chunked ranks (:func:`crossmodal.metrics.evaluate_protocol`).
- **eccv**: on the same 5K set, ECCV Caption R@1, R-Precision and mAP@R (Chun et al., ECCV
  2022: human-verified extra positives for 1,261 query images and 1,332 query captions) and
  CxC R@1/5/10 (Parekh et al., EACL 2021, Crisscrossed Captions), computed by ``eccv-caption``'s
  reference code (``eccv_caption.Metrics``) from exact top-K lists, K at least the largest
  number of positives of any query (so R-Precision and mAP@R see every positive's slot).
- **Flickr 1K** (``1k`` on a Flickr8k / Flickr30k split; Karpathy & Fei-Fei, VSE++, SCAN, VSE∞):
  the 1,000 test images (Flickr8k's ``Flickr_8k.testImages.txt`` = Karpathy's ``test``; Flickr30k:
  Karpathy's ``test``) with their captions 0-4 each, images by id, caption ``5i+n`` = caption n of
  image i (:func:`flickr_order`); one fold. Which dataset a run's embeddings come from is read from
  the feature sidecar's ``source`` (:func:`embedded_dataset`).

All recall-type numbers are percentages (100 x share of queries), as in the papers; the
definitions are in :data:`METRIC_DEFINITIONS` and in the README.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, ModelError
from .metrics import DIRECTIONS, RECALL_KS, evaluate_protocol, writable_f32
from .published import PUBLISHED, PUBLISHED_LABEL
from .splits import dataset_of_source

log = logging.getLogger(__name__)

PROTOCOLS = ("full", "5k", "1k", "eccv")
STANDARD_PROTOCOLS = ("5k", "1k", "eccv")
N_TEST_IMAGES, CAPTIONS_PER_IMAGE = 5000, 5
N_FLICKR_TEST_IMAGES = 1000
ECCV_PIN = "eccv-caption==0.1.0"
_SHORT = {"img2text": "i2t", "text2img": "t2i"}

PROTOCOL_HELP = {
    "full": "the whole split, every caption",
    "5k": "Karpathy test, 5,000 images x 5 captions in the standard (eccv-caption) order",
    "1k": "Karpathy test, mean over the five standard 1,000-image folds (Flickr8k / Flickr30k: the 1,000 test "
          "images x 5 captions)",
    "eccv": "Karpathy test 5K, plus ECCV Caption R@1 / R-Precision / mAP@R and CxC R@1/5/10 (eccv-caption)",
}

METRIC_DEFINITIONS = {
    "R@K": "100 x share of queries with a relevant item (COCO: an image's own captions / a caption's own image) "
           "in the top K (VSE++/SCAN protocol); exact chunked ranks, crossmodal.metrics",
    "ECCV_R@1": "100 x share of ECCV Caption queries whose top-1 item is an ECCV positive (COCO + CxC + "
                "human-verified positives); eccv_caption.Metrics (Chun et al., ECCV 2022)",
    "ECCV_R-P": "R-Precision x 100: for a query with R ECCV positives, the share of positives in its top R, "
                "averaged over ECCV queries; eccv_caption.Metrics",
    "ECCV_mAP@R": "mAP@R x 100: for a query with R ECCV positives, the mean over r = 1..R of precision@r counted "
                  "only where the item at rank r is a positive (0 elsewhere), averaged over ECCV queries; "
                  "eccv_caption.Metrics (Musgrave et al. 2020 definition)",
    "CxC_R@K": "100 x share of queries with a CxC positive (COCO pairs + Crisscrossed Captions image-caption "
               "ratings, Parekh et al. EACL 2021) in the top K, over all 5,000 images / the 24,972 captions "
               "CxC covers; eccv_caption.Metrics",
}



def published(protocol: str, dataset: str = "coco") -> list[dict]:
    """The published rows of ``protocol`` on ``dataset`` (none for ``full`` or ``eccv``)."""
    return [r for r in PUBLISHED if r["protocol"] == protocol and r.get("dataset", "coco") == dataset]


def embedded_dataset(run_dir: str | Path, img_meta: dict) -> str:
    """``coco``, ``flickr8k`` or ``flickr30k``: the dataset a run's embeddings (``img_meta``, their
    sidecar) were made from, read from the ``source`` of the feature sidecar they name (or, when those
    features are gone, from what the embeddings recorded of them: ``features_job.source``)."""
    from .store import read_meta

    recorded = dataset_of_source((img_meta.get("features_job") or {}).get("source") or "")  # features moved since
    feats = img_meta.get("features")
    if not feats:
        return recorded
    try:
        return dataset_of_source(read_meta(Path(run_dir) / feats).get("source", ""))
    except (OSError, DataError, ModelError, ValueError):
        return recorded


# --- the standard caption order ---------------------------------------------------------


def eccv_data_dir() -> Path:
    """The data folder shipped inside the installed ``eccv-caption`` package (read without importing it)."""
    spec = importlib.util.find_spec("eccv_caption")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the standard COCO test order needs the package eccv-caption: pip install {ECCV_PIN}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.lru_cache(maxsize=1)
def standard_caption_ids() -> np.ndarray:
    """The 25,000 Karpathy test caption ids in the standard order, (25000,) int64."""
    path = eccv_data_dir() / "coco_test_ids.npy"
    if not path.is_file():
        raise ModelError(f"{path} is missing from the eccv-caption install: reinstall {ECCV_PIN}")
    ids = np.load(path).astype(np.int64)
    if ids.shape != (N_TEST_IMAGES * CAPTIONS_PER_IMAGE,):
        raise ModelError(f"{path} holds {ids.shape} ids, expected 25,000: reinstall {ECCV_PIN}")
    return ids


@dataclass
class StandardOrder:
    """Rows of a split's embeddings in the standard order: ``img_rows`` (5000,), ``cap_rows`` (25000,);
    caption ``5i..5i+4`` belong to image ``i``. ``img_ids``, ``cap_ids``: their COCO ids."""

    img_rows: np.ndarray
    cap_rows: np.ndarray
    img_ids: np.ndarray
    cap_ids: np.ndarray
    dropped_captions: int
    order: str = "Karpathy test, 5 captions per image in eccv-caption's coco_test_ids.npy order"

    @property
    def cap_img_rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.img_rows)), CAPTIONS_PER_IMAGE)

    def info(self) -> dict:
        return {"images": len(self.img_rows), "captions": len(self.cap_rows),
                "dropped_captions": self.dropped_captions, "order": self.order}


def standard_order(img_ids, cap_ids, cap_img_ids, split: str = "?") -> StandardOrder:
    """Select and reorder a split's rows into the standard 5K order.

    ``img_ids`` (N_img,) and ``cap_ids``, ``cap_img_ids`` (N_cap,) are the COCO ids in the rows'
    order (the embeddings' sidecars). Raises :class:`DataError` unless the split is the Karpathy
    test set: all 25,000 standard captions, with the images they belong to, and no other image.
    """
    img_ids = np.asarray(img_ids, dtype=np.int64)
    cap_ids = np.asarray(cap_ids, dtype=np.int64)
    cap_img_ids = np.asarray(cap_img_ids, dtype=np.int64)
    std = standard_caption_ids()
    order = np.argsort(cap_ids, kind="stable")
    pos = np.clip(np.searchsorted(cap_ids, std, sorter=order), 0, max(len(cap_ids) - 1, 0))
    cap_rows = order[pos] if len(cap_ids) else np.zeros(len(std), np.int64)
    missing = ~(cap_ids[cap_rows] == std) if len(cap_ids) else np.ones(len(std), bool)
    if missing.any():
        raise DataError(f"split {split!r} is not the Karpathy test set: it lacks {int(missing.sum()):,} of the "
                        f"25,000 standard test captions (e.g. ids {std[missing][:3].tolist()}); the 5k/1k/eccv "
                        f"protocols need the Karpathy 'test' split (--karpathy-file dataset_coco.json --split test)")
    std_img = cap_img_ids[cap_rows].reshape(N_TEST_IMAGES, CAPTIONS_PER_IMAGE)
    bad = np.flatnonzero((std_img != std_img[:, :1]).any(axis=1))
    if len(bad) or len(np.unique(std_img[:, 0])) != N_TEST_IMAGES:
        where = f" (first bad block: captions {std[5 * bad[0] : 5 * bad[0] + 5].tolist()})" if len(bad) else ""
        raise DataError(f"split {split!r}: its standard test captions do not map to 5,000 images, 5 each, as in "
                        f"the Karpathy test set{where}")
    test_imgs = std_img[:, 0]
    img_order = np.argsort(img_ids, kind="stable")
    ipos = np.clip(np.searchsorted(img_ids, test_imgs, sorter=img_order), 0, max(len(img_ids) - 1, 0))
    img_rows = img_order[ipos]
    absent = img_ids[img_rows] != test_imgs
    if absent.any():
        raise DataError(f"split {split!r} lacks the embeddings of {int(absent.sum())} Karpathy test images "
                        f"(e.g. ids {test_imgs[absent][:3].tolist()})")
    if len(img_ids) != N_TEST_IMAGES:
        extra = np.setdiff1d(img_ids, test_imgs)
        raise DataError(f"split {split!r} is not the Karpathy test set: it has {len(extra):,} images outside it "
                        f"(e.g. ids {extra[:3].tolist()}); score the 'test' split alone for the 5k/1k/eccv protocols")
    dropped = len(cap_ids) - len(std)
    if dropped:
        log.info("split %s: %d captions beyond the standard 5 per image are left out of the protocol", split, dropped)
    return StandardOrder(img_rows, cap_rows, test_imgs, std, dropped)


def flickr_order(img_ids, cap_ids, cap_img_ids, split: str = "?", n_images: int = N_FLICKR_TEST_IMAGES
                 ) -> StandardOrder:
    """Select and reorder a Flickr test split's rows into the standard 1K layout: the images by id,
    each with its captions 0-4 (ids ``image_id * 10 + n``, :mod:`crossmodal.flickr`), caption
    ``5i+n`` = caption n of image i. Ids as in :func:`standard_order`; raises :class:`DataError`
    unless the split has exactly ``n_images`` images, each with its five captions."""
    img_ids = np.asarray(img_ids, dtype=np.int64)
    cap_ids = np.asarray(cap_ids, dtype=np.int64)
    cap_img_ids = np.asarray(cap_img_ids, dtype=np.int64)
    if len(img_ids) != n_images:
        raise DataError(f"split {split!r} has {len(img_ids):,} images: the Flickr 1K protocol scores the {n_images:,} "
                        "test images (Flickr8k: --split test; Flickr30k: Karpathy's test split)")
    img_rows = np.argsort(img_ids, kind="stable")
    test_imgs = img_ids[img_rows]
    want = (test_imgs[:, None] * 10 + np.arange(CAPTIONS_PER_IMAGE)).ravel()
    order = np.argsort(cap_ids, kind="stable")
    pos = np.clip(np.searchsorted(cap_ids, want, sorter=order), 0, max(len(cap_ids) - 1, 0))
    cap_rows = order[pos] if len(cap_ids) else np.zeros(len(want), np.int64)
    missing = ~(cap_ids[cap_rows] == want) if len(cap_ids) else np.ones(len(want), bool)
    missing |= cap_img_ids[cap_rows] != np.repeat(test_imgs, CAPTIONS_PER_IMAGE) if len(cap_ids) else missing
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise DataError(f"split {split!r}: {int(missing.sum()):,} of the {len(want):,} captions 0-4 of its images are "
                        f"missing (first: caption {first % CAPTIONS_PER_IMAGE} of image "
                        f"{test_imgs[first // CAPTIONS_PER_IMAGE]}, id {want[first]}); the Flickr 1K protocol needs "
                        "five captions per image, ids by the Flickr id rule")
    return StandardOrder(img_rows, cap_rows, test_imgs, want, len(cap_ids) - len(want),
                         order="Flickr test: images by photo id, captions 0-4 of each")


# --- scoring ----------------------------------------------------------------------------


def evaluate_split(img_emb, text_emb, cap_img_rows, img_ids, cap_ids, cap_img_ids, protocol: str = "full",
                   split: str = "?", directions=DIRECTIONS, chunk: int = 1024, with_curves: bool = False,
                   dataset: str = "coco") -> dict:
    """Every metric of ``protocol`` for a split's embeddings, ``img_emb`` (N_img, d), ``text_emb``
    (N_cap, d), ``cap_img_rows`` (N_cap,), with their COCO ids (sidecar order).

    ``full`` scores the rows as they are. ``5k``/``1k``/``eccv`` first reorder them into the
    standard order (:func:`standard_order`); R@K, P@K, mAP, medr, meanr always come from the
    exact chunked ranks of :func:`crossmodal.metrics.evaluate_protocol`; ``eccv`` adds
    :func:`eccv_metrics`. The result has ``protocol_info`` (what was scored) for non-full protocols.
    On a Flickr ``dataset``, ``1k`` is the Flickr 1K test (:func:`flickr_order`, one fold); 5k/eccv are COCO's.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}: {', '.join(PROTOCOLS)}")
    if protocol == "full":
        return evaluate_protocol(img_emb, text_emb, cap_img_rows, "full", directions=directions, chunk=chunk,
                                 with_curves=with_curves)
    if dataset != "coco":
        if protocol != "1k":
            raise DataError(f"--protocol {protocol} is COCO's (Karpathy 5K test); split {split!r} is {dataset}: "
                            "use --protocol 1k (its 1,000 test images) or full")
        so = flickr_order(img_ids, cap_ids, cap_img_ids, split)
        img = np.ascontiguousarray(np.asarray(img_emb)[so.img_rows], dtype=np.float32)
        txt = np.ascontiguousarray(np.asarray(text_emb)[so.cap_rows], dtype=np.float32)
        m = evaluate_protocol(img, txt, so.cap_img_rows, "full", directions=directions, chunk=chunk,
                              with_curves=with_curves)
        m["protocol_info"] = dict(so.info(), folds=1, dataset=dataset,
                                  definitions={"R@K": METRIC_DEFINITIONS["R@K"]})
        return m
    so = standard_order(img_ids, cap_ids, cap_img_ids, split)
    img = np.ascontiguousarray(np.asarray(img_emb)[so.img_rows], dtype=np.float32)
    txt = np.ascontiguousarray(np.asarray(text_emb)[so.cap_rows], dtype=np.float32)
    base = "1k" if protocol == "1k" else "5k"
    m = evaluate_protocol(img, txt, so.cap_img_rows, base, directions=directions, chunk=chunk,
                          with_curves=with_curves and base == "5k")
    if protocol == "eccv":
        m.update(eccv_metrics(img, txt, so.img_ids, so.cap_ids, directions=directions, chunk=chunk))
    m["protocol_info"] = dict(so.info(), folds=5 if base == "1k" else 1,
                              definitions={k: v for k, v in METRIC_DEFINITIONS.items()
                                           if protocol == "eccv" or k == "R@K"})
    return m


def exact_topk(queries, gallery, k: int, chunk: int = 1024) -> np.ndarray:
    """Rows of the ``k`` best gallery items per query, best first, ties broken by gallery order
    (the order :func:`crossmodal.metrics.relevant_ranks` ranks by). ``queries`` (Q, d), ``gallery``
    (G, d) -> (Q, k) int64; inner product, computed in query chunks."""
    q = torch.from_numpy(writable_f32(queries))
    gt = torch.from_numpy(writable_f32(gallery)).t().contiguous()
    k = min(k, gt.shape[1])
    out = np.empty((len(q), k), dtype=np.int64)
    with torch.inference_mode():
        for a in range(0, len(q), chunk):
            sims_t = q[a : a + chunk] @ gt  # (B, G)
            s_cand, cand = (x.numpy() for x in torch.topk(sims_t, k, dim=1))  # best first; ties in any order
            sims = sims_t.numpy()
            kth = s_cand[:, -1:]
            rows = np.lexsort((cand, -s_cand), axis=1)
            out[a : a + len(sims)] = np.take_along_axis(cand, rows, 1)
            # a tie across the k-th place: keep the tied items that come first in the gallery
            for r in np.flatnonzero(np.count_nonzero(sims >= kth, axis=1) > k):
                ids = np.flatnonzero(sims[r] >= kth[r, 0])
                out[a + r] = ids[np.lexsort((ids, -sims[r, ids]))][:k]
    return out


@functools.lru_cache(maxsize=1)
def _eccv_reference():
    """``eccv_caption.Metrics()``, loaded quietly (it warns when ``ujson`` is absent; it only reads
    the annotation files it ships, nothing is downloaded)."""
    if importlib.util.find_spec("eccv_caption") is None:
        raise ModelError(f"--protocol eccv needs the package eccv-caption: pip install {ECCV_PIN}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics

        return Metrics()


def eccv_topk_needed() -> dict[str, int]:
    """Top-K length per direction: the most ECCV positives of any query, and at least 10 (CxC R@10)."""
    ref = _eccv_reference()
    return {d: max(max(RECALL_KS), max(len(v) for v in ref.eccv_gts[_SHORT[d]].values())) for d in DIRECTIONS}


def eccv_metrics(img_emb, text_emb, img_ids, cap_ids, directions=DIRECTIONS, chunk: int = 1024,
                 topk: dict | None = None) -> dict:
    """ECCV Caption R@1, R-Precision, mAP@R and CxC R@1/5/10 (percentages) through ``eccv-caption``.

    ``img_emb`` (5000, d) and ``text_emb`` (25000, d) in the standard order, with their COCO ids.
    Top-K lists are exact (:func:`exact_topk`) over these 5,000 images / 25,000 captions, K from
    :func:`eccv_topk_needed` unless ``topk`` gives it per direction.
    """
    ref = _eccv_reference()
    need = eccv_topk_needed()
    img_ids, cap_ids = np.asarray(img_ids, dtype=np.int64), np.asarray(cap_ids, dtype=np.int64)
    m: dict = {}
    for d in directions:
        k = (topk or {}).get(d, need[d])
        if k < need[d]:
            raise DataError(f"ECCV metrics of {d} need top-{need[d]} lists (the most positives of a query), got {k}")
        q, g, qid, gid = (img_emb, text_emb, img_ids, cap_ids) if d == "img2text" else (
            text_emb, img_emb, cap_ids, img_ids)
        top = gid[exact_topk(q, g, k, chunk=chunk)]
        items = {_SHORT[d]: dict(zip(qid.tolist(), top.tolist(), strict=True))}
        with contextlib.redirect_stderr(io.StringIO()):  # eccv-caption's tqdm bars ignore its verbose flag
            ecc = ref.eccv_metrics(items, _SHORT[d])
            cxc = {kk: ref.cxc_recalls(items, _SHORT[d], K=kk)[_SHORT[d]] for kk in RECALL_KS}
        m[f"{d}_ECCV_R@1"] = 100.0 * float(ecc["eccv_r1"][_SHORT[d]])
        m[f"{d}_ECCV_R-P"] = 100.0 * float(ecc["eccv_rprecision"][_SHORT[d]])
        m[f"{d}_ECCV_mAP@R"] = 100.0 * float(ecc["eccv_map_at_r"][_SHORT[d]])
        for kk in RECALL_KS:
            m[f"{d}_CxC_R@{kk}"] = 100.0 * float(cxc[kk])
        m[f"{d}_ECCV_topk"] = int(k)
    return m


def eccv_queries() -> dict[str, int]:
    """How many queries ECCV Caption has per direction (1,261 images, 1,332 captions)."""
    ref = _eccv_reference()
    return {d: len(ref.eccv_gts[_SHORT[d]]) for d in DIRECTIONS}


# --- what the printed tables show ---------------------------------------------------------

_NAMES = {"coco": "COCO", "flickr8k": "Flickr8k", "flickr30k": "Flickr30k"}
ECCV_TABLE_KEYS = ("R@1", "R@5", "R@10", "ECCV_R@1", "ECCV_R-P", "ECCV_mAP@R", "CxC_R@1", "CxC_R@5",
                   "CxC_R@10")


def published_rows(protocol: str, direction: str, dataset: str = "coco") -> dict[str, dict]:
    """Published R@1 of ``direction`` on ``protocol`` and ``dataset``, one row per model (empty unless 1k or 5k)."""
    return {r["model"]: {"R@1": r[f"{direction}_R@1"]} for r in published(protocol, dataset)}


def table_notes(protocol: str, direction: str | None = None, dataset: str = "coco") -> list[str]:
    """Lines printed under a results table: where the published rows come from, and what the
    extra-positive columns mean. Nothing for ``full``."""
    lines = []
    pubs = published(protocol, dataset)
    if pubs:
        where = "Karpathy test" if dataset == "coco" else "1,000 test images x 5 captions"
        lines.append(f"sources of the {PUBLISHED_LABEL.split(' (')[0]} rows ({_NAMES[dataset]} {protocol.upper()}, "
                     f"{where}; R@1 in %):")
        for r in pubs:
            rsum = f", rsum {r['rsum']}" if "rsum" in r else ""
            t2i = "-" if r["text2img_R@1"] is None else r["text2img_R@1"]
            lines.append(f"  {r['model']}: i2t {r['img2text_R@1']} / t2i {t2i}{rsum} -- {r['source']}")
    if protocol == "eccv":
        lines.append("columns (all in %): R@K = COCO 5K (exact chunked ranks, this project); ECCV_* and CxC_* "
                     f"through eccv-caption ({ECCV_PIN}) from exact top-K lists:")
        lines += [f"  {k}: {v}" for k, v in METRIC_DEFINITIONS.items() if k != "R@K"]
    return lines


def protocol_title(protocol: str, info: dict | None) -> str:
    """What a protocol scored, for a table title: '' for full."""
    if not info:
        return ""
    folds = f", mean of {info['folds']} folds of 1,000 images" if info.get("folds", 1) > 1 else ""
    extra = f"; {info['dropped_captions']} extra captions left out" if info.get("dropped_captions") else ""
    where = f" of the {_NAMES[info['dataset']]} test" if info.get("dataset") else ""
    return f"{info['images']:,} images x 5 captions in the standard order{where}{folds}{extra}"

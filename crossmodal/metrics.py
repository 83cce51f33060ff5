"""Retrieval metrics, exact, without sorting the gallery.

Relevance is given in CSR form: the relevant gallery items of query ``q`` are
``rel_idx[rel_ptr[q]:rel_ptr[q+1]]``. For img2text a query image's relevant items are all its
captions; for text2img a caption's one relevant item is its image
(:func:`img2text_relevance`, :func:`text2img_relevance`).

Ranking is by descending similarity, ties broken by gallery order (as a stable sort of the
negated scores). A relevant item's 0-based rank is the number of gallery items scored above
it, plus the number of equal-scored items before it in the gallery; it is computed from
query chunks of the similarity matrix, so memory stays ``O(chunk x G)``.

Definitions (DESIGN.md): P@K = relevant in top K / K; AP = mean over the relevant items of
the precision at each one's rank; R@K = 100 x share of queries with a relevant item in the
top K; medr = floor(median of first-relevant 0-based rank) + 1 (the VSE++ convention);
meanr = mean of first-relevant 1-based rank; rsum = the six R@{1,5,10} added up.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import DataError

log = logging.getLogger(__name__)

DIRECTIONS = ("img2text", "text2img")
RECALL_KS = (1, 5, 10)


def writable_f32(x) -> np.ndarray:
    """``x`` as a C-contiguous float32 array torch may wrap: copied only when it is not one already or
    is read-only (a memory-mapped embedding file)."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    return a if a.flags.writeable else a.copy()


def img2text_relevance(cap_img_rows: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR relevance for image queries over a caption gallery. ``cap_img_rows`` (N_cap,)."""
    cap_img_rows = np.asarray(cap_img_rows, dtype=np.int64)
    order = np.argsort(cap_img_rows, kind="stable")
    ptr = np.zeros(num_images + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(cap_img_rows, minlength=num_images))
    return ptr, order


def text2img_relevance(cap_img_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR relevance for caption queries over an image gallery: one item each."""
    cap_img_rows = np.asarray(cap_img_rows, dtype=np.int64)
    return np.arange(len(cap_img_rows) + 1, dtype=np.int64), cap_img_rows.copy()


def _sweep(q: torch.Tensor, gt: torch.Tensor, chunk: int):
    """``(start, sims)`` per chunk of ``chunk`` query rows: ``sims`` (B, G) = ``q[a:b] @ gt`` as
    numpy, written into ONE reused buffer (a fresh 100 MB block per 1,024 x 25,000 chunk cost as
    much as the matmul itself in page faults, bench/metrics_bench.py). Each chunk is overwritten
    by the next: use it before asking for the next."""
    buf = torch.empty((min(chunk, len(q)), gt.shape[1]), dtype=torch.result_type(q, gt))
    for a in range(0, len(q), chunk):
        out = buf[: min(chunk, len(q) - a)]
        torch.mm(q[a : a + chunk], gt, out=out)
        yield a, out.numpy()


def relevant_ranks(
    queries: torch.Tensor | np.ndarray, gallery: torch.Tensor | np.ndarray, rel_ptr: np.ndarray,
    rel_idx: np.ndarray, chunk: int = 1024,
) -> np.ndarray:
    """0-based ranks of every relevant item, CSR-aligned with ``rel_idx`` and sorted within each
    query. ``queries`` (Q, d), ``gallery`` (G, d); similarity = inner product."""
    return _ranks(queries, gallery, rel_ptr, rel_idx, chunk)[0]


def _ranks(queries, gallery, rel_ptr, rel_idx, chunk, band=None):
    """(ranks, scores, above, found). ``ranks``: :func:`relevant_ranks`. ``scores``: the relevant
    items' similarities as the matrix holds them, CSR-aligned with ``rel_idx`` (unsorted), float32.
    With ``band`` = (lo, hi, own), ``lo``/``hi`` (G,) float32 and ``own`` (G,) each gallery
    column's own query: ``above`` (G,) int64, per column the queries scored above ``hi``, and
    ``found``, (query, column, score) arrays of the scores inside ``[lo, hi]`` of every column
    where a query other than its own lies there. Without ``band``, None and []."""
    q = queries if torch.is_tensor(queries) else torch.from_numpy(np.array(queries, dtype=np.float32))
    g = gallery if torch.is_tensor(gallery) else torch.from_numpy(np.array(gallery, dtype=np.float32))
    gt = g.t().contiguous()
    rel_ptr = np.asarray(rel_ptr, dtype=np.int64)
    rel_idx = np.asarray(rel_idx, dtype=np.int64)
    n_rel = np.diff(rel_ptr)
    if len(n_rel) != len(q):
        raise ValueError(f"relevance lists {len(n_rel)} queries, embeddings have {len(q)}")
    if n_rel.min(initial=1) < 1:
        raise ValueError(f"query {int(np.argmin(n_rel))} has no relevant item")
    out = np.empty(len(rel_idx), dtype=np.int64)
    scores = np.empty(len(rel_idx), dtype=np.float32)
    above = np.zeros(gt.shape[1], dtype=np.int64) if band else None
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    threads = max(1, torch.get_num_threads())
    with torch.inference_mode(), ThreadPoolExecutor(threads) as pool:
        for a, sims in _sweep(q, gt, chunk):
            b = a + len(sims)
            counts = n_rel[a:b]
            width = int(counts.max())
            # padded relevant matrix (B, width); padding repeats the query's first relevant item
            offs = np.minimum(np.arange(width)[None, :], counts[:, None] - 1)
            rel = rel_idx[rel_ptr[a:b, None] + offs]
            s_rel = np.take_along_axis(sims, rel, axis=1)  # (B, width)
            ranks = np.empty((b - a, width), dtype=np.int64)
            ties = np.zeros(b - a, dtype=bool)
            step = -(-(b - a) // threads)
            jobs = [(sims, s_rel, ranks, ties, lo, lo + step, band) for lo in range(0, b - a, step)]
            parts = list(pool.map(_count_rows, *zip(*jobs, strict=True)))
            if band:
                lo_t, hi_t, own = band
                gt_hi = np.sum([p[0] for p in parts], axis=0)
                above += gt_hi
                in_band = np.sum([p[1] for p in parts], axis=0) - gt_hi
                mine = (own >= a) & (own < b)
                in_band[mine] -= 1  # each column's own query (swept in this chunk)
                cols = np.flatnonzero(in_band > 0)
                if len(cols):
                    sub = sims[:, cols]
                    r, k = np.nonzero((sub >= lo_t[cols]) & (sub <= hi_t[cols]))
                    found.append((a + r, cols[k], sub[r, k]))
            for r in np.flatnonzero(ties):  # rare: break ties by gallery order
                row = sims[r]
                for j in range(int(counts[r])):
                    item = int(rel[r, j])
                    ranks[r, j] += int(np.count_nonzero(row[:item] == row[item]))
            valid = np.arange(width)[None, :] < counts[:, None]
            scores[rel_ptr[a] : rel_ptr[b]] = s_rel[valid]
            sorted_r = np.sort(np.where(valid, ranks, np.iinfo(np.int64).max), axis=1)
            out[rel_ptr[a] : rel_ptr[b]] = sorted_r[valid]  # valid entries sort first
    return out, scores, above, found


_BAND = 4.0  # half-width of both_ranks's band, in units of sqrt(d) u sum|a_i b_i|
_ROWS = 8  # rows per step: 8 x G float32 (G = 25,000: 800 KB) stay in a core's L2 through every pass


def _count_rows(sims, s_rel, ranks, ties, lo: int, hi: int, band) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows [lo, hi) of ``sims`` (B, G), :data:`_ROWS` at a time while they are in cache:
    ``ranks[r, j]`` = gallery scores above ``s_rel[r, j]``; ``ties[r]`` = some relevant score is
    shared with another item. With ``band`` = (lo_t, hi_t, own), also per column how many rows
    score above ``hi_t`` and how many at or above ``lo_t`` (both (G,) int64); else None.

    numpy, not torch, for compare-and-count (torch's bool sum ran ~10x slower here); numpy
    releases the GIL, so row blocks run in parallel. A row's count is ``count_nonzero`` of the
    whole row's mask (2-4x faster than a block's ``count_nonzero(axis=1)``); a column's is a
    uint8 sum over the block's rows (4x faster than summing into int64), added into uint8
    counters that are flushed into int64 before they can overflow."""
    n, g = len(sims), sims.shape[1]
    hi = min(hi, n)
    buf = np.empty(g, dtype=bool)
    count = np.count_nonzero
    if band:
        lo_t, hi_t, _ = band
        above, at_least = np.zeros(g, dtype=np.int64), np.zeros(g, dtype=np.int64)
        acc_hi, acc_lo = np.zeros(g, dtype=np.uint8), np.zeros(g, dtype=np.uint8)
        mask, part = np.empty((_ROWS, g), dtype=bool), np.empty(g, dtype=np.uint8)
        since_flush = 0
    for a in range(lo, hi, _ROWS):
        b = min(a + _ROWS, hi)
        if band:
            block, m = sims[a:b], mask[: b - a].view(np.uint8)
            np.greater(block, hi_t, out=m.view(bool))
            acc_hi += m.sum(0, dtype=np.uint8, out=part)
            np.greater_equal(block, lo_t, out=m.view(bool))
            acc_lo += m.sum(0, dtype=np.uint8, out=part)
            since_flush += b - a
            if since_flush > 255 - _ROWS:
                above += acc_hi
                at_least += acc_lo
                acc_hi[:], acc_lo[:], since_flush = 0, 0, 0
        for r in range(a, b):
            row = sims[r]
            for j, t in enumerate(s_rel[r]):
                ranks[r, j] = count(np.greater(row, t, out=buf))
                if count(np.equal(row, t, out=buf)) > 1:
                    ties[r] = True
    if not band:
        return None
    above += acc_hi
    at_least += acc_lo
    return above, at_least


def both_ranks(img_emb, text_emb, cap_img_rows: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The CSR ranks of :func:`relevant_ranks` for both directions from ONE sweep of the similarity
    matrix: (img2text ranks, text2img ranks). ``img_emb`` (N_img, d), ``text_emb`` (N_cap, d).

    Image chunks of the matrix (B, N_cap) give img2text's ranks row by row (as
    :func:`relevant_ranks`) and, column by column, partial counts of the images that score above
    each caption's own image. A caption's own score is known only once its image's chunk is
    swept, so the columns count against a band around it: ``s_c`` computed in float64 +- the
    likely float32 dot-product error (``4 sqrt(d) u sum|a_i b_i|``, u = 2^-24). Images above the
    band count at once; the few inside it are kept and compared, ties broken by gallery order,
    with the exact ``s_c`` read from the matrix. The counts are right whenever every ``s_c`` lies
    in its band, which is checked: otherwise text2img is redone by :func:`relevant_ranks`
    (logged). Equal to :func:`relevant_ranks` in both directions (tested).
    """
    q = torch.from_numpy(writable_f32(img_emb))
    t = writable_f32(text_emb)
    cap_img_rows = np.asarray(cap_img_rows, dtype=np.int64)
    ptr, idx = img2text_relevance(cap_img_rows, len(q))
    n_cap = len(cap_img_rows)
    approx, tol = np.empty(n_cap), np.empty(n_cap)
    step = 1 << 16
    for a in range(0, n_cap, step):  # float64 in blocks: bounded memory at full-COCO scale
        prod = q.numpy()[cap_img_rows[a : a + step]].astype(np.float64) * t[a : a + step]
        approx[a : a + step], tol[a : a + step] = prod.sum(1), np.abs(prod).sum(1)
    tol = tol * (_BAND * np.sqrt(t.shape[1]) * 2.0**-24) + 1e-30  # a statistical bound: checked below
    lo, hi = (approx - tol).astype(np.float32), (approx + tol).astype(np.float32)
    lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))  # round outwards
    i2t, s_rel, above, band = _ranks(q, torch.from_numpy(t), ptr, idx, chunk, band=(lo, hi, cap_img_rows))
    exact = np.empty(n_cap, dtype=np.float32)
    exact[idx] = s_rel
    if not ((exact >= lo) & (exact <= hi)).all():
        log.warning("float32 similarities outside their error bound: text2img ranks recomputed directly")
        p2, i2 = text2img_relevance(cap_img_rows)
        return i2t, relevant_ranks(torch.from_numpy(t), q, p2, i2, chunk=chunk)
    if band:
        rows, cols, vals = (np.concatenate(x) for x in zip(*band, strict=True))
        s = exact[cols]
        before = (vals > s) | ((vals == s) & (rows < cap_img_rows[cols]))  # ties: gallery order
        above += np.bincount(cols, weights=before, minlength=n_cap).astype(np.int64)
    return i2t, above


def metrics_from_ranks(ranks: np.ndarray, rel_ptr: np.ndarray, prefix: str = "", ks=(1, 5)) -> dict:
    """P@K, mAP, R@1/5/10, medr, meanr from CSR ranks (sorted within each query)."""
    rel_ptr = np.asarray(rel_ptr, dtype=np.int64)
    n_rel = np.diff(rel_ptr)
    qid = np.repeat(np.arange(len(n_rel)), n_rel)
    pos = np.arange(len(ranks)) - rel_ptr[qid] + 1  # 1-based position among the query's relevant items
    ap = np.bincount(qid, weights=pos / (ranks + 1), minlength=len(n_rel)) / n_rel
    first = ranks[rel_ptr[:-1]]
    m = {}
    for k in ks:
        hits = np.bincount(qid, weights=(ranks < k).astype(np.float64), minlength=len(n_rel))
        m[f"{prefix}P@{k}"] = float(np.mean(hits / k))
    m[f"{prefix}mAP"] = float(ap.mean())
    for k in RECALL_KS:
        m[f"{prefix}R@{k}"] = float(100.0 * np.mean(first < k))
    m[f"{prefix}medr"] = float(np.floor(np.median(first)) + 1)
    m[f"{prefix}meanr"] = float(first.mean() + 1)
    return m


def pr_curve(ranks: np.ndarray, rel_ptr: np.ndarray, gallery_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every cut-off K = 1..G, averaged over queries: two (G,) arrays."""
    n_rel = np.diff(np.asarray(rel_ptr, dtype=np.int64))
    qid = np.repeat(np.arange(len(n_rel)), n_rel)
    hits = np.bincount(ranks, minlength=gallery_size)[:gallery_size].astype(np.float64)
    rec_w = np.bincount(ranks, weights=1.0 / n_rel[qid], minlength=gallery_size)[:gallery_size]
    k = np.arange(1, gallery_size + 1)
    return np.cumsum(hits) / (len(n_rel) * k), np.cumsum(rec_w) / len(n_rel)


def evaluate(
    img_emb, text_emb, cap_img_rows: np.ndarray, directions=DIRECTIONS, ks=(1, 5), chunk: int = 1024,
    with_curves: bool = False,
) -> dict:
    """All metrics for the given directions. ``img_emb`` (N_img, d), ``text_emb`` (N_cap, d),
    ``cap_img_rows`` (N_cap,). With ``with_curves``, also ``{dir}_pr`` = (precision, recall)."""
    m: dict = {}
    fused = dict(zip(DIRECTIONS, both_ranks(img_emb, text_emb, cap_img_rows, chunk), strict=True)) if set(
        directions) == set(DIRECTIONS) else {}
    for d in directions:
        if d == "img2text":
            ptr, idx = img2text_relevance(cap_img_rows, len(img_emb))
            q, g = img_emb, text_emb
        elif d == "text2img":
            ptr, idx = text2img_relevance(cap_img_rows)
            q, g = text_emb, img_emb
        else:
            raise ValueError(f"unknown direction {d!r}")
        ranks = fused[d] if d in fused else relevant_ranks(q, g, ptr, idx, chunk=chunk)
        m.update(metrics_from_ranks(ranks, ptr, prefix=f"{d}_", ks=ks))
        if with_curves:
            m[f"{d}_pr"] = pr_curve(ranks, ptr, len(g))
    if all(f"{d}_R@1" in m for d in DIRECTIONS):
        m["rsum"] = float(sum(m[f"{d}_R@{k}"] for d in DIRECTIONS for k in RECALL_KS))
    return m


def evaluate_protocol(img_emb, text_emb, cap_img_rows, protocol: str = "full", **kw) -> dict:
    """``full``: the whole split as given. ``5k`` and ``1k`` score rows that are already in the
    standard Karpathy test layout (:func:`crossmodal.protocols.standard_order` builds it from any
    split's embeddings): images in order, exactly 5 captions each, caption ``5i..5i+4`` of image
    ``i``. ``5k``: all 5,000 images. ``1k``: fold f = images ``1000f..1000(f+1)`` and captions
    ``5000f..5000(f+1)``, metrics averaged over the folds (five on the test set)."""
    img_emb, text_emb = np.asarray(img_emb), np.asarray(text_emb)
    cap_img_rows = np.asarray(cap_img_rows)
    if protocol == "full":
        return evaluate(img_emb, text_emb, cap_img_rows, **kw)
    if protocol not in ("5k", "1k"):
        raise ValueError(f"unknown protocol {protocol!r}: full, 5k or 1k")
    if protocol == "5k" and len(img_emb) != 5000:
        raise DataError(f"--protocol 5k needs the 5,000-image Karpathy test split, got {len(img_emb)} images")
    n_folds = len(img_emb) // 1000
    if protocol == "1k" and (n_folds < 1 or len(img_emb) % 1000):
        raise DataError(f"--protocol 1k needs a multiple of 1,000 images, got {len(img_emb)}")
    if not np.array_equal(cap_img_rows, np.repeat(np.arange(len(img_emb)), 5)):
        raise DataError(f"--protocol {protocol} needs the standard layout: 5 captions per image, captions in image "
                         "order (crossmodal.protocols.standard_order)")
    if protocol == "5k":
        return evaluate(img_emb, text_emb, cap_img_rows, **kw)
    kw = {k: v for k, v in kw.items() if k != "with_curves"}
    folds = []
    for f in range(n_folds):
        i, c = slice(f * 1000, (f + 1) * 1000), slice(f * 5000, (f + 1) * 5000)
        folds.append(evaluate(img_emb[i], text_emb[c], cap_img_rows[c] - f * 1000, **kw))
    return {k: float(np.mean([m[k] for m in folds])) for k in folds[0]}

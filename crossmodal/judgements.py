"""Graded human judgements of Flickr8k test pairs (Hodosh, Young and Hockenmaier 2013): the Flickr8k
analogue of ECCV Caption / CxC (``retrieve_img2text.py --flickr8k-judgements DIR``).

Files, as the dataset ships them (format in its ``readme.txt``); ids by the Flickr id rule of
:mod:`crossmodal.flickr` (image ``<name>.jpg`` -> its photo id, caption ``<name>.jpg#n`` -> photo id * 10 + n):

- ``ExpertAnnotations.txt``: image TAB caption id TAB three expert scores, 1 (the caption does not
  describe the image) to 4 (it describes it);
- ``CrowdFlowerAnnotations.txt``: image TAB caption id TAB share of "yes" TAB yes count TAB no count.

A judged pair is **positive** when its mean expert score is >= 3 ("describes the image, possibly with
minor mistakes"); a pair only the crowd judged is positive when at least half of its votes are yes
(yes / (yes + no) >= 0.5). Experts win where both judged a pair.

Metrics (percentages like the other recall figures; P@K and mAP as fractions):

- ``{dir}_J_R@K``, ``{dir}_J_P@1/5``, ``{dir}_J_mAP``, ``{dir}_J_medr``: the usual definitions
  (:func:`crossmodal.metrics.metrics_from_ranks`) over every query of the split, the relevant items
  being a query's own (its captions / its image) plus the items judged positive with it;
- ``img2text_NDCG@K`` (K = 5, 10): for each image with expert judgements of captions in the split,
  those judged captions ranked by similarity (ties: gallery order), gain = the mean expert score
  (1-4), DCG@K = sum over ranks r = 1..K of gain_r / log2(r + 1), divided by the DCG@K of the
  gains in the best order; mean over those images (``img2text_NDCG_queries``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .flickr import caption_id, photo_id
from .metrics import metrics_from_ranks, relevant_ranks

log = logging.getLogger(__name__)

EXPERT_FILE, CROWD_FILE = "ExpertAnnotations.txt", "CrowdFlowerAnnotations.txt"
EXPERT_POSITIVE, CROWD_POSITIVE = 3.0, 0.5
NDCG_KS = (5, 10)
RULE = (f"positive pairs: mean expert score >= {EXPERT_POSITIVE:g}; pairs only the crowd judged: yes share >= "
        f"{CROWD_POSITIVE:g}")


@dataclass
class Judgements:
    """Judged pairs, (P,) each: image and caption ids, mean expert score and crowd yes share (NaN: not judged)."""

    img_ids: np.ndarray
    cap_ids: np.ndarray
    expert: np.ndarray
    crowd: np.ndarray
    source: str

    def positive(self) -> np.ndarray:
        """(P,) bool: the pairs judged to describe their image (:data:`RULE`)."""
        crowd_only = np.isnan(self.expert)
        return np.where(crowd_only, np.nan_to_num(self.crowd, nan=-1) >= CROWD_POSITIVE,
                        np.nan_to_num(self.expert, nan=-1) >= EXPERT_POSITIVE)


def judgement_files(folder: str | Path) -> list[Path]:
    """The judgement files present in ``folder`` (at least one, else one :class:`DataError` line)."""
    folder = Path(folder)
    found = [folder / f for f in (EXPERT_FILE, CROWD_FILE) if (folder / f).is_file()]
    if not found:
        raise DataError(f"--flickr8k-judgements {folder}: neither {EXPERT_FILE} nor {CROWD_FILE} is there")
    return found


def judgements_digest(folder: str | Path) -> str:
    """Digest of the judgement files' bytes: scores made with other judgements are not fresh."""
    h = hashlib.sha256()
    for p in judgement_files(folder):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def read_judgements(folder: str | Path) -> Judgements:
    """Both files of ``folder`` (either may be absent), merged by pair; malformed lines are one
    :class:`DataError` line naming the file and line. A pair judged on several lines of a file has
    its judgements pooled (the mean of all its expert scores; the sum of its yes and no votes), logged."""
    pairs: dict[tuple[int, int], list] = {}  # pair -> [expert scores, yes votes, no votes]
    files = judgement_files(folder)
    for path in files:
        expert = path.name == EXPERT_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text: {e}") from None
        seen: dict[tuple[int, int], int] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            f = line.strip().split("\t")
            try:
                if len(f) != 5:
                    raise ValueError(f"{len(f)} tab-separated fields, expected 5")
                name, hash_, num = f[1].rpartition("#")
                if not hash_ or not num.isdigit() or int(num) > 9:
                    raise ValueError(f"caption id {f[1]!r} is not '<image>.jpg#<0-9>'")
                key = (photo_id(f[0], where), caption_id(photo_id(name, where), int(num)))
                rec = pairs.setdefault(key, [[], 0, 0])
                if expert:
                    scores = [int(x) for x in f[2:]]
                    if not all(1 <= s <= 4 for s in scores):
                        raise ValueError(f"expert scores {scores} are not 1-4")
                    rec[0] += scores
                else:
                    yes, no = int(f[3]), int(f[4])
                    if yes < 0 or no < 0 or yes + no == 0:
                        raise ValueError(f"vote counts {yes} yes / {no} no")
                    rec[1], rec[2] = rec[1] + yes, rec[2] + no
            except ValueError as e:
                raise DataError(f"{where}: malformed {'expert' if expert else 'CrowdFlower'} judgement ({e}): "
                                f"{line[:60]!r}") from None
            seen[key] = seen.get(key, 0) + 1
        again = [k for k, c in seen.items() if c > 1]
        if again:
            log.warning("%s judges %d pairs on several lines (first: image %d, caption %d): their judgements are "
                        "pooled", path, len(again), *again[0])
    keys = sorted(pairs)
    vals = np.array([[np.mean(pairs[k][0]) if pairs[k][0] else np.nan,
                      pairs[k][1] / (pairs[k][1] + pairs[k][2]) if pairs[k][1] + pairs[k][2] else np.nan]
                     for k in keys], dtype=np.float64).reshape(-1, 2)
    return Judgements(np.array([k[0] for k in keys], np.int64), np.array([k[1] for k in keys], np.int64),
                      vals[:, 0], vals[:, 1], ", ".join(str(p) for p in files))


def _in_split(judg: Judgements, img_ids, cap_ids):
    """Rows (image row, caption row) of the judged pairs whose image and caption are both in the split, and the mask."""
    img_ids, cap_ids = np.asarray(img_ids, np.int64), np.asarray(cap_ids, np.int64)
    img_row = {int(i): r for r, i in enumerate(img_ids)}
    cap_row = {int(c): r for r, c in enumerate(cap_ids)}
    keep = np.array([int(i) in img_row and int(c) in cap_row for i, c in zip(judg.img_ids, judg.cap_ids, strict=True)],
                    dtype=bool)
    if not keep.any():
        raise DataError(f"no judged pair of {judg.source} has its image and caption in this split (the judgements "
                        "cover Flickr8k's test images: score --split test)")
    ir = np.array([img_row[int(i)] for i in judg.img_ids[keep]], np.int64)
    cr = np.array([cap_row[int(c)] for c in judg.cap_ids[keep]], np.int64)
    return ir, cr, keep


def extra_positive_metrics(img_emb, text_emb, cap_img_rows, img_ids, cap_ids, judg: Judgements,
                           direction: str, chunk: int = 1024) -> dict:
    """``{direction}_J_*`` (see the module docstring): ``img_emb`` (N_img, d), ``text_emb`` (N_cap, d),
    ``cap_img_rows`` (N_cap,), ids in row order."""
    ir, cr, keep = _in_split(judg, img_ids, cap_ids)
    pos = judg.positive()[keep]
    cap_img_rows = np.asarray(cap_img_rows, np.int64)
    own = np.stack([cap_img_rows, np.arange(len(cap_img_rows))], 1)  # (image row, caption row)
    extra = np.stack([ir[pos], cr[pos]], 1)
    pairs = np.unique(np.concatenate([own, extra]), axis=0)
    if direction == "img2text":
        q, g, n_q, qcol = img_emb, text_emb, len(img_emb), 0
    else:
        q, g, n_q, qcol = text_emb, img_emb, len(text_emb), 1
    pairs = pairs[np.lexsort((pairs[:, 1 - qcol], pairs[:, qcol]))]
    ptr = np.zeros(n_q + 1, np.int64)
    ptr[1:] = np.cumsum(np.bincount(pairs[:, qcol], minlength=n_q))
    ranks = relevant_ranks(np.asarray(q, np.float32), np.asarray(g, np.float32), ptr, pairs[:, 1 - qcol], chunk)
    m = metrics_from_ranks(ranks, ptr, prefix=f"{direction}_J_")
    m.pop(f"{direction}_J_meanr", None)
    m[f"{direction}_J_extended_queries"] = int(len(np.unique(extra[:, qcol])) if len(extra) else 0)
    return m


def graded_ndcg(img_emb, text_emb, img_ids, cap_ids, judg: Judgements, ks=NDCG_KS) -> dict:
    """``img2text_NDCG@K`` over the expert-judged pairs (module docstring); ``img_emb`` (N_img, d),
    ``text_emb`` (N_cap, d), ids in row order."""
    ir, cr, keep = _in_split(judg, img_ids, cap_ids)
    gain = judg.expert[keep]
    has = ~np.isnan(gain)
    ir, cr, gain = ir[has], cr[has], gain[has]
    m: dict = {}
    scores = {k: [] for k in ks}
    for i in np.unique(ir):
        rows, g = cr[ir == i], gain[ir == i]
        sims = np.asarray(text_emb, np.float32)[rows] @ np.asarray(img_emb, np.float32)[i]
        got = g[np.lexsort((rows, -sims))]
        best = np.sort(g)[::-1]
        for k in ks:
            disc = 1.0 / np.log2(np.arange(2, min(k, len(g)) + 2))
            scores[k].append(float(np.dot(got[:k], disc) / np.dot(best[:k], disc)))
    for k in ks:
        m[f"img2text_NDCG@{k}"] = float(np.mean(scores[k])) if scores[k] else float("nan")
    m["img2text_NDCG_queries"] = len(scores[ks[0]])
    return m


def judged_metrics(folder, img_emb, text_emb, cap_img_rows, img_ids, cap_ids, direction: str,
                   chunk: int = 1024) -> dict:
    """Every judgement metric of ``direction`` (the NDCG for img2text only)."""
    judg = read_judgements(folder)
    m = extra_positive_metrics(img_emb, text_emb, cap_img_rows, img_ids, cap_ids, judg, direction, chunk)
    if direction == "img2text" and not np.isnan(judg.expert).all():
        m.update(graded_ndcg(img_emb, text_emb, img_ids, cap_ids, judg))
    return m


def judgement_notes(record: dict, direction: str) -> list[str]:
    """Lines under a results table with the judgement metrics of ``record`` (none when absent)."""
    keys = [k for k in record if k.startswith(f"{direction}_J_") or k.startswith(f"{direction}_NDCG@")]
    if not keys:
        return []
    cells = ", ".join(f"{k.split('_', 1)[1]} {record[k]:.3f}" if isinstance(record[k], float) else
                      f"{k.split('_', 1)[1]} {record[k]}" for k in keys)
    return [f"Flickr8k human judgements (Hodosh et al. 2013; {RULE}; NDCG gain = mean expert score): {cells}"]

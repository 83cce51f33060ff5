"""Scoring a run or an ensemble of runs (``retrieve_img2text.py``, ``retrieve_text2img.py``)
and looking at it (``main_retrieve.py``); the runs are opened and checked by :mod:`crossmodal.runs`.

Metrics are exact (:mod:`crossmodal.metrics`); top-k lists come from the Faiss index built by
``get_features_captions.py`` and are saved beside the metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from .cli import (
    add_dataset_arg,
    existing_dir,
    existing_file,
    int_in_range,
    non_blank_text,
    non_negative_int,
    positive_int,
    setup_logging,
    split_name,
)
from .errors import DataError, FeatureError
from .index import search
from .judgements import judged_metrics, judgement_notes, judgements_digest
from .outputs import append_jsonl, check, locked, publish, read_jsonl, read_sidecar, save_npy, tmp_path
from .protocols import (
    ECCV_TABLE_KEYS,
    PROTOCOL_HELP,
    PROTOCOLS,
    PUBLISHED_LABEL,
    embedded_dataset,
    evaluate_split,
    protocol_title,
    published_rows,
    table_notes,
)
from .runs import open_runs
from .store import safe_split_name

log = logging.getLogger(__name__)

TABLE_KEYS = ("P@1", "P@5", "mAP", "R@1", "R@5", "R@10", "medr", "meanr")


def metrics_parser(direction: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"Score {direction} retrieval of a trained run, or of an ensemble.")
    p.add_argument("--run", required=True, type=existing_dir, action="append",
                   help="a training run folder, runs/<name>; repeat it to score an ensemble (the runs' similarities "
                        "averaged; they must embed the same split with the same ids)")
    p.add_argument("--out", default=None,
                   help="an ensemble's folder for its scores (default: ensemble_<name>+<name> beside the first run)")
    p.add_argument("--split", default="val", type=split_name)
    p.add_argument("--protocol", default="full", choices=PROTOCOLS,
                   help="; ".join(f"{k}: {v}" for k, v in PROTOCOL_HELP.items())
                   + " (5k/1k/eccv need the Karpathy test split, --split test)")
    p.add_argument("--k", type=int_in_range(1, 1000), default=10, help="length of the saved top-k lists")
    p.add_argument("--flickr8k-judgements", default=None, type=existing_dir, metavar="DIR",
                   help="folder with Hodosh et al.'s ExpertAnnotations.txt / CrowdFlowerAnnotations.txt (Flickr8k "
                        "test): adds R@K/P@K/mAP with the judged extra positives and img2text NDCG@5/10 "
                        "(crossmodal/judgements.py)")
    p.add_argument("--chunk", type=positive_int, default=1024, help="queries per similarity block (bounds memory)")
    p.add_argument("--force", action="store_true", help="recompute even if these embeddings were scored already")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def format_table(rows: dict[str, dict], keys=TABLE_KEYS, title: str = "", published: dict | None = None,
                 notes=()) -> str:
    """A plain-text table: one row per label, one column per metric key. ``published`` rows (other
    papers' figures) go under a labelled rule in the same columns; ``notes`` are lines after it."""
    widths = [max(7, len(k)) for k in keys]
    width = max([len(r) for r in [*rows, *(published or {})]] + [12])
    head = f"{'':<{width}}  " + "  ".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True))
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]

    def row(label: str, m: dict) -> str:
        cells = []
        for k, w in zip(keys, widths, strict=True):
            v = m.get(k)
            pct = k in ("medr", "meanr") or "R@" in k or k.startswith(("ECCV_", "CxC_"))
            cells.append(f"{'-':>{w}}" if v is None else f"{v:{w}.1f}" if pct else f"{v:{w}.3f}")
        return f"{label:<{width}}  " + "  ".join(cells)

    lines += [row(label, m) for label, m in rows.items()]
    if published:
        lines.append(f"-- {PUBLISHED_LABEL} " + "-" * max(0, len(head) - len(PUBLISHED_LABEL) - 4))
        lines += [row(label, m) for label, m in published.items()]
    return "\n".join([*lines, *notes])


def run_metrics(argv=None, direction: str = "img2text") -> dict:
    a = metrics_parser(direction).parse_args(argv)
    setup_logging(a.verbose)
    with open_runs(a.run, a.split, a.out) as scored:  # refused when not made from the runs' checkpoints
        im, tm = scored.emb[3], scored.emb[4]
        a.dataset = embedded_dataset(scored.runs[0].dir, im)  # Flickr test splits: the Flickr 1K protocol
        stem = f"{safe_split_name(a.split)}_{direction}_{a.protocol}"
        saved = scored.folder / "retrieval" / f"{stem}_metrics.json"
        members = im.get("members", [])
        inputs = {f"{m['run']}/{n}": sha for m in members for n, sha in m["files"].items()} if members else {
            n: r["sha256"] for m in (im, tm) for n, r in m["files"].items()}
        job = {"direction": direction, "protocol": a.protocol, "k": a.k,  # inputs: embeddings and indexes
               "inputs": inputs, **({"members": [m["run"] for m in members]} if members else {}),
               **({"judgements": judgements_digest(a.flickr8k_judgements)} if a.flickr8k_judgements else {})}
        figure = scored.folder / "figures" / f"pr_{stem}.png" if a.protocol != "1k" else None  # 1k: no curve
        with locked(saved, what=f"scores {saved}"):
            fresh = check(saved, job, a.force, what=f"scores {saved}", rebuild_on=("inputs", "k", "judgements"))
            if fresh and figure is not None and not figure.is_file():
                log.info("%s is missing: scoring again", figure)
                fresh = False
            if fresh:
                log.info("%s is up to date: skipped (--force recomputes)", saved)
                record = read_sidecar(saved)
            else:
                record = _score(a, direction, scored, stem, saved, job, figure)
            _log_result(scored.folder / "results.jsonl", record)
    print(_table(scored.label, direction, a, record))
    return record


def _log_result(results: Path, record: dict) -> None:
    """The evaluation's row in the run's ``results.jsonl``, unless it is there already (a rerun
    after a kill between publishing the scores and appending the row adds it once)."""
    row = json.loads(json.dumps({k: v for k, v in record.items() if k not in ("job", "files")}))
    if row not in read_jsonl(results):
        append_jsonl(results, row)


def _score(a, direction: str, scored, stem: str, saved: Path, job: dict, figure: Path | None) -> dict:
    """Exact metrics, Faiss top-k lists and the PR curve of one direction. The curve's figure is
    drawn first, then the lists and ``saved`` are published: finished scores always have their figure."""
    img, txt, rows, im, tm = scored.emb
    t0 = time.perf_counter()
    m = evaluate_split(img, txt, rows, im["ids"], tm["ids"], tm["image_ids"], a.protocol, split=a.split,
                       directions=(direction,), chunk=a.chunk, with_curves=a.protocol != "1k", dataset=a.dataset)
    if a.flickr8k_judgements:
        m.update(judged_metrics(a.flickr8k_judgements, img, txt, rows, im["ids"], tm["ids"], direction, a.chunk))
    elapsed = time.perf_counter() - t0
    curve = m.pop(f"{direction}_pr", None)
    m = {k: v for k, v in m.items() if k != "rsum"}
    queries, gallery = (img, "text") if direction == "img2text" else (txt, "img")
    index = scored.index(gallery)
    D, I = search(index, queries, a.k)
    out_dir = saved.parent
    files = {out_dir / f"{stem}_top{a.k}_{name}.npy": arr for name, arr in (("I", I), ("D", D))}
    for final, arr in files.items():
        save_npy(tmp_path(final), arr)
    record = {"type": "eval", "direction": direction, "split": a.split, "protocol": a.protocol,
              "queries": len(queries), "gallery": index.ntotal, "eval_s": round(elapsed, 3), **m}
    if scored.is_ensemble:
        record["members"] = im["members"]
    if curve is not None and figure is not None:
        from .figures import pr_curves

        pr_curves({f"{scored.label} {direction}": curve}, figure, title=f"{direction}, {a.split} ({len(queries)} "
                                                                         "queries)")
    return publish(saved, dict(record, job=job), {f: tmp_path(f) for f in files})


def _table(label: str, direction: str, a, record: dict) -> str:
    m = {k.split("_", 1)[1]: v for k, v in record.items() if k.startswith(direction + "_")}
    scored = protocol_title(a.protocol, record.get("protocol_info"))
    title = f"{direction} on {a.split} ({a.protocol}): " + (scored or f"{record['queries']} queries, gallery "
                                                                       f"{record['gallery']}")
    return format_table({label: m}, keys=ECCV_TABLE_KEYS if a.protocol == "eccv" else TABLE_KEYS,
                        title=title, published=published_rows(a.protocol, direction, a.dataset),
                        notes=table_notes(a.protocol, direction, a.dataset) + judgement_notes(record, direction))


# --- qualitative figures -----------------------------------------------------------------


def figures_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Figures of queries with their nearest results.")
    p.add_argument("--run", required=True, type=existing_dir, action="append",
                   help="a training run folder, runs/<name>; repeat it for an ensemble (averaged similarities)")
    p.add_argument("--split", default="val", type=split_name)
    p.add_argument("--coco-root", required=True, type=existing_dir, help="the COCO folder the split's images are in")
    p.add_argument("--karpathy-file", default=None, type=existing_file)
    add_dataset_arg(p)
    p.add_argument("--direction", default="both", choices=["img2text", "text2img", "both"])
    p.add_argument("--query-id", type=non_negative_int, action="append", default=[],
                   help="image id (img2text) or caption id (text2img); repeatable")
    p.add_argument("--query-text", action="append", default=[], type=non_blank_text(),
                   help="any sentence: its nearest images")
    p.add_argument("--random", type=int_in_range(0, 100), default=0, help="this many random queries per direction")
    p.add_argument("--k", type=int_in_range(1, 50), default=5)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default=None, help="folder for the PNGs (default runs/<name>/figures)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run_figures(argv=None) -> list[Path]:
    a = figures_parser().parse_args(argv)
    setup_logging(a.verbose)
    with open_runs(a.run, a.split) as scored:  # no retraining under the figures
        return _figures(a, scored)


def _figures(a, scored) -> list[Path]:
    from .coco import load_image, load_split
    from .figures import caption_to_images, image_to_captions

    out = Path(a.out) if a.out else scored.folder / "figures"
    img, txt, rows, im, tm = scored.emb
    split = load_split(a.coco_root, a.split, a.karpathy_file, skip_bad=True, dataset=a.dataset)
    img_ids = np.asarray(im["ids"])
    cap_ids = np.asarray(tm["ids"])
    cap_text = dict(zip(split.caption_ids.tolist(), split.captions, strict=True))
    scored.check_split(split, a.coco_root)  # its ids, and the data its features were made from
    img_file = {int(i): k for k, i in enumerate(split.image_ids)}
    rng = np.random.default_rng(a.seed)
    written = []

    def image_of(row: int):
        return load_image(split.image_path(img_file[int(img_ids[row])]), int(img_ids[row]))

    directions = ("img2text", "text2img") if a.direction == "both" else (a.direction,)
    if "img2text" in directions:
        index = scored.index("text")
        qrows = [_row_of(img_ids, q, "image") for q in a.query_id if a.direction != "text2img"]
        qrows += rng.choice(len(img), size=min(a.random, len(img)), replace=False).tolist()
        D, I = search(index, img[qrows], a.k) if qrows else (None, None)
        for n, r in enumerate(qrows):
            caps = [cap_text.get(int(cap_ids[j]), "?") for j in I[n]]
            written.append(image_to_captions(
                image_of(r), f"query image {img_ids[r]}", caps, D[n].tolist(), [rows[j] == r for j in I[n]],
                out / f"img2text_{safe_split_name(a.split)}_{img_ids[r]}.png"))
    if "text2img" in directions:
        index = scored.index("img")
        queries = []  # (title, vector, true image row or None, file stem)
        for q in (a.query_id if a.direction == "text2img" else []):
            r = _row_of(cap_ids, q, "caption")
            queries.append((cap_text.get(q, "?"), txt[r], rows[r], f"cap{q}"))
        for r in rng.choice(len(txt), size=min(a.random, len(txt)), replace=False).tolist():
            queries.append((cap_text.get(int(cap_ids[r]), "?"), txt[r], rows[r], f"cap{cap_ids[r]}"))
        if a.query_text:
            vecs = scored.encode_sentences(a.query_text)
            for k, (sentence, v) in enumerate(zip(a.query_text, vecs, strict=True)):
                queries.append((sentence, v, None, f"text{k}"))
        for title, vec, true_row, stem in queries:
            D, I = search(index, vec[None], a.k)
            written.append(caption_to_images(
                title, [image_of(j) for j in I[0]], [f"image {img_ids[j]}" for j in I[0]], D[0].tolist(),
                [j == true_row for j in I[0]], out / f"text2img_{stem}.png"))
    if not written:
        raise DataError("no query given: use --query-id, --query-text or --random N")
    for p in written:
        log.info("figure: %s", p)
    return written


def _row_of(ids: np.ndarray, q: int, what: str) -> int:
    hit = np.flatnonzero(ids == q)
    if not len(hit):
        raise FeatureError(f"--query-id {q}: no {what} with this id in the split's embeddings")
    return int(hit[0])

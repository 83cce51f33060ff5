"""Scoring a run (``retrieve_img2text.py``, ``retrieve_text2img.py``) and looking at it
(``main_retrieve.py``).

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

from .cli import setup_logging
from .embed import embedding_paths, load_embeddings
from .errors import DataError, FeatureError
from .index import load_index, search
from .metrics import evaluate_protocol
from .store import safe_split_name, write_json

log = logging.getLogger(__name__)

TABLE_KEYS = ("P@1", "P@5", "mAP", "R@1", "R@5", "R@10", "medr", "meanr")


def metrics_parser(direction: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"Score {direction} retrieval of a trained run.")
    p.add_argument("--run", required=True, help="a training run folder, runs/<name>")
    p.add_argument("--split", default="val")
    p.add_argument("--protocol", default="full", choices=["full", "5k", "1k"],
                   help="full split, Karpathy 5K test, or mean over its five 1K folds")
    p.add_argument("--k", type=int, default=10, help="length of the saved top-k lists")
    p.add_argument("--chunk", type=int, default=1024, help="queries per similarity block (bounds memory)")
    p.add_argument("--force", action="store_true", help="recompute even if these embeddings were scored already")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def format_table(rows: dict[str, dict], keys=TABLE_KEYS, title: str = "") -> str:
    """A plain-text table: one row per label, one column per metric key."""
    width = max([len(r) for r in rows] + [12])
    head = f"{'':<{width}}  " + "  ".join(f"{k:>7}" for k in keys)
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for label, m in rows.items():
        cells = []
        for k in keys:
            v = m.get(k)
            cells.append(f"{'-':>7}" if v is None else f"{v:7.1f}" if k in ("medr", "meanr") or "R@" in k
                         else f"{v:7.3f}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def run_metrics(argv=None, direction: str = "img2text") -> dict:
    a = metrics_parser(direction).parse_args(argv)
    setup_logging(a.verbose)
    run_dir = Path(a.run)
    img, txt, rows, im, tm = load_embeddings(run_dir, a.split)
    out_dir = run_dir / "retrieval"
    stem = f"{safe_split_name(a.split)}_{direction}_{a.protocol}"
    source = {"img": [im["job"], im["created"]], "text": [tm["job"], tm["created"]], "k": a.k}
    saved = out_dir / f"{stem}_metrics.json"
    if saved.is_file() and not a.force:
        record = json.loads(saved.read_text())
        if record.get("source") == source:
            log.info("%s is up to date: skipped (--force recomputes)", saved)
            print(_table(run_dir, direction, a, record))
            return record
    t0 = time.perf_counter()
    m = evaluate_protocol(img, txt, rows, a.protocol, directions=(direction,), chunk=a.chunk,
                          with_curves=a.protocol != "1k")
    elapsed = time.perf_counter() - t0
    curve = m.pop(f"{direction}_pr", None)
    m = {k: v for k, v in m.items() if k != "rsum"}
    paths = embedding_paths(run_dir, a.split)
    queries, gallery_key = (img, "text_index") if direction == "img2text" else (txt, "img_index")
    index = load_index(paths[gallery_key], expect_ntotal=len(txt) if direction == "img2text" else len(img))
    D, I = search(index, queries, a.k)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / f"{stem}_top{a.k}_I.npy", I)
    np.save(out_dir / f"{stem}_top{a.k}_D.npy", D)
    record = {"type": "eval", "direction": direction, "split": a.split, "protocol": a.protocol,
              "queries": len(queries), "gallery": index.ntotal, "eval_s": round(elapsed, 3), **m, "source": source}
    write_json(saved, record)
    with open(run_dir / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if curve is not None:
        from .figures import pr_curves

        pr_curves({f"{run_dir.name} {direction}": curve}, run_dir / "figures" / f"pr_{stem}.png",
                  title=f"{direction}, {a.split} ({len(queries)} queries)")
    print(_table(run_dir, direction, a, record))
    return record


def _table(run_dir: Path, direction: str, a, record: dict) -> str:
    m = {k.split("_", 1)[1]: v for k, v in record.items() if k.startswith(direction + "_")}
    return format_table({run_dir.name: m}, title=f"{direction} on {a.split} ({a.protocol}): {record['queries']} "
                                                 f"queries, gallery {record['gallery']}")


# --- qualitative figures -----------------------------------------------------------------


def figures_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Figures of queries with their nearest results.")
    p.add_argument("--run", required=True, help="a training run folder, runs/<name>")
    p.add_argument("--split", default="val")
    p.add_argument("--coco-root", required=True, help="the COCO folder the split's images are in")
    p.add_argument("--karpathy-file", default=None)
    p.add_argument("--direction", default="both", choices=["img2text", "text2img", "both"])
    p.add_argument("--query-id", type=int, action="append", default=[],
                   help="image id (img2text) or caption id (text2img); repeatable")
    p.add_argument("--query-text", action="append", default=[], help="any sentence: its nearest images")
    p.add_argument("--random", type=int, default=0, help="this many random queries per direction")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the PNGs (default runs/<name>/figures)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def text_encoder_from_sidecar(features_meta: dict):
    """Rebuild the caption encoder a run's features came from, to encode new sentences."""
    from .text_encoders import BertEncoder, FastTextEncoder

    w, s = features_meta["weights"], features_meta["settings"]
    if features_meta["encoder"] == "fasttext":
        return FastTextEncoder(w["file"], info=w)
    return BertEncoder(w["model"], pooling=s["pooling"], max_length=s["max_length"])


def run_figures(argv=None) -> list[Path]:
    from .coco import load_image, load_split
    from .figures import caption_to_images, image_to_captions
    from .store import load_features
    from .train import heads_from_checkpoint, load_checkpoint

    a = figures_parser().parse_args(argv)
    setup_logging(a.verbose)
    run_dir = Path(a.run)
    out = Path(a.out) if a.out else run_dir / "figures"
    img, txt, rows, im, tm = load_embeddings(run_dir, a.split)
    split = load_split(a.coco_root, a.split, a.karpathy_file, skip_bad=True)
    img_ids = np.asarray(im["ids"])
    cap_ids = np.asarray(tm["ids"])
    cap_text = dict(zip(split.caption_ids.tolist(), split.captions, strict=True))
    img_file = {int(i): k for k, i in enumerate(split.image_ids)}
    paths = embedding_paths(run_dir, a.split)
    rng = np.random.default_rng(a.seed)
    written = []

    def image_of(row: int):
        return load_image(split.image_path(img_file[int(img_ids[row])]), int(img_ids[row]))

    directions = ("img2text", "text2img") if a.direction == "both" else (a.direction,)
    if "img2text" in directions:
        index = load_index(paths["text_index"], len(txt))
        qrows = [_row_of(img_ids, q, "image") for q in a.query_id if a.direction != "text2img"]
        qrows += rng.choice(len(img), size=min(a.random, len(img)), replace=False).tolist()
        D, I = search(index, img[qrows], a.k) if qrows else (None, None)
        for n, r in enumerate(qrows):
            caps = [cap_text.get(int(cap_ids[j]), "?") for j in I[n]]
            written.append(image_to_captions(
                image_of(r), f"query image {img_ids[r]}", caps, D[n].tolist(), [rows[j] == r for j in I[n]],
                out / f"img2text_{safe_split_name(a.split)}_{img_ids[r]}.png"))
    if "text2img" in directions:
        index = load_index(paths["img_index"], len(img))
        queries = []  # (title, vector, true image row or None, file stem)
        for q in (a.query_id if a.direction == "text2img" else []):
            r = _row_of(cap_ids, q, "caption")
            queries.append((cap_text.get(q, "?"), txt[r], rows[r], f"cap{q}"))
        for r in rng.choice(len(txt), size=min(a.random, len(txt)), replace=False).tolist():
            queries.append((cap_text.get(int(cap_ids[r]), "?"), txt[r], rows[r], f"cap{cap_ids[r]}"))
        if a.query_text:
            ck = load_checkpoint(Path(tm["checkpoint"]))
            _, txt_head = heads_from_checkpoint(ck)
            enc = text_encoder_from_sidecar(load_features(Path(tm["features"]))[1])
            import torch

            with torch.inference_mode():
                vecs = txt_head(torch.from_numpy(enc.encode(a.query_text))).numpy()
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

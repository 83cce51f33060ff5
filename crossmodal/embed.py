"""The common space: a trained run's heads applied to a split's cached features
(``get_features_captions.py``), with Faiss indexes over both galleries.

Writes into ``runs/<name>/embeddings/``:

- ``<split>_img.npy`` (N_img, 128) and ``<split>_text.npy`` (N_cap, 128), L2-normalised, with
  sidecars (ids; caption image ids; the checkpoint and features they came from);
- ``<split>_img.faiss`` (gallery of text2img) and ``<split>_text.faiss`` (gallery of img2text).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from .cli import code_version, setup_logging
from .index import INDEX_KINDS, build_index, describe, save_index
from .store import feature_path, file_digest, is_up_to_date, load_features, read_meta, save_features
from .train import check_features_fit, embed_bank, heads_from_checkpoint, load_checkpoint, load_pairs

log = logging.getLogger(__name__)


def embedding_paths(run_dir: str | Path, split: str) -> dict[str, Path]:
    d = Path(run_dir) / "embeddings"
    img, txt = feature_path(d, split, "emb", "img"), feature_path(d, split, "emb", "text")
    return {"img": img, "text": txt, "img_index": img.with_suffix(".faiss"), "text_index": txt.with_suffix(".faiss")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Project a split's features into the common space; build Faiss indexes.")
    p.add_argument("--run", required=True, help="a training run folder, runs/<name>")
    p.add_argument("--split", default="val")
    p.add_argument("--features-dir", default=None, help="default: the one the run was trained from")
    p.add_argument("--checkpoint", default="best.pt", help="file in the run folder (best.pt or last.pt)")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS)
    p.add_argument("--nlist", type=int, default=None, help="ivf cells (default ~4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--force", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(argv=None) -> dict:
    a = parser().parse_args(argv)
    setup_logging(a.verbose)
    run_dir = Path(a.run)
    ck_path = run_dir / a.checkpoint
    ck = load_checkpoint(ck_path)
    targs = ck["args"]
    fd = Path(a.features_dir or targs["features_dir"])
    img_npy = feature_path(fd, a.split, "img", targs["image_encoder"])
    txt_npy = feature_path(fd, a.split, "text", targs["text_encoder"])
    pairs = load_pairs(img_npy, txt_npy, a.split)
    check_features_fit(ck, pairs.img_meta, pairs.txt_meta, f"of split {a.split} ({img_npy}, {txt_npy})")
    out = embedding_paths(run_dir, a.split)
    index_args = {"kind": a.index, "nlist": a.nlist, "nprobe": a.nprobe, "hnsw_m": a.hnsw_m, "ef_search": a.ef_search}
    job = {"checkpoint": file_digest(ck_path), "img": pairs.img_meta.get("job"), "text": pairs.txt_meta.get("job"),
           "index": index_args}
    fresh = all(is_up_to_date(out[k], dict(job, kind=k)) for k in ("img", "text"))
    if fresh and out["img_index"].is_file() and out["text_index"].is_file() and not a.force:
        log.info("embeddings of %s in %s are up to date: skipped", a.split, out["img"].parent)
        return read_meta(out["img"])
    img_head, txt_head = heads_from_checkpoint(ck)
    img_emb = embed_bank(img_head, pairs.img).numpy()
    txt_emb = embed_bank(txt_head, pairs.txt).numpy()
    keep_caps = pairs.cap_mask
    common = {"run": str(run_dir), "checkpoint": str(ck_path), "epoch": ck["epoch"], "split": a.split,
              "code_version": code_version(), "normalised": bool(ck["head_config"]["img"]["l2norm"])}
    save_features(out["img"], img_emb, dict(common, kind="img", job=dict(job, kind="img"), ids=pairs.img_meta["ids"],
                                             features=str(img_npy)))
    save_features(out["text"], txt_emb, dict(
        common, kind="text", job=dict(job, kind="text"), features=str(txt_npy),
        ids=np.asarray(pairs.txt_meta["ids"])[keep_caps].tolist(),
        image_ids=np.asarray(pairs.txt_meta["image_ids"])[keep_caps].tolist()))
    for key, emb in (("img_index", img_emb), ("text_index", txt_emb)):
        index = build_index(emb, a.index, nlist=a.nlist, nprobe=a.nprobe, hnsw_m=a.hnsw_m, ef_search=a.ef_search)
        save_index(index, out[key])
        log.info("index %s: %s", out[key], describe(index))
    log.info("embeddings: %d images, %d captions (dim %d) -> %s", len(img_emb), len(txt_emb), img_emb.shape[1],
             out["img"].parent)
    return read_meta(out["img"])


def load_embeddings(run_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, dict]:
    """``(img (N_img, d), text (N_cap, d), cap_img_rows (N_cap,), img_meta, text_meta)``."""
    from .coco import rows_of

    p = embedding_paths(run_dir, split)
    img, im = load_features(p["img"])
    txt, tm = load_features(p["text"])
    rows = rows_of(np.asarray(im["ids"], dtype=np.int64), np.asarray(tm["image_ids"], dtype=np.int64))
    return np.asarray(img), np.asarray(txt), rows, im, tm

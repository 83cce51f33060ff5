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
import os
import time
from pathlib import Path

import numpy as np

from .cli import code_version, existing_dir, int_in_range, positive_int, setup_logging, split_name
from .errors import FeatureError, ModelError
from .index import INDEX_KINDS, build_index, describe, index_bytes
from .outputs import check, locked, publish, save_npy, tmp_path, write_bytes
from .store import feature_path, file_digest, load_features, read_meta, rows_digest, sidecar_path
from .train import (
    check_disjoint,
    check_features_fit,
    embed_bank,
    feature_digest,
    heads_from_checkpoint,
    load_checkpoint,
    load_pairs,
)

log = logging.getLogger(__name__)


def embedding_paths(run_dir: str | Path, split: str) -> dict[str, Path]:
    d = Path(run_dir) / "embeddings"
    img, txt = feature_path(d, split, "emb", "img"), feature_path(d, split, "emb", "text")
    return {"img": img, "text": txt, "img_index": img.with_suffix(".faiss"), "text_index": txt.with_suffix(".faiss")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Project a split's features into the common space; build Faiss indexes.")
    p.add_argument("--run", required=True, type=existing_dir, help="a training run folder, runs/<name>")
    p.add_argument("--split", default="val", type=split_name)
    p.add_argument("--features-dir", default=None, type=existing_dir, help="default: the one the run was trained from")
    p.add_argument("--checkpoint", default="best.pt", help="file in the run folder (best.pt or last.pt)")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS)
    p.add_argument("--nlist", type=positive_int, default=None, help="ivf cells (default ~4 sqrt(N))")
    p.add_argument("--nprobe", type=positive_int, default=16)
    p.add_argument("--hnsw-m", type=int_in_range(2, 512), default=32)
    p.add_argument("--ef-search", type=positive_int, default=128)
    p.add_argument("--force", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def checkpoint_of_run(run_dir: Path, ck_path: Path) -> dict:
    """Load ``ck_path`` and check that it belongs to the run in ``run_dir`` (same arguments and
    features as its ``args.json``): a checkpoint of another run, head shape or text encoder is refused."""
    from .outputs import read_sidecar

    ck = load_checkpoint(ck_path)
    record = read_sidecar(run_dir / "args.json")
    if record is None:
        raise ModelError(f"{run_dir} is not a training run folder: its args.json is missing or unreadable")
    if ck.get("run_record") != record:
        from .outputs import diff

        changes = diff(record, ck.get("run_record") or {})
        raise ModelError(f"checkpoint {ck_path} does not belong to run {run_dir} (it differs in "
                         f"{'; '.join(changes[:3])}): use the run's own checkpoint")
    return ck


def features_dir_of(run_dir: Path, targs: dict) -> Path:
    """Where a run's features are: recorded relative to the run folder (so any working directory
    works), else as given when it was trained."""
    rel = targs.get("features_dir_from_run")
    if rel is not None and (run_dir / rel).is_dir():
        return run_dir / rel
    return Path(targs["features_dir"])


def run(argv=None) -> dict:
    a = parser().parse_args(argv)
    setup_logging(a.verbose)
    run_dir = Path(a.run)
    with locked(run_dir / "run", shared=True, what=f"run {run_dir}"):  # no training replaces the checkpoint now
        ck_path = run_dir / a.checkpoint
        ck = checkpoint_of_run(run_dir, ck_path)
        fd = Path(a.features_dir) if a.features_dir else features_dir_of(run_dir, ck["args"])
        img_npy = feature_path(fd, a.split, "img", ck["args"]["image_encoder"])
        txt_npy = feature_path(fd, a.split, "text", ck["args"]["text_encoder"])
        with locked(img_npy, shared=True, what=f"feature file {img_npy}"), \
                locked(txt_npy, shared=True, what=f"feature file {txt_npy}"):
            pairs = load_pairs(img_npy, txt_npy, a.split)
            check_features_fit(ck, pairs.img_meta, pairs.txt_meta, f"of split {a.split} ({img_npy}, {txt_npy})")
            train_split = ck["args"]["train_split"]
            if a.split != ck["args"].get("val_split"):
                check_disjoint(ck["train_image_ids"].numpy(), pairs.img_meta["ids"],
                               f"split {a.split!r}", f"the training split {train_split!r} of run {run_dir}",
                               "score the model on images it was not trained on")
            out = embedding_paths(run_dir, a.split)
            with locked(out["img"], what=f"embeddings of {a.split} in {run_dir}"):
                return _embed(a, run_dir, ck_path, ck, pairs, img_npy, txt_npy, out)


def _embed(a, run_dir: Path, ck_path: Path, ck: dict, pairs, img_npy: Path, txt_npy: Path, out: dict) -> dict:
    index_args = {"kind": a.index, "nlist": a.nlist, "nprobe": a.nprobe, "hnsw_m": a.hnsw_m, "ef_search": a.ef_search}
    job = {"index": index_args, "inputs": {"checkpoint": file_digest(ck_path),
                                           "img": feature_digest(pairs.img_meta, img_npy),
                                           "text": feature_digest(pairs.txt_meta, txt_npy)}}
    fresh = [check(sidecar_path(out[k]), dict(job, kind=k), a.force, what=f"embeddings {out[k]}",
                   rebuild_on=("inputs",)) for k in ("img", "text")]
    if all(fresh):
        log.info("embeddings of %s in %s are up to date: skipped", a.split, out["img"].parent)
        return read_meta(out["img"])
    img_head, txt_head = heads_from_checkpoint(ck)
    embs = {"img": embed_bank(img_head, pairs.img).numpy(), "text": embed_bank(txt_head, pairs.txt).numpy()}
    keep_caps = pairs.cap_mask
    rel = lambda p: os.path.relpath(Path(p).resolve(), run_dir.resolve())  # noqa: E731
    common = {"run": run_dir.name, "checkpoint": rel(ck_path), "epoch": ck["epoch"], "split": a.split,
              "code_version": code_version(), "normalised": bool(ck["head_config"]["img"]["l2norm"])}
    metas = {
        "img": dict(common, kind="img", ids=pairs.img_meta["ids"], features=rel(img_npy)),
        "text": dict(common, kind="text", features=rel(txt_npy),
                     ids=np.asarray(pairs.txt_meta["ids"])[keep_caps].tolist(),
                     image_ids=np.asarray(pairs.txt_meta["image_ids"])[keep_caps].tolist()),
    }
    for k, emb in embs.items():  # each embedding is published with the index of its gallery
        index = build_index(emb, a.index, nlist=a.nlist, nprobe=a.nprobe, hnsw_m=a.hnsw_m, ef_search=a.ef_search)
        tmp_npy, tmp_index = tmp_path(out[k]), tmp_path(out[f"{k}_index"])
        save_npy(tmp_npy, np.ascontiguousarray(emb, dtype=np.float32))
        write_bytes(tmp_index, index_bytes(index))
        meta = dict(metas[k], job=dict(job, kind=k), index=describe(index), count=len(emb), dim=emb.shape[1],
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta["rows_sha256"] = rows_digest(meta)  # readers refuse id lists reordered or edited since
        publish(sidecar_path(out[k]), meta, {out[k]: tmp_npy, out[f"{k}_index"]: tmp_index})
        log.info("index %s: %s", out[f"{k}_index"], describe(index))
    log.info("embeddings: %d images, %d captions (dim %d) -> %s", len(embs["img"]), len(embs["text"]),
             embs["img"].shape[1], out["img"].parent)
    return read_meta(out["img"])


def load_embeddings(run_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, dict]:
    """``(img (N_img, d), text (N_cap, d), cap_img_rows (N_cap,), img_meta, text_meta)``.

    Refuses embeddings whose files do not match their sidecars, or that were made from another
    checkpoint than the one the run folder holds now (the run was retrained since)."""
    from .coco import rows_of

    run_dir = Path(run_dir)
    p = embedding_paths(run_dir, split)
    img, im = load_features(p["img"])
    txt, tm = load_features(p["text"])
    for meta, path in ((im, p["img"]), (tm, p["text"])):
        ck = run_dir / str(meta.get("checkpoint", "best.pt"))
        want = (meta.get("job") or {}).get("inputs", {}).get("checkpoint")
        if not ck.is_file() or file_digest(ck) != want:
            raise FeatureError(f"embeddings {path} were made from another checkpoint than {ck} holds now (retrained "
                               f"since?): rerun get_features_captions.py --run {run_dir} --split {split}")
    img_ids, cap_img_ids = np.asarray(im["ids"], dtype=np.int64), np.asarray(tm["image_ids"], dtype=np.int64)
    lacking = np.setdiff1d(cap_img_ids, img_ids)
    if len(lacking):
        raise FeatureError(f"caption embeddings {p['text']} belong to {len(lacking)} images that the image embeddings "
                           f"{p['img']} lack (first id {int(lacking[0])}): they are not embeddings of one split; rerun "
                           f"get_features_captions.py --run {run_dir} --split {split} --force")
    rows = rows_of(img_ids, cap_img_ids)
    return np.asarray(img), np.asarray(txt), rows, im, tm

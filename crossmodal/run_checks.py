"""The read-time checks of a run's derived outputs against what they were made from.

A run's files form a chain, each link recorded by digest when it was written:

    the split's images and captions  ->  features (sidecar ``job.data``: the stage's data digest)
    features + checkpoint            ->  embeddings and their Faiss indexes (sidecar ``job.inputs``)
    embeddings and indexes           ->  scores, top-k lists, figures (their own jobs' ``inputs``)

:mod:`crossmodal.outputs` decides whether an output must be *made* again; this module checks, when
an output is *read* (scoring, figures, the server's gallery, all through :mod:`crossmodal.runs`),
that each link still holds, and refuses in one line that names the stage to rerun:

- :func:`check_embeddings_inputs`: the checkpoint and the feature files the embeddings name hold
  the bytes they were made from (a retrained run, features rebuilt since);
- :func:`check_split_data`: the features behind them were made from the images and captions the
  split being shown holds now (with :func:`check_in_split`, its ids);
- :func:`check_reproduces`: the checkpoint's heads applied to those features give the embeddings.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import DataError, FeatureError
from .outputs import file_digest, read_sidecar, verify_files
from .store import load_features, sidecar_path

log = logging.getLogger("crossmodal.runs")

_STAGE = {"img": ("image", "images", "make_database_img.py"), "text": ("caption", "captions", "make_database_text.py")}


def shown(path: str | Path) -> str:
    """A path as a user would type it: relative to the working directory when under it."""
    p = Path(os.path.normpath(Path(path).absolute()))
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def embed_again(run_dir: Path, split: str) -> str:
    return f"get_features_captions.py --run {shown(run_dir)} --split {split}"


def features_of(run_dir: Path, meta: dict) -> Path | None:
    """The feature file an embedding sidecar names (recorded relative to the run folder), or None."""
    rec = meta.get("features")
    return Path(os.path.normpath(run_dir / rec)) if isinstance(rec, str) and rec else None


def check_embeddings_inputs(run_dir: Path, split: str, meta: dict, path: Path, kind: str) -> None:
    """Refuse embeddings ``path`` (sidecar ``meta``; ``kind`` ``img`` or ``text``) whose checkpoint or
    feature file holds other bytes now than the ones they were made from (``meta["job"]["inputs"]``).
    Features that are gone cannot be checked: logged, not refused (scores need only the embeddings)."""
    inputs = (meta.get("job") or {}).get("inputs") or {}
    ck = run_dir / str(meta.get("checkpoint", "best.pt"))
    if not ck.is_file() or file_digest(ck) != inputs.get("checkpoint"):
        raise FeatureError(f"embeddings {path} were made from another checkpoint than {ck} holds now "
                           f"(retrained since?): rerun {embed_again(run_dir, split)}")
    npy = features_of(run_dir, meta)
    fmeta = read_sidecar(sidecar_path(npy)) if npy is not None else None
    if fmeta is None:
        log.warning("the %s features embeddings %s were made from (%s) are gone: they cannot be checked",
                    _STAGE[kind][0], path, npy)
        return
    now = ((fmeta.get("files") or {}).get(npy.name) or {}).get("sha256")
    problem = verify_files(sidecar_path(npy), fmeta)
    if problem or now != inputs.get(kind):
        why = problem or "rebuilt since"
        raise FeatureError(f"{shown(path)} was made from other {_STAGE[kind][0]} features than {shown(npy)} holds "
                           f"now ({why}): rerun {embed_again(run_dir, split)}")


def check_split_data(run_dir: Path, split_name: str, emb_metas: tuple[dict, dict], split, coco_root) -> None:
    """Refuse embeddings whose features were made from other captions or images than ``split`` (the
    loaded :class:`crossmodal.coco.CaptionSplit` of ``coco_root``) holds now: the features' recorded
    data digest (``job.data`` over ``job.rows``) is computed again on the split as it is. Captions
    are compared by id and text; images as the feature stage compares them (id, size, modification
    and change time: a copied or moved dataset counts as changed, as ``make_database_img.py`` would
    rebuild from it). Features moved or deleted since are checked by what the embeddings recorded of
    them when they were made (their sidecar's ``features_job``)."""
    from .extract import data_digest

    for kind, meta in zip(("text", "img"), emb_metas[::-1], strict=True):
        npy = features_of(run_dir, meta)
        job = (read_sidecar(sidecar_path(npy)) or {}).get("job") if npy is not None else None
        if not isinstance(job, dict) or "data" not in job:  # gone: what the embeddings recorded of them
            job = meta.get("features_job")
        if not isinstance(job, dict) or not isinstance(job.get("data"), str):
            continue  # older embeddings of features that are gone, or features without a data digest
        n = split.num_captions if kind == "text" else split.num_images
        rows = job.get("rows")
        same = (isinstance(rows, list) and len(rows) == 2 and all(type(r) is int for r in rows)
                and 0 <= rows[0] <= rows[1] <= n and job["data"] == data_digest(kind, split, *rows))
        if not same:
            _, whats, stage = _STAGE[kind]
            raise DataError(
                f"{shown(npy)} was made from other {whats} than {shown(coco_root)}'s split {split_name} holds now "
                f"({whats} changed, added or removed since{', or the folder was copied' if kind == 'img' else ''}): "
                f"rerun {stage} --coco-root {shown(coco_root)} --split {split_name} --encoder {job.get('encoder')} "
                f"--features-dir {shown(npy.parent)} (its other settings as before), then "
                f"{embed_again(run_dir, split_name)}")


def check_in_split(split, img_ids, cap_ids, where: str, split_name: str) -> None:
    """Refuse embeddings (of ``where``) whose image or caption ids the loaded COCO ``split`` lacks."""
    missing = np.setdiff1d(np.asarray(img_ids, dtype=np.int64), split.image_ids)
    known = set(split.caption_ids.tolist())
    missing_caps = [c for c in np.asarray(cap_ids).tolist() if c not in known]
    if len(missing) or missing_caps:
        raise DataError(f"the embeddings of {where} list {len(missing)} image ids and {len(missing_caps)} "
                        f"caption ids that split {split_name!r} of {split.source} does not have (first: "
                        f"{(missing.tolist() + missing_caps)[:5]}): wrong --coco-root or --split? (if the split "
                        "changed since, rerun make_database_img.py / make_database_text.py and "
                        "get_features_captions.py)")


def check_reproduces(head, feat_path: Path, emb_meta: dict, emb: np.ndarray, what: str, n: int = 8) -> None:
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

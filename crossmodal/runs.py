"""A trained run, opened once, and every check that says its files belong together.

A run is a training run folder ``runs/<name>/`` (``args.json``, ``best.pt``, ``embeddings/``,
``retrieval/``), or (:meth:`Run.resolve`) a pipeline output ``runs/<out>/`` standing for its best
model by validation rsum. ``embed``, ``retrieve`` (scores and figures), ``pipeline`` and ``serve``
open runs here and nowhere else. The checks, each made here only:

- a checkpoint belongs to the run: it carries the run's ``args.json`` (:meth:`Run.checkpoint`);
- features fit the checkpoint's encoders, and a scored split shares no image with the training
  split (:meth:`Run.embed`, which builds a split's embeddings + Faiss indexes through
  :mod:`crossmodal.outputs`, skipped when fresh);
- embeddings were made from the checkpoint and the feature files the run and features folder hold
  now (their digests), and their caption rows belong to embedded images (:meth:`Run.embeddings`);
  indexes hold the embeddings' count and dimension (:meth:`Run.index`);
- the features the embeddings name still exist and fit the checkpoint, the heads applied to them
  reproduce the embeddings, and the encoders rebuilt from their sidecars are the ones that made
  them (:meth:`Run.member`, :class:`Member`);
- the embedded ids are in the COCO split being shown, and its images and captions are the ones
  the features were made from (:meth:`Scored.check_split`).

The read-time checks themselves live in :mod:`crossmodal.run_checks`; each refuses in one line
naming the stage to rerun.

Several runs open together as one :class:`Scored` (:func:`open_runs`): an ensemble when more
than one (:mod:`crossmodal.ensemble` combines them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoints import heads_from_checkpoint, load_checkpoint
from .cli import code_version
from .encoders import check_features_fit, checked_text_encoder, image_encoder_from_sidecar
from .ensemble import StackedEncoder, StackedHead, combine, ensemble_dir
from .errors import DataError, FeatureError, ModelError
from .index import build_index, describe, index_bytes, load_index, resolve_kind, stale_on
from .outputs import check, diff, locked, publish, read_sidecar, save_npy, tmp_path, write_bytes
from .run_checks import check_embeddings_inputs, check_in_split, check_reproduces, check_split_data, embed_again
from .run_state import check_disjoint, feature_digest
from .store import feature_path, file_digest, load_features, read_meta, rows_digest, safe_split_name, sidecar_path

log = logging.getLogger("crossmodal.runs")


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


def embedding_paths(run_dir: str | Path, split: str) -> dict[str, Path]:
    d = Path(run_dir) / "embeddings"
    img, txt = feature_path(d, split, "emb", "img"), feature_path(d, split, "emb", "text")
    return {"img": img, "text": txt, "img_index": img.with_suffix(".faiss"), "text_index": txt.with_suffix(".faiss")}


def features_dir_of(run_dir: Path, targs: dict) -> Path:
    """Where a run's features are: recorded relative to the run folder (so any working directory
    works), else as given when it was trained."""
    rel = targs.get("features_dir_from_run")
    if rel is not None and (run_dir / rel).is_dir():
        return run_dir / rel
    return Path(targs["features_dir"])


class Run:
    """One training run folder (``dir``); ``chosen`` says how it was picked (``"given"``, or the
    best model of a pipeline output). Checkpoints are loaded and checked once each."""

    def __init__(self, path: str | Path, chosen: str = "given"):
        self.dir, self.chosen = Path(path), chosen
        self._checkpoints: dict[str, dict] = {}

    @classmethod
    def resolve(cls, run: str | Path) -> Run:
        """A run folder, or a pipeline output's best model (:func:`resolve_run`)."""
        return cls(*resolve_run(run))

    def checkpoint(self, name: str = "best.pt") -> dict:
        """The checkpoint ``name`` (relative to the run folder), loaded safely and checked to belong
        to this run (same arguments and features as its ``args.json``): a checkpoint of another run,
        head shape or text encoder is refused."""
        if name not in self._checkpoints:
            path = self.dir / name
            ck = load_checkpoint(path)
            record = read_sidecar(self.dir / "args.json")
            if record is None:
                raise ModelError(f"{self.dir} is not a training run folder: its args.json is missing or unreadable")
            if ck.get("run_record") != record:
                changes = diff(record, ck.get("run_record") or {})
                raise ModelError(f"checkpoint {path} does not belong to run {self.dir} (it differs in "
                                 f"{'; '.join(changes[:3])}): use the run's own checkpoint")
            self._checkpoints[name] = ck
        return self._checkpoints[name]

    def feature_files(self, split: str, ck: dict, features_dir: str | Path | None = None) -> tuple[Path, Path]:
        """The image and caption feature files of ``split`` that the checkpoint's encoders made."""
        fd = Path(features_dir) if features_dir else features_dir_of(self.dir, ck["args"])
        return (feature_path(fd, split, "img", ck["args"]["image_encoder"]),
                feature_path(fd, split, "text", ck["args"]["text_encoder"]))

    def embed(self, split: str, checkpoint: str, features_dir: str | Path | None, index: dict,
              force: bool = False) -> dict:
        """Build (or find fresh) ``split``'s embeddings and Faiss indexes from ``checkpoint``; returns
        the image embeddings' sidecar. ``index``: ``kind``, ``nlist``, ``nprobe``, ``hnsw_m``,
        ``ef_search`` as :func:`crossmodal.index.build_index` takes them (``get_features_captions.py``'s flags)."""
        from .train import load_pairs

        with locked(self.dir / "run", shared=True, what=f"run {self.dir}"):  # no training replaces the checkpoint
            ck = self.checkpoint(checkpoint)
            img_npy, txt_npy = self.feature_files(split, ck, features_dir)
            with locked(img_npy, shared=True, what=f"feature file {img_npy}"), \
                    locked(txt_npy, shared=True, what=f"feature file {txt_npy}"):
                pairs = load_pairs(img_npy, txt_npy, split)
                check_features_fit(ck, pairs.img_meta, pairs.txt_meta, f"of split {split} ({img_npy}, {txt_npy})")
                if split != ck["args"].get("val_split"):
                    check_disjoint(ck["train_image_ids"].numpy(), pairs.img_meta["ids"], f"split {split!r}",
                                   f"the training split {ck['args']['train_split']!r} of run {self.dir}",
                                   "score the model on images it was not trained on")
                out = embedding_paths(self.dir, split)
                with locked(out["img"], what=f"embeddings of {split} in {self.dir}"):
                    return self._embed(split, self.dir / checkpoint, ck, pairs, (img_npy, txt_npy), out, index, force)

    def _embed(self, split, ck_path: Path, ck: dict, pairs, npys, out: dict, index: dict, force: bool) -> dict:
        from .train import embed_bank

        img_npy, txt_npy = npys  # below, each gallery's index kind: "auto" resolved by its size (index.auto_kind)
        job = {"index": index, "inputs": {"checkpoint": file_digest(ck_path),
                                          "img": feature_digest(pairs.img_meta, img_npy),
                                          "text": feature_digest(pairs.txt_meta, txt_npy)}}
        jobs = {k: dict(job, kind=k, index=dict(index, kind=resolve_kind(index["kind"], len(rows), index["nlist"])))
                for k, rows in (("img", pairs.img), ("text", pairs.txt))}
        fresh = [check(sidecar_path(out[k]), jobs[k], force, what=f"embeddings {out[k]}",
                       rebuild_on=stale_on(index["kind"], sidecar_path(out[k]), jobs[k])) for k in ("img", "text")]
        if all(fresh):
            log.info("embeddings of %s in %s are up to date: skipped", split, out["img"].parent)
            return read_meta(out["img"])
        img_head, txt_head = heads_from_checkpoint(ck)
        embs = {"img": embed_bank(img_head, pairs.img).numpy(), "text": embed_bank(txt_head, pairs.txt).numpy()}
        keep_caps = pairs.cap_mask
        rel = lambda p: os.path.relpath(Path(p).resolve(), self.dir.resolve())  # noqa: E731
        common = {"run": self.dir.name, "checkpoint": rel(ck_path), "epoch": ck["epoch"], "split": split,
                  "code_version": code_version(), "normalised": bool(ck["head_config"]["img"]["l2norm"])}
        # what the features were made from, kept for the split-data check when they are moved or deleted
        made = lambda m: {**{k: (m.get("job") or {}).get(k) for k in ("data", "rows", "encoder")},  # noqa: E731
                          "source": m.get("source")}
        metas = {
            "img": dict(common, kind="img", ids=pairs.img_meta["ids"], features=rel(img_npy),
                        features_job=made(pairs.img_meta)),
            "text": dict(common, kind="text", features=rel(txt_npy), features_job=made(pairs.txt_meta),
                         ids=np.asarray(pairs.txt_meta["ids"])[keep_caps].tolist(),
                         image_ids=np.asarray(pairs.txt_meta["image_ids"])[keep_caps].tolist()),
        }
        for k, emb in embs.items():  # each embedding is published with the index of its gallery
            built = build_index(emb, jobs[k]["index"]["kind"], nlist=index["nlist"], nprobe=index["nprobe"],
                                hnsw_m=index["hnsw_m"], ef_search=index["ef_search"])
            tmp_npy, tmp_index = tmp_path(out[k]), tmp_path(out[f"{k}_index"])
            save_npy(tmp_npy, np.ascontiguousarray(emb, dtype=np.float32))
            write_bytes(tmp_index, index_bytes(built))
            meta = dict(metas[k], job=jobs[k], index=describe(built), count=len(emb), dim=emb.shape[1],
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            meta["rows_sha256"] = rows_digest(meta)  # readers refuse id lists reordered or edited since
            publish(sidecar_path(out[k]), meta, {out[k]: tmp_npy, out[f"{k}_index"]: tmp_index})
            log.info("index %s: %s", out[f"{k}_index"], describe(built))
        log.info("embeddings: %d images, %d captions (dim %d) -> %s", len(embs["img"]), len(embs["text"]),
                 embs["img"].shape[1], out["img"].parent)
        return read_meta(out["img"])

    def embeddings(self, split: str) -> tuple:
        """``(img (N_img, d), text (N_cap, d), cap_img_rows (N_cap,), img_meta, text_meta)``.

        Refuses embeddings whose files do not match their sidecars, or that were made from another
        checkpoint or other features than the run folder and feature files hold now (retrained, or
        features rebuilt since: :func:`crossmodal.run_checks.check_embeddings_inputs`)."""
        from .coco import rows_of

        p = embedding_paths(self.dir, split)
        for kind in ("img", "text"):
            if not p[kind].is_file():
                raise FeatureError(f"{p[kind]} does not exist: run {self.dir} has no embeddings of split {split!r} "
                                   f"yet; make them with {embed_again(self.dir, split)}")
        try:
            img, im = load_features(p["img"])
            txt, tm = load_features(p["text"])
        except FeatureError as e:  # damaged embeddings: name their stage, not "the stage that makes it"
            raise FeatureError(f"{e} (embeddings are made by {embed_again(self.dir, split)})") from None
        for meta, path, kind in ((im, p["img"], "img"), (tm, p["text"], "text")):
            check_embeddings_inputs(self.dir, split, meta, path, kind)  # checkpoint and features as they were
        img_ids, cap_img_ids = np.asarray(im["ids"], dtype=np.int64), np.asarray(tm["image_ids"], dtype=np.int64)
        lacking = np.setdiff1d(cap_img_ids, img_ids)
        if len(lacking):
            raise FeatureError(f"caption embeddings {p['text']} belong to {len(lacking)} images that the image "
                               f"embeddings {p['img']} lack (first id {int(lacking[0])}): they are not embeddings of "
                               f"one split; rerun get_features_captions.py --run {self.dir} --split {split} --force")
        return np.asarray(img), np.asarray(txt), rows_of(img_ids, cap_img_ids), im, tm

    def index(self, split: str, gallery: str, count: int, dim: int):
        """The run's Faiss index over ``gallery`` (``"img"`` or ``"text"``) of ``split``, checked to
        hold ``count`` vectors of ``dim`` dimensions."""
        path = embedding_paths(self.dir, split)[f"{gallery}_index"]
        index = load_index(path, expect_ntotal=count)
        if index.d != dim:
            raise FeatureError(f"Faiss index {path} is {index.d}-d, the embeddings {dim}-d")
        return index

    def member(self, split: str, emb: tuple) -> Member:
        """The checkpoint, heads and features behind this run's embeddings ``emb`` of ``split``
        (:meth:`embeddings`), each checked against the others."""
        img, txt, _, im, tm = emb
        for meta, what in ((im, "image"), (tm, "caption")):
            if meta.get("split") != split:
                raise FeatureError(f"{self.dir}: the {what} embeddings are of split {meta.get('split')!r}, "
                                   f"not {split!r}")
        ck = self.checkpoint(im["checkpoint"])  # the one embeddings() found they were made from
        img_head, txt_head = heads_from_checkpoint(ck)
        out_dim = ck["head_config"]["img"]["out_dim"]
        if img.shape[1] != out_dim or txt.shape[1] != out_dim:
            raise FeatureError(f"embeddings in {self.dir / 'embeddings'} are {img.shape[1]}-d, the checkpoint's "
                               f"heads {out_dim}-d")
        (img_f, img_fm), (txt_f, txt_fm) = (self._features_of(im.get("features"), "image"),
                                            self._features_of(tm.get("features"), "caption"))
        check_features_fit(ck, img_fm, txt_fm, f"({img_f}, {txt_f})")
        check_reproduces(img_head, img_f, im, img, "image")
        check_reproduces(txt_head, txt_f, tm, txt, "caption")
        return Member(self, im["checkpoint"], ck, img_head, txt_head, img_f, img_fm, txt_f, txt_fm)

    def _features_of(self, recorded: str | None, what: str) -> tuple[Path, dict]:
        """The feature file an embedding sidecar names (recorded relative to the run folder) and its sidecar."""
        path = self.dir / str(recorded)
        if not recorded or not path.with_suffix(".json").is_file():
            raise FeatureError(f"the {what} features the embeddings were made from ({path}) cannot be found; "
                               "they were moved or deleted since get_features_captions.py ran")
        return path, read_meta(path)


@dataclass
class Member:
    """One run as a model that embeds new inputs: its checkpoint (``checkpoint`` relative to the
    run), heads, and the image and caption feature files (with sidecars) its embeddings came from."""

    run: Run
    checkpoint: str
    ck: dict
    img_head: object
    txt_head: object
    img_features: Path
    img_meta: dict
    txt_features: Path
    txt_meta: dict

    def text_encoder(self):  # the caption encoder that made its caption features, rebuilt and checked
        return checked_text_encoder(self.txt_meta, self.txt_features)

    def image_encoder(self, detector_weights: str | None = None):  # the same for images (eval mode)
        return image_encoder_from_sidecar(self.img_meta, detector_weights, f"of {self.run.dir} ")


@dataclass
class Scored:
    """One run, or an ensemble of runs, of one split: what scoring, figures and the server work on.

    ``folder``: where its scores go (the run folder itself, or an ensemble folder beside the first
    run); ``label``: its name in tables; ``emb``: the 5-tuple of :func:`crossmodal.ensemble.combine`,
    ``parts``: each run's own 5-tuple (:meth:`Run.embeddings`)."""

    folder: Path
    label: str
    runs: list[Run]
    split: str
    emb: tuple
    parts: list[tuple]

    @property
    def is_ensemble(self) -> bool:
        return len(self.runs) > 1

    def index(self, gallery: str):
        """The Faiss index over a gallery (``"img"`` or ``"text"``): the run's own, or for an ensemble
        an exact flat index over the combined vectors (members' indexes cannot rank averaged similarities)."""
        emb = self.emb[0] if gallery == "img" else self.emb[1]
        return build_index(emb, "flat") if self.is_ensemble else self.runs[0].index(self.split, gallery, len(emb),
                                                                                       emb.shape[1])

    def check_split(self, split, coco_root) -> None:
        """Refuse these embeddings for ``split`` (the :class:`crossmodal.coco.CaptionSplit` being shown,
        loaded from ``coco_root``) unless it holds their ids, and the images and captions their
        features were made from (:func:`crossmodal.run_checks.check_split_data`)."""
        img_ids, cap_ids = self.emb[3]["ids"], self.emb[4]["ids"]
        check_in_split(split, img_ids, cap_ids, self.label if self.is_ensemble else str(self.folder), self.split)
        for run, part in zip(self.runs, self.parts, strict=True):
            check_split_data(run.dir, self.split, (part[3], part[4]), split, coco_root)

    def members(self) -> list[Member]:
        """Each run's :class:`Member` (checked) behind these embeddings."""
        return [r.member(self.split, e) for r, e in zip(self.runs, self.parts, strict=True)]

    def query_side(self, members: list[Member], images: bool = False, detector_weights: str | None = None):
        """``(text encoder, text head, image encoder, image head)`` that put new sentences and images
        where ``emb``'s rows are: a member's own, or for an ensemble :class:`crossmodal.ensemble.StackedEncoder`
        / :class:`~crossmodal.ensemble.StackedHead` (members of one feature file share its encoder).
        The image encoder is None unless ``images``."""
        texts, imgs = {}, {}
        for m in members:
            if m.txt_features.resolve() not in texts:
                texts[m.txt_features.resolve()] = m.text_encoder()
            if images and m.img_features.resolve() not in imgs:
                imgs[m.img_features.resolve()] = m.image_encoder(detector_weights)
        text_parts = [texts[m.txt_features.resolve()] for m in members]
        img_parts = [imgs[m.img_features.resolve()] for m in members] if images else None
        if not self.is_ensemble:
            return text_parts[0], members[0].txt_head, img_parts[0] if images else None, members[0].img_head
        return (StackedEncoder(text_parts), StackedHead([m.txt_head for m in members]),
                StackedEncoder(img_parts) if images else None, StackedHead([m.img_head for m in members]))

    def encode_sentences(self, sentences: list[str]) -> np.ndarray:
        """Typed sentences in the common space: ``(len(sentences), D)``, through every member's
        caption encoder and head (:meth:`query_side`)."""
        import torch

        encoder, head, _, _ = self.query_side(self.members())
        with torch.inference_mode():
            return head(torch.from_numpy(encoder.encode(sentences))).numpy()

    def metrics(self, members: list[Member]) -> dict:
        """Metrics to show: the split's scored metrics (``retrieval/``) if any, else (one run) the
        best epoch's validation metrics."""
        out: dict = {}
        for direction in ("img2text", "text2img"):
            p = self.folder / "retrieval" / f"{safe_split_name(self.split)}_{direction}_full_metrics.json"
            try:
                rec = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            out.update({k: v for k, v in rec.items() if k.startswith(direction + "_") and isinstance(v, int | float)})
        if out or self.is_ensemble:
            return {"source": f"retrieval on {self.split}", **out} if out else {}
        best = members[0].ck.get("best") or {}
        vals = {k[4:]: v for k, v in best.items() if k.startswith("val_") and isinstance(v, int | float)}
        return {"source": f"validation, best epoch {best.get('epoch')}", **vals} if vals else {}


@contextlib.contextmanager
def open_runs(runs, split: str, out: str | Path | None = None):
    """Hold every run's shared lock (no retraining meanwhile) and yield a :class:`Scored` for their
    embeddings of ``split``: one run as it is, several combined by :func:`crossmodal.ensemble.combine`.
    A pipeline output stands for its best model (:meth:`Run.resolve`, logged)."""
    opened = [Run.resolve(r) for r in runs]
    for given, r in zip(runs, opened, strict=True):
        if r.chosen != "given":
            log.info("--run %s: %s, %s", given, r.chosen, r.dir)
    seen = [r.dir.resolve() for r in opened]
    dupes = sorted({str(r.dir) for r in opened if seen.count(r.dir.resolve()) > 1})
    if dupes:
        raise DataError(f"--run {dupes[0]} is given twice: an ensemble's members are different runs")
    if out is not None and len(opened) == 1:
        raise DataError(f"--out {out} names an ensemble's folder: give two or more --run (one run's scores "
                        "go into its own folder)")
    with contextlib.ExitStack() as stack:
        for r in opened:
            stack.enter_context(locked(r.dir / "run", shared=True, what=f"run {r.dir}"))
        dirs, parts = [r.dir for r in opened], [r.embeddings(split) for r in opened]
        names = [d.name for d in dirs]
        folder = dirs[0] if len(dirs) == 1 else Path(out) if out else ensemble_dir(dirs)
        yield Scored(folder, "+".join(names), opened, split, combine(parts, names), parts)

"""A training run's folder and the state a kill can leave it in.

``runs/<name>/`` holds ``args.json`` (what the run is), ``results.jsonl`` (append-only: one row per
epoch and per evaluation), ``best.pt`` and ``last.pt``, ``figures/training.png`` and ``done.json``,
written in that order each epoch and at the end. :func:`start_state` reads what is there and says
whether the run is finished (``done``: ``done.json`` vouches for ``best.pt``), resumes from
``last.pt`` (checked by :func:`resume_point`), or starts afresh; a kill at any point between
these writes leaves a state that one of the three ends as an uninterrupted run would.
What a run is (:func:`run_record`; the precision ``auto`` keeps for it, :func:`settle_precision`)
and the leak rules between its splits live here too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .checkpoints import heads_are_finite, load_checkpoint
from .errors import DataError, ModelError
from .outputs import (
    OutputConflictError,
    diff,
    file_record,
    matches_record,
    read_jsonl,
    read_sidecar,
    remove,
    write_json,
)
from .train_step import resolve_precision

log = logging.getLogger(__name__)

_RUN_ONLY = ("force", "resume", "verbose", "device", "no_progress", "runs_dir", "max_ram_gb", "features_dir",
             "features_dir_from_run")
# settings added later, at the value that trains as runs did before they existed: left out of the
# record, so a run recorded then is still the same run (crossmodal/train_step.py)
_OLD_LOOP = {"step": "exact", "precision": "fp32", "head": "mlp"}


def read_results(path: Path, upto_epoch: int | None = None) -> list[dict]:
    """The epoch rows of a run's ``results.jsonl``, the last one written for each epoch (a resumed
    run appends the epochs it redoes), up to ``upto_epoch``. Rows without an integer epoch and a
    numeric loss (damaged by hand or disk) are skipped."""
    rows = {}
    for r in read_jsonl(path):
        e = r.get("epoch")
        if r.get("type") != "epoch" or type(e) is not int or not isinstance(r.get("loss"), int | float):
            continue
        if upto_epoch is None or e <= upto_epoch:
            rows[e] = r
    return [rows[e] for e in sorted(rows)]


def run_files(out: Path) -> dict[str, Path]:
    return {"args": out / "args.json", "done": out / "done.json", "last": out / "last.pt", "best": out / "best.pt",
            "results": out / "results.jsonl", "plot": out / "figures" / "training.png"}


def _checkpoint_record(path: Path) -> dict | None:
    """The run record (args.json) a checkpoint carries, or None when it cannot be loaded."""
    try:
        return load_checkpoint(path).get("run_record") if path.is_file() else None
    except ModelError:
        return None


def _finished(f: dict) -> dict | None:
    """The run's ``done.json`` when it vouches for the ``best.pt`` on disk (a finished run), else None."""
    done = read_sidecar(f["done"])
    if done and isinstance(done.get("best"), dict) and matches_record(f["best"], done.get("best_file")):
        return done
    return None


def start_state(a, out: Path, record: dict) -> str:
    """What to do with the run folder: ``done`` (skip), ``resume``, or ``fresh``. Refuses a folder
    that holds work of other arguments unless ``--force``; ``--force`` clears it."""
    f = run_files(out)
    if a.force:
        if any(p.exists() for p in f.values()):
            log.info("--force: %s starts afresh (its checkpoints, results, embeddings, scores and figures are removed)",
                     out)
        remove(*f.values(), out / "embeddings", out / "retrieval", out / "figures")
        return "fresh"
    old = read_sidecar(f["args"])
    has_work = f["last"].exists() or f["best"].exists() or f["done"].exists()
    if old is None and has_work:  # args.json lost or damaged: the checkpoints say which run they belong to
        old = _checkpoint_record(f["last"]) or _checkpoint_record(f["best"])
        if old is not None:
            log.warning("%s is missing or unreadable: the run's arguments are read from its checkpoint", f["args"])
    if old is not None and old != record and has_work:
        changes = diff({**_OLD_LOOP, **old}, {**_OLD_LOOP, **record})  # a left-out setting shows its value
        raise OutputConflictError(
            f"run {out} holds a model trained with other arguments or features ({'; '.join(changes[:4])}"
            f"{'; ...' if len(changes) > 4 else ''}): pass --name NEW for a separate run, or --force to retrain "
            "this one from scratch")
    done = _finished(f) if old == record else None
    if done:
        if a.resume:
            log.info("--resume: run %s is finished (%s epochs, best epoch %s): nothing to resume (--force retrains)",
                     out, done.get("epochs_run"), done["best"].get("epoch"))
        return "done"
    if a.resume and not f["last"].is_file():
        raise ModelError(f"--resume: {f['last']} does not exist (nothing to resume: run without --resume)")
    return "resume" if old == record and f["last"].is_file() else "fresh"


def settle_precision(a, out: Path, device) -> str:
    """``--precision`` as this run trains: ``auto`` keeps the precision that the run already in
    ``out`` trained with (copied from a device where ``auto`` resolved otherwise, it resumes, or
    stays finished, as it was; emulated bf16 is slower, not different), else :func:`resolve_precision`."""
    native = resolve_precision(a.precision, device)
    f = run_files(out)
    if a.precision != "auto" or a.force or not any(f[k].exists() for k in ("last", "best", "done")):
        return native
    old = read_sidecar(f["args"]) or _checkpoint_record(f["last"]) or _checkpoint_record(f["best"]) or {}
    kept = old.get("precision", _OLD_LOOP["precision"]) if old else native
    if kept in ("fp32", "bf16") and kept != native:
        log.info("%s was trained with --precision %s (auto is %s on %s): it keeps %s (--force or --name NEW to "
                 "train with %s)", out, kept, native, device, kept, native)
        return kept
    return native


def resume_point(f: dict, record: dict) -> dict | None:
    """``last.pt``, checked: it is this run's, and ``best.pt`` holds its best epoch (or the epoch
    after it, saved just before a kill). None (logged) when either is unusable: training is
    seeded, so starting afresh ends in the files an uninterrupted run writes."""
    try:
        ck = load_checkpoint(f["last"])
        if not heads_are_finite(ck):
            raise ModelError(f"checkpoint {f['last']} holds NaN or infinite weights")
    except ModelError as e:
        log.warning("%s; the run starts afresh (seeded: it ends as an uninterrupted run would)", e)
        return None
    if ck.get("run_record") != record:
        changes = diff(record, ck.get("run_record") or {})
        raise ModelError(f"{f['last']} is not this run's checkpoint (it differs in {'; '.join(changes[:3])}): "
                         "delete it, or pass --force to retrain the run")
    want = (ck.get("best") or {}).get("epoch", -1)
    if want < 0:
        return ck
    try:
        b = load_checkpoint(f["best"])
        why = (None if b.get("run_record") == record and b.get("epoch") in (want, ck["epoch"] + 1)
               else f"it holds epoch {b.get('epoch')} of {'this' if b.get('run_record') == record else 'another'} run")
    except ModelError as e:
        why = str(e)
    if why:
        log.warning("%s should hold the best epoch %d (%s); the run starts afresh (seeded: it ends as an "
                    "uninterrupted run would)", f["best"], want, why)
        return None
    ck["best_on_disk"] = b["epoch"]
    return ck


def check_disjoint(ids_a, ids_b, what_a: str, what_b: str, advice: str) -> None:
    """Refuse two id sets that share anything: the error names both and the number shared."""
    shared = np.intersect1d(np.asarray(ids_a, dtype=np.int64), np.asarray(ids_b, dtype=np.int64))
    if len(shared):
        raise DataError(f"{what_a} and {what_b} share {len(shared)} images (e.g. ids {shared[:3].tolist()}): "
                        f"{advice}")


def check_text_model(txt_meta: dict, train_image_ids, train_split: str, txt_npy: Path) -> None:
    """Refuse caption features whose fastText model saw captions of images outside the training split."""
    seen = txt_meta.get("text_model_train_image_ids")
    if seen is None:
        return
    outside = np.setdiff1d(np.asarray(seen, dtype=np.int64), np.asarray(train_image_ids, dtype=np.int64))
    if len(outside):
        raise DataError(
            f"the fastText model behind {txt_npy} was trained on captions of {len(outside)} images outside the "
            f"training split {train_split!r} (e.g. ids {outside[:3].tolist()}): re-make the caption features with "
            f"--fasttext-train-split {train_split} --force")


def feature_digest(meta: dict, npy: Path) -> str:
    """The content digest of a loaded feature file, from its (verified) sidecar."""
    return meta["files"][Path(npy).name]["sha256"]


def run_record(a, name: str, train, val, paths: dict) -> dict:
    """What a run is: every argument that changes training, and the content of its features."""
    record = {k: v for k, v in vars(a).items() if k not in _RUN_ONLY and not (k in _OLD_LOOP and v == _OLD_LOOP[k])}
    record["name"] = name
    record["features"] = {k: feature_digest(m, paths[k]) for k, m in (
        ("train_img", train.img_meta), ("train_txt", train.txt_meta), ("val_img", val.img_meta),
        ("val_txt", val.txt_meta))}
    return record


def plot_results(results: list[dict], path: Path) -> None:
    """Draw ``figures/training.png`` from the epoch rows."""
    from .figures import training_curves

    training_curves(results, path)


def finish(name: str, out: Path, f: dict, best: dict, best_on_disk: int, last_epoch: int) -> dict:
    """The training curve, then ``done.json`` (last: it vouches for ``best.pt``)."""
    if best_on_disk != best["epoch"]:  # a redone epoch after a kill did not repeat itself (non-deterministic)
        raise ModelError(f"{f['best']} holds epoch {best_on_disk}, but the best epoch is {best['epoch']}: the "
                         "epoch redone after an interruption gave another result; pass --force to retrain the run")
    results = read_results(f["results"], upto_epoch=last_epoch)
    lost = sorted(set(range(last_epoch + 1)) - {r["epoch"] for r in results})
    if lost:
        log.warning("%s lacks the rows of epochs %s (lost or damaged): the training curve skips them",
                    f["results"], lost[:10])
    plot_results(results, f["plot"])
    summary = {"name": name, "run_dir": str(out), "best": best, "epochs_run": last_epoch + 1,
               "checkpoint": str(f["best"]), "best_file": file_record(f["best"])}
    write_json(f["done"], summary)
    log.info("best epoch %d: rsum %.1f, R@1 i2t %.1f t2i %.1f -> %s", best["epoch"], best["rsum"],
             best.get("val_img2text_R@1", float("nan")), best.get("val_text2img_R@1", float("nan")), f["best"])
    return summary

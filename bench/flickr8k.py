"""Training recipes at real scale: Flickr8k train (6,000 images, 30,000 captions), scored on dev.

    python -m bench.flickr8k --configs l0-minilm,seed-recipe,defaults --seeds 2
    python -m bench.flickr8k --configs seed-recipe,prev-defaults --base prev-defaults \
        --curve 110,500,1000,2000,4000,6000 --seeds 1
    python -m bench.flickr8k --configs ens-best --mpnet mpnet

The official Flickr8k files (``../shared/data/flickr8k``: ``Flickr8k.token.txt``,
``Flickr_8k.{train,dev}Images.txt``, ``Images/``) are laid out once as a COCO-style root
(:func:`make_root`: ``annotations/captions_{train,dev}.json`` + ``{train,dev}/`` symlinks)
with the project's id rule: image id = the file name's leading digits
(``1000268201_693b08cb0e.jpg`` -> 1000268201), caption id = image id * 10 + caption number
(``#0``-``#4``). The test split is never read (it is not in ``../shared``).

Features are made by the package's own code (:class:`bench.cv_features.Features`, as
``make_database_img.py`` / ``make_database_text.py`` make them), once per encoder setting and
split, cached in ``--cache-dir``. Each run is :class:`crossmodal.train.Trainer` (the loop of
the training scripts) with a config's flags over the scripts' defaults
(:func:`bench.cv_defaults.training_args`), trained on train (or its first ``n`` images by id,
``--curve``) and validated on all of dev after each epoch; as the scripts do, a run's score is
the rsum (R@1/5/10 of both directions, %) of its best dev epoch (the last epoch's is kept too).
Dev both selects the epoch and scores it (as a user of the scripts sees it); there are no folds
here. Rows are summarised over ``--seeds`` seeds with paired differences to ``--base``
(same seed), ensembles (``ens-*``, :func:`crossmodal.ensemble.combine`, as
``retrieve_img2text.py --run A --run B``) against their members' mean and best member.
Results: ``bench/results/flickr8k.json`` (every run) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import SHARED, machine, save
from bench.cv_defaults import (
    _ARRAYS,
    BASE_IMG,
    BASE_TXT,
    Config,
    _pairs,
    ensemble,
    load_runs,
    merged,
    save_runs,
    summarise,
    table,
    trained_settings,
    training_args,
)
from bench.cv_features import Features
from crossmodal.image_encoders import DEFAULT_INPUT_SIZE
from crossmodal.text_encoders import DEFAULT_BERT
from crossmodal.train import SEED_RECIPE

SPLITS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt"}


def image_id(file_name: str) -> int:
    """The project's Flickr8k image id: the file name's leading digits."""
    digits = file_name[: len(file_name) - len(file_name.lstrip("0123456789"))]
    if not digits:
        raise ValueError(f"Flickr8k file name {file_name!r} does not start with digits")
    return int(digits)


def make_root(src: Path, dst: Path) -> Path:
    """Lay Flickr8k's official train and dev out as a COCO-style root under ``dst`` (idempotent):
    ``annotations/captions_<split>.json`` (images ``{id, file_name}``, annotations
    ``{id = image_id*10 + n, image_id, caption}``) and ``<split>/<file_name>`` symlinks."""
    caps: dict[str, list[tuple[int, str]]] = {}
    for line in (src / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        key, text = line.split("\t", 1)
        name, n = key.rsplit("#", 1)
        caps.setdefault(name, []).append((int(n), text.strip()))
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    for split, list_file in SPLITS.items():
        names = sorted({x.strip() for x in (src / list_file).read_text().splitlines() if x.strip()})
        (dst / split).mkdir(exist_ok=True)
        images, anns = [], []
        for name in names:
            iid = image_id(name)
            images.append({"id": iid, "file_name": name})
            anns += [{"id": iid * 10 + n, "image_id": iid, "caption": t} for n, t in sorted(caps[name])]
            link = dst / split / name
            if not link.exists():
                link.symlink_to((src / "Images" / name).resolve())
        out = dst / "annotations" / f"captions_{split}.json"
        if not out.is_file():
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"images": images, "annotations": anns}))
            tmp.replace(out)
    return dst


# ---------------------------------------------------------------- configs

def _img(**kw) -> dict:
    return {**BASE_IMG, **kw}


def _txt(**kw) -> dict:
    return {**BASE_TXT, **kw}


#: The default features (make_database_img.py's and make_database_text.py --encoder bert's defaults);
#: the rows from before the defaults moved to 384 px and all-mpnet-base-v2 keep BASE_IMG / BASE_TXT
#: (256 px, MiniLM), as they were measured.
DEFAULT_IMG = _img(input_size=DEFAULT_INPUT_SIZE)
DEFAULT_TXT = _txt(model=DEFAULT_BERT)
SEED = SEED_RECIPE.split()  # the seed's recipe (the defaults before this bench)
HW = ["--negatives", "hardest", "--warmup-epochs", "2", "--head", "mlp", "--hidden", "1024"]  # VSE++, warm-up
PREV = [*HW, "--epochs", "30"]  # the BERT scripts' defaults before the residual head (bench --epochs 30)
NEW = ["--negatives", "hardest", "--warmup-epochs", "2", "--head", "residual", "--hidden", "2048", "--epochs", "6"]
VSE = [*HW, "--out-dim", "512", "--batch-size", "256"]
VSE10 = [*VSE, "--epochs", "10"]


def configs() -> list[Config]:
    """Named recipes (``defaults``: img2text_bert.py as it is; ``seed-recipe``: the defaults before)."""
    mp, l2 = _txt(model="mpnet"), _img(variant=2)
    c = [
        # the defaults spelled out (so their runs are the vse-* rows' runs); check_defaults() checks they are
        Config("defaults", "img2text_bert.py's defaults (crossmodal/train.py build_parser) on the default features",
               img=DEFAULT_IMG, txt=DEFAULT_TXT, argv=NEW),
        Config("defaults-t2i", "text2img_bert.py's defaults on the default features", img=DEFAULT_IMG,
               txt=DEFAULT_TXT, argv=NEW, direction="text2img"),
        Config("prev-defaults", "img2text_bert.py's defaults before the residual head", argv=PREV),
        Config("prev-defaults-t2i", "text2img_bert.py's defaults before the residual head", argv=PREV,
               direction="text2img"),
        Config("seed-recipe", f"the seed's recipe (img2text_bert.py {SEED_RECIPE})", argv=SEED),
        Config("seed-recipe-t2i", f"the seed's recipe (text2img_bert.py {SEED_RECIPE})", argv=SEED,
               direction="text2img"),
        Config("hw2", "--negatives hardest --warmup-epochs 2", argv=HW),
        Config("hw2-t2i", "text2img, --negatives hardest --warmup-epochs 2", argv=HW, direction="text2img"),
        Config("hw2-both", "hardest, warm-up 2, --direction both", argv=[*HW, "--direction", "both"]),
        Config("hw2-b256", "hardest, warm-up 2, batch 256", argv=[*HW, "--batch-size", "256"]),
        Config("hw2-b512", "hardest, warm-up 2, batch 512", argv=[*HW, "--batch-size", "512"]),
        Config("hw2-e60", "hardest, warm-up 2, 60 epochs", argv=[*HW, "--epochs", "60"]),
        Config("hw2-h2048", "hardest, warm-up 2, hidden 2048", argv=[*HW, "--hidden", "2048"]),
        Config("hw2-d0.3", "hardest, warm-up 2, dropout 0.3", argv=[*HW, "--dropout", "0.3"]),
        Config("hw2-o256", "hardest, warm-up 2, out-dim 256", argv=[*HW, "--out-dim", "256"]),
        Config("hw2-lr5e-4", "hardest, warm-up 2, lr 5e-4", argv=[*HW, "--lr", "5e-4"]),
        Config("hw2-lr2e-3", "hardest, warm-up 2, lr 2e-3", argv=[*HW, "--lr", "2e-3"]),
        Config("inf-t0.03", "InfoNCE, temperature 0.03", argv=["--negatives", "infonce", "--temperature", "0.03"]),
        Config("inf-t0.1", "InfoNCE, temperature 0.1", argv=["--negatives", "infonce", "--temperature", "0.1"]),
        Config("hw2-mpnet", "hardest, warm-up 2, all-mpnet-base-v2 captions", txt=mp, argv=HW),
        Config("hw2-lite2", "hardest, warm-up 2, EfficientNet-Lite2 256 px", img=l2, argv=HW),
        Config("hw2-lite2-mpnet", "hardest, warm-up 2, Lite2 + mpnet", img=l2, txt=mp, argv=HW),
        Config("c1", "hardest, warm-up 2, both, out-dim 512, batch 256", argv=[*VSE, "--direction", "both"]),
        Config("c2", "c1 + dropout 0.5, 15 epochs", argv=[*VSE, "--direction", "both", "--dropout", "0.5",
                                                         "--epochs", "15"]),
        Config("vse", "hardest, warm-up 2, both, out-dim 512, batch 256, 10 epochs", argv=[*VSE10, "--direction",
                                                                                           "both"]),
        Config("vse-i2t", "vse, img2text only (img2text_bert.py's direction)", argv=VSE10),
        Config("vse-t2i", "vse, text2img only (text2img_bert.py's direction)", argv=VSE10, direction="text2img"),
        Config("vse-lite2", "vse with EfficientNet-Lite2 256 px", img=l2, argv=[*VSE10, "--direction", "both"]),
        Config("vse-lite2-mpnet", "vse with EfficientNet-Lite2 256 px + all-mpnet-base-v2", img=l2, txt=mp,
               argv=[*VSE10, "--direction", "both"]),
    ]
    return c + feature_grid()


#: Image feature settings of the grid (make_database_img.py --encoder effnet-lite<v> --input-size <px>).
GRID_IMG = {"l0": _img(), "l1": _img(variant=1), "l2": _img(variant=2), "l0x384": _img(input_size=384),
            "l2x384": _img(variant=2, input_size=384)}
#: Caption feature settings of the grid (make_database_text.py --encoder bert --bert-model <m>).
GRID_TXT = {"minilm": _txt(model="minilm"), "mpnet": _txt(model="mpnet")}


def feature_grid() -> list[Config]:
    """The scripts' training defaults on every image x caption feature setting of the grid, in both
    scripts' directions: ``<img>-<txt>`` (img2text_bert.py) and ``<img>-<txt>-t2i`` (text2img_bert.py),
    e.g. ``l2x384-mpnet-t2i``. Ensemble members that differ in what they see."""
    out = []
    for (ik, img), (tk, txt) in itertools.product(GRID_IMG.items(), GRID_TXT.items()):
        for suffix, direction in (("", "img2text"), ("-t2i", "text2img")):
            out.append(Config(f"{ik}-{tk}{suffix}", f"{direction}_bert.py's defaults on {ik} images, {tk} captions",
                              img=img, txt=txt, argv=NEW, direction=direction))
    return out


def check_defaults(cfgs: dict) -> None:
    """The ``defaults`` rows' spelled-out flags must be exactly the training scripts' defaults, and
    their caption features make_database_text.py's default model."""
    from crossmodal.databases import image_parser, text_parser
    from crossmodal.image_encoders import build_image_encoder
    from crossmodal.train import build_parser

    default_model = text_parser().get_default("bert_model")
    encoder = image_parser().get_default("encoder")
    enc = build_image_encoder(encoder, input_size=image_parser().get_default("input_size"), runtime="torch")
    want = {"variant": int(encoder[-1]), "input_size": enc.input_size, "levels": tuple(enc.levels), "pool": enc.pool}
    for name in ("defaults", "defaults-t2i"):
        c, p = cfgs[name], build_parser(cfgs[name].direction, "bert")
        if vars(p.parse_args(["--features-dir", ".", *c.argv])) != vars(p.parse_args(["--features-dir", "."])):
            raise SystemExit(f"bench/flickr8k.py: the {name!r} row's flags {c.argv} are not the scripts' defaults "
                             "any more: update NEW")
        if c.txt.get("model") != default_model:
            raise SystemExit(f"bench/flickr8k.py: the {name!r} row's captions are {c.txt.get('model')!r}, not "
                             f"make_database_text.py's default {default_model!r}: update DEFAULT_TXT")
        if {k: (tuple(v) if k == "levels" else v) for k, v in c.img.items()} != want:
            raise SystemExit(f"bench/flickr8k.py: the {name!r} row's images are {c.img}, not make_database_img.py's "
                             f"default ({encoder} at {enc.input_size} px): update DEFAULT_IMG")


def extra_configs(spec: str) -> list[Config]:
    """Ad-hoc rows from the command line: ``name=flag flag ...;name2=...`` over ``--base`` argv."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, flags = item.split("=", 1)
        out.append(Config(name, flags, argv=flags.split()))
    return out


# ---------------------------------------------------------------- runs


class Data:
    """Train and dev features per setting (whole splits, cached)."""

    def __init__(self, root: Path, cache: Path, models: dict):
        self.train = Features(root, cache, models, split="train")
        self.dev = Features(root, cache, models, split="dev")

    def pairs(self, cfg: Config, n_train: int | None):
        """(train Pairs of the first ``n_train`` images by id, or all; dev Pairs)."""
        from crossmodal.coco import rows_of

        out = []
        for feats, n in ((self.train, n_train), (self.dev, None)):
            img, im = feats.img(cfg.img)
            txt, tm = feats.txt(cfg.txt)
            cap_rows = rows_of(np.asarray(im["ids"]), np.asarray(tm["image_ids"]))
            order = np.argsort(np.asarray(im["ids"]), kind="stable")
            keep = np.sort(order[:n] if n else order)
            out.append(_pairs(img, im, txt, tm, cap_rows, keep))
        assert not set(out[0].img_meta["ids"]) & set(out[1].img_meta["ids"]), "a dev image is in train"
        return out


def train_dev(cfg: Config, data: Data, seed: int, epochs: int, n_train: int | None = None,
              verbose: bool = False) -> dict:
    """One run of ``cfg``: train on train (first ``n_train`` images), validate on dev each epoch."""
    from bench.cv_defaults import _val_ids
    from crossmodal.metrics import evaluate
    from crossmodal.train import Trainer

    train, dev = data.pairs(cfg, n_train)
    args = training_args(cfg, seed, epochs)
    trainer = Trainer(args, train, dev, torch.device("cpu"))
    curve, best, best_emb, t0 = [], None, None, time.perf_counter()
    stale = 0
    for epoch in range(args.epochs):
        trainer.train_epoch(epoch)
        i_emb, t_emb = trainer.embed(dev)
        m = evaluate(i_emb, t_emb, dev.cap_img_rows, ks=(1, 5, 10))
        curve.append(round(m["rsum"], 2))
        if verbose:
            print(f"    epoch {epoch}: dev rsum {m['rsum']:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if best is None or m["rsum"] > best["rsum"]:
            best, stale = {"epoch": epoch, **{k: v for k, v in m.items() if "R@" in k or k == "rsum"}}, 0
            best_emb = (i_emb.numpy(), t_emb.numpy())
        else:
            stale += 1
            if args.patience and stale >= args.patience:
                break
    return {"best": best, "last_rsum": curve[-1], "curve": curve, "emb": best_emb,
            "val_cap_img_rows": dev.cap_img_rows, "val_ids": _val_ids(dev.img_meta, dev.txt_meta),
            "n_train": len(train.img), "train_s": round(time.perf_counter() - t0, 1)}


def run_sig(cfg: Config, seed: int, epochs: int, n_train: int | None) -> list:
    """What one run depends on (its cache key): settings, flags as resolved, seed, training size."""
    return ["flickr8k-dev", cfg.img, cfg.txt, cfg.argv, cfg.direction, cfg.seed_offset, n_train, seed, epochs,
            trained_settings(cfg, epochs)]


def cached_run(cfg: Config, data: Data, seed: int, epochs: int, n_train: int | None, cache: Path) -> dict:
    """:func:`train_dev`, or its saved result (``<cache>/runs/<key>.npz``) when it was run before."""
    if n_train is not None and n_train >= data.train.split.num_images:
        n_train = None  # the whole split: the same run as without --curve
    sig = run_sig(cfg, seed, epochs, n_train)
    got = load_runs(cache, sig)
    if got is None:
        got = [train_dev(cfg, data, seed, epochs, n_train, verbose=True)]
        save_runs(cache, sig, got)
        print(f"  {cfg.name} seed {seed} n={n_train or 'all'}: rsum {got[0]['best']['rsum']:.1f} "
              f"(best epoch {got[0]['best']['epoch']}, {got[0]['train_s']:.0f} s)", flush=True)
    return got[0]


def recall_line(best: dict) -> str:
    g = [best.get(f"{d}_R@{k}", float("nan")) for d in ("img2text", "text2img") for k in (1, 5, 10)]
    return " / ".join(f"{x:.1f}" for x in g[:3]) + " | " + " / ".join(f"{x:.1f}" for x in g[3:])


def plot_curve(summary: dict, names: list[str], sizes: list[int], png: Path) -> Path:
    """Dev rsum (mean over seeds, ± std) against training images, one line per recipe (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for name in names:
        pts = [(n, summary[f"{name}@{n}"]) for n in sizes if f"{name}@{n}" in summary]
        xs = [n for n, _ in pts]
        ys = np.array([s["rsum_mean"] for _, s in pts])
        sd = np.array([s["rsum_std"] for _, s in pts])
        ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("Flickr8k training images (first n by id; 5 captions each)")
    ax.set_ylabel("dev rsum (1,000 images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flickr8k", default=str(SHARED / "flickr8k"), help="the official Flickr8k files")
    p.add_argument("--root", default="/tmp/f8k", help="where the COCO-style root is laid out (outside the repo)")
    p.add_argument("--cache-dir", default="/tmp/f8k-features", help="whole-split features, one file per setting")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30, help="--epochs given to every run (a config's own wins)")
    p.add_argument("--configs", default="defaults,defaults-t2i", help="comma-separated names")
    p.add_argument("--extra", default="", help="ad-hoc rows: 'name=--flag v --flag2 v;name2=...'")
    p.add_argument("--curve", default="", help="training-set sizes (first n train images by id): a learning curve")
    p.add_argument("--base", default="l0-minilm", help="the row every other is paired against (default: the "
                   "features every recipe row but the grid's and defaults' uses, Lite0 256 px + MiniLM)")
    p.add_argument("--figure", default=None, help="with --curve: write the learning curve here (PNG)")
    p.add_argument("--out", default="flickr8k", help="results name in bench/results/")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mpnet", default="mpnet", help="all-mpnet-base-v2 (crossmodal's loader name or a folder)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    root = make_root(Path(a.flickr8k), Path(a.root))
    data = Data(root, Path(a.cache_dir), {"mpnet": a.mpnet})
    all_cfgs = {c.name: c for c in configs() + extra_configs(a.extra)}
    check_defaults(all_cfgs)
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in all_cfgs and not n.startswith("ens:")]
    if unknown:
        raise SystemExit(f"unknown configs: {', '.join(unknown)}; choose from {', '.join(all_cfgs)}")
    for n in names:  # "ens:a+b+c": an ensemble of rows
        if n.startswith("ens:"):
            all_cfgs[n] = Config(n, "ensemble of " + ", ".join(n[4:].split("+")), members=tuple(n[4:].split("+")))
    sizes = [int(x) for x in a.curve.split(",") if x] or [None]
    runs: dict[str, list[dict]] = {}

    def get(name, n=None):
        key = name if n is None else f"{name}@{n}"
        if key not in runs:
            cfg = all_cfgs[name]
            t0 = time.perf_counter()
            if cfg.members:
                member_runs = [get(m, n) for m in cfg.members]
                runs[key] = [ensemble(list(rs), list(cfg.members)) for rs in zip(*member_runs, strict=True)]
            else:
                runs[key] = [cached_run(cfg, data, seed, a.epochs, n, Path(a.cache_dir)) for seed in range(a.seeds)]
            r = runs[key]
            print(f"{key}: rsum {np.mean([x['best']['rsum'] for x in r]):.1f} "
                  f"[{', '.join(format(x['best']['rsum'], '.1f') for x in r)}] best epochs "
                  f"{[x['best']['epoch'] for x in r]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return runs[key]

    summary, raw, detail = {}, {}, {}
    for n in sizes:
        base = get(a.base, n)
        for name in names:
            key = name if n is None else f"{name}@{n}"
            rs = get(name, n)
            summary[key] = summarise(name, rs, base, None, [get(m, n) for m in all_cfgs[name].members])
            summary[key]["recalls"] = [recall_line(r["best"]) for r in rs]
            raw[key] = [{k: v for k, v in r.items() if k not in ("emb", "val_cap_img_rows", "val_ids")} for r in rs]
            detail[key] = dataclasses.asdict(all_cfgs[name])
            save(a.out, merged(a.out, {"folds": "dev", "seeds": a.seeds, "epochs": a.epochs, "configs": detail,
                                      "summary": summary, "runs": raw, "extract_s": {**data.train.seconds,
                                      **{f"dev_{k}": v for k, v in data.dev.seconds.items()}},
                                      "txt_runtimes": data.train.runtimes, "machine": machine(),
                                      "wall_s": round(time.perf_counter() - t_start, 1)}))
    cfgs = {k: dataclasses.replace(all_cfgs[k.split("@")[0]], name=k) for k in summary}
    print(f"\nFlickr8k: trained on train ({'/'.join(str(s or 6000) for s in sizes)} images), best-epoch dev rsum "
          f"(1,000 images, 5,000 captions) over {a.seeds} seeds:\n")
    print(table(cfgs, summary))
    print("\nper run, i2t R@1/5/10 | t2i R@1/5/10:")
    for k, s in summary.items():
        print(f"- {k}: " + "; ".join(s["recalls"]))
    if a.figure and sizes != [None]:
        print(f"figure: {plot_curve(summary, names, sizes, Path(a.figure))}")
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


_ = _ARRAYS  # the cached runs' arrays (bench.cv_defaults.save_runs) hold the dev embeddings

if __name__ == "__main__":
    main()

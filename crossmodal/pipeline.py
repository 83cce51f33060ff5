"""The main job: every stage, each through its own script's entry point, then one summary table.

    python -m crossmodal.pipeline --demo          # make demo: the embedded dataset, offline encoders
    python -m crossmodal.pipeline --coco-root ../shared/data/coco-mini \\
        --train-split 'train2017[:100]' --val-split 'train2017[100:]' --out coco-mini
    python -m crossmodal.pipeline --dataset flickr8k --coco-root PATH/TO/Flickr8k \\
        --train-split train --val-split dev --out flickr8k

Stages: demo data -> image features -> fastText and BERT caption features -> the four
training scripts -> embeddings + Faiss indexes -> both metric scripts -> figures. Each stage
is called through the package function its top-level script calls (:data:`STAGES`), with the
argv a user would type, so the pipeline runs exactly what the scripts run, from any working
directory (relative paths, like ``--out`` and ``data/demo``, are relative to it). Each stage
skips itself when its outputs exist and match its inputs, so a rerun (or a rerun after an
interruption) redoes only what is missing; ``--force`` redoes everything. The summary
(``runs/<out>/summary.{json,txt}``) is written last, each file whole.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import time
from pathlib import Path

import numpy as np

from . import databases, embed, retrieve, train
from .cli import (
    add_dataset_arg,
    existing_dir,
    existing_file,
    int_in_range,
    positive_int,
    run_name,
    setup_logging,
    split_name,
)

log = logging.getLogger("crossmodal.pipeline")

MODELS = (  # script, direction, text encoder
    ("img2text.py", "img2text", "fasttext"),
    ("text2img.py", "text2img", "fasttext"),
    ("img2text_bert.py", "img2text", "bert"),
    ("text2img_bert.py", "text2img", "bert"),
)
SUMMARY_KEYS = ("P@1", "P@5", "mAP", "R@1", "R@5", "R@10")
# script -> the package function its main(argv) calls (tests check that each script calls exactly this)
STAGES = {
    "make_database_img.py": databases.run_image,
    "make_database_text.py": databases.run_text,
    **{script: functools.partial(train.run, direction=d, text_encoder=e) for script, d, e in MODELS},
    "get_features_captions.py": embed.run,
    "retrieve_img2text.py": functools.partial(retrieve.run_metrics, direction="img2text"),
    "retrieve_text2img.py": functools.partial(retrieve.run_metrics, direction="text2img"),
    "main_retrieve.py": retrieve.run_figures,
}


#: Where the pipeline's defaults deliberately differ from its stages' (every other default is the
#: stage parser's own, read from it): flag -> (pipeline default, why).
PIPELINE_DEFAULTS = {
    "fasttext_bucket": (20_000, "a smaller subword table: the pipeline's datasets (demo, coco-mini) have few words"),
    "fasttext_epoch": (20, "more passes over the pipeline's small caption corpora"),
}


def stage_defaults() -> dict:
    """The defaults of the flags the pipeline passes on, read from the stage parsers that own them."""
    img, text = databases.image_parser(), databases.text_parser()
    tr = train.build_parser("img2text", "fasttext")
    return {"train_split": tr.get_default("train_split"), "val_split": tr.get_default("val_split"),
            "epochs": tr.get_default("epochs"), "image_encoder": img.get_default("encoder"),
            "bert_epochs": train.build_parser("img2text", "bert").get_default("epochs"),
            **{k: text.get_default(k) for k in ("bert_model", "fasttext_dim", "fasttext_bucket", "fasttext_epoch")}}


def parser() -> argparse.ArgumentParser:
    d = stage_defaults()

    def own(flag: str, stage: str) -> dict:  # a default the pipeline sets itself, and its help saying so
        value, why = PIPELINE_DEFAULTS[flag]
        return {"default": value, "help": f"default {value}, not {stage}'s {d[flag]}: {why}"}

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Defaults are the stage scripts' own, except where a flag's help says why not.")
    p.add_argument("--demo", action="store_true", help="generate and use the embedded demo dataset")
    p.add_argument("--coco-root", default=None, type=existing_dir,
                   help="the dataset folder: COCO, or Flickr8k / Flickr30k as downloaded (docs/datasets.md)")
    add_dataset_arg(p)
    p.add_argument("--karpathy-file", default=None, type=existing_file)
    p.add_argument("--train-split", default=d["train_split"], type=split_name,
                   help="default %(default)s (Flickr8k: train)")
    p.add_argument("--val-split", default=d["val_split"], type=split_name,
                   help="default %(default)s (on Flickr8k's official files, which have no val: dev)")
    p.add_argument("--out", default="demo", type=run_name, help="results go to features/<out>/ and runs/<out>/")
    p.add_argument("--image-encoder", default=d["image_encoder"], choices=["effnet-lite0", "fasterrcnn"])
    p.add_argument("--input-size", type=int_in_range(32, 2048), default=None,
                   help="effnet-lite0 input side (default: make_database_img.py's)")
    p.add_argument("--bert-model", default=d["bert_model"])
    p.add_argument("--fasttext-dim", type=int_in_range(1, 2048), default=d["fasttext_dim"])
    p.add_argument("--fasttext-bucket", type=int_in_range(1, 100_000_000),
                   **own("fasttext_bucket", "make_database_text.py"))
    p.add_argument("--fasttext-epoch", type=int_in_range(1, 1000), **own("fasttext_epoch", "make_database_text.py"))
    p.add_argument("--epochs", type=positive_int, default=d["epochs"],
                   help="training epochs of each of the four models (default %(default)s, the fastText scripts' own; "
                        f"the BERT scripts' own, {d['bert_epochs']}, was chosen on Flickr8k's 6,000 images and "
                        "undertrains a few hundred, such as the demo's)")
    p.add_argument("--demo-train", type=int_in_range(2, 1_000_000), default=400, help="demo images in train")
    p.add_argument("--demo-val", type=int_in_range(2, 1_000_000), default=100, help="demo images in val")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _stage(script: str, argv: list[str]):
    """Run one stage as ``python SCRIPT ARGV`` would (its entry point, in this process)."""
    log.info("$ python %s %s", script, " ".join(shlex.quote(a) for a in argv))
    t0 = time.perf_counter()
    out = STAGES[script](argv)
    log.info("  %s done in %.1f s", script, time.perf_counter() - t0)
    return out


def chance_level(cap_img_rows: np.ndarray, n_img: int, dim: int = 128, draws: int = 5) -> dict:
    """Metrics of random embeddings (mean of ``draws``): what "no better than chance" means here."""
    from .metrics import evaluate

    runs = []
    for s in range(draws):
        rng = np.random.default_rng(1000 + s)
        runs.append(evaluate(rng.standard_normal((n_img, dim)).astype(np.float32),
                             rng.standard_normal((len(cap_img_rows), dim)).astype(np.float32), cap_img_rows))
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def summary_table(rows: dict[str, dict]) -> str:
    cols = [(d, k) for d in ("img2text", "text2img") for k in SUMMARY_KEYS]
    width = max(len(r) for r in rows) + 2
    head1 = " " * width + "".join(f"{d:<{7 * len(SUMMARY_KEYS)}}" for d in ("img2text (image -> captions)",
                                                                              "text2img (caption -> images)"))
    head2 = " " * width + "".join(f"{k:>7}" for _, k in cols)
    lines = [head1, head2, "-" * len(head2)]
    for label, m in rows.items():
        cells = "".join(f"{m[f'{d}_{k}']:7.1f}" if "R@" in k else f"{m[f'{d}_{k}']:7.3f}" for d, k in cols)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def run(argv=None) -> dict:
    from .outputs import locked

    a = parser().parse_args(argv)
    setup_logging(a.verbose)
    runs = Path("runs") / a.out
    with locked(runs / "pipeline", what=f"pipeline {runs}"):  # one pipeline per --out at a time
        return _run(a, runs)


def _run(a, runs: Path) -> dict:
    t_start = time.perf_counter()
    if a.demo:
        from .demo_data import generate_demo_dataset

        root = Path("data/demo")
        meta = generate_demo_dataset(root, num_train=a.demo_train, num_val=a.demo_val)
        log.info("demo dataset: %s at %s (%.1f MB)", meta["splits"], root, meta["bytes"] / 1e6)
        a.coco_root, a.train_split, a.val_split, a.dataset = str(root), "train", "val", "coco"
    if not a.coco_root:
        from .errors import DataError

        raise DataError("give --demo or --coco-root")
    if a.val_split == "val" and not a.karpathy_file:  # Flickr8k's official lists have no val: its held-out one is dev
        from .flickr import KARPATHY_FILES, resolve_dataset

        root = Path(a.coco_root)
        official = not (root / KARPATHY_FILES["flickr8k"]).is_file()
        if official and resolve_dataset(root, a.dataset, None, None) == "flickr8k":
            log.info("Flickr8k's official splits are train/dev/test: validating on dev")
            a.val_split = "dev"
    feats = Path("features") / a.out
    data = ["--coco-root", a.coco_root, "--dataset", a.dataset] + (
        ["--karpathy-file", a.karpathy_file] if a.karpathy_file else [])
    common = (["--force"] if a.force else []) + (["--no-progress"] if a.quiet else []) + (
        ["--skip-bad"] if a.skip_bad else [])
    for split in (a.train_split, a.val_split):
        _stage("make_database_img.py",
               [*data, "--split", split, "--features-dir", str(feats), "--encoder", a.image_encoder, *common,
                *(["--input-size", str(a.input_size)] if a.input_size else [])])
    for split in (a.train_split, a.val_split):
        _stage("make_database_text.py",
               [*data, "--split", split, "--features-dir", str(feats), "--encoder", "fasttext",
                "--fasttext-train-split", a.train_split, "--fasttext-dim", str(a.fasttext_dim),
                "--fasttext-bucket", str(a.fasttext_bucket), "--fasttext-epoch", str(a.fasttext_epoch), *common])
        _stage("make_database_text.py",
               [*data, "--split", split, "--features-dir", str(feats), "--encoder", "bert",
                "--bert-model", a.bert_model, *common])
    results, figures = {}, {}
    force = ["--force"] if a.force else []
    for script, direction, enc in MODELS:
        name = f"{direction}_{enc}"
        _stage(script, ["--features-dir", str(feats), "--runs-dir", str(runs), "--train-split", a.train_split,
                        "--val-split", a.val_split, "--image-encoder", a.image_encoder, "--epochs", str(a.epochs),
                        "--no-progress", *force])
        run_dir = str(runs / name)
        _stage("get_features_captions.py", ["--run", run_dir, "--split", a.val_split, *force])
        m = {}
        for s in ("retrieve_img2text.py", "retrieve_text2img.py"):
            m.update(_stage(s, ["--run", run_dir, "--split", a.val_split, *force]))
        results[name] = m
        figures[name] = _stage("main_retrieve.py", [
            *data, "--run", run_dir, "--split", a.val_split, "--random", "2",
            *(["--query-text", "a small red circle to the left of a blue square"] if a.demo else [])])
    return _summary(a, runs, results, figures, time.perf_counter() - t_start)


def _summary(a, runs: Path, results: dict, figures: dict, wall: float) -> dict:
    """The table of every model against chance; ``summary.txt`` and ``summary.json``, each written whole."""
    from .outputs import tmp_path, write_bytes, write_json
    from .runs import Run

    img, txt, rows, _, _ = Run(runs / f"{MODELS[0][1]}_{MODELS[0][2]}").embeddings(a.val_split)
    chance = chance_level(rows, len(img))
    table_rows = {**{f"{n} ({'fastText' if 'fasttext' in n else 'BERT'})": m for n, m in results.items()},
                  "chance (random vectors)": chance}
    table = summary_table(table_rows)
    header = (f"Results on {a.val_split} ({len(img)} images, {len(txt)} captions), models trained on "
              f"{a.train_split}; image encoder {a.image_encoder}")
    summary = {"header": header, "table": table, "wall_s": round(wall, 1), "results": results, "chance": chance,
               "figures": {k: [str(p) for p in v] for k, v in figures.items()}}
    text_file = runs / "summary.txt"
    write_bytes(tmp_path(text_file), f"{header}\n{table}\n".encode())
    os.replace(tmp_path(text_file), text_file)
    write_json(runs / "summary.json", summary)
    print()
    print(header)
    print(table)
    print(f"\nFigures: {runs}/<model>/figures/ (training curves, PR curves, query figures); "
          f"summary: {runs}/summary.txt. Wall time {wall:.0f} s.")
    return summary


def main(argv=None):
    from .cli import run_script

    run_script(lambda: run(argv))


if __name__ == "__main__":
    main()

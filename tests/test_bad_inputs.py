"""Every user error is one line: each script on a table of bad inputs.

A small world (demo data, image and fastText features, one tiny training run, its embeddings
and metrics, and a few broken copies of them) is built once. Each case then runs one script
with one bad input and must end with exit code 2 and one line that names the value or file at
fault (argparse's ``error: argument --flag: ...`` or the project's error), no traceback, and
no finished file of the world changed (sha256 of every file before and after).

Cases run in-process through the scripts' real entry point (``run_script(main)``: logging,
threads, error mapping), which keeps the table fast; the ids in ``SUBPROCESS`` also run as
real processes (``python script.py ...``). ``CROSSMODAL_BAD_INPUTS_SUBPROCESS=1`` runs the
whole table as processes.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from crossmodal.cli import available_cores, os_error_line, run_script, set_threads
from crossmodal.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
ALL_SUBPROCESS = os.environ.get("CROSSMODAL_BAD_INPUTS_SUBPROCESS", "") not in ("", "0")
LEAD = "lead: outputs refactor"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
IMG = "train_img_effnet-lite0"  # a feature file of the world, without suffix


# --- the world ------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` pixels (the data is a few bytes): PIL
    checks the size against its limit when it opens the file, before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _write_coco(root: Path, split: str, images: list[dict], captions: list[dict]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps({"images": images, "annotations": captions}))


def _with_nan(npy: Path) -> None:
    """Row 3 of a feature file set to NaN, published as a consistent file (sidecar digests match)."""
    from crossmodal.store import save_features

    arr = np.array(np.load(npy))
    arr[3] = np.nan
    save_features(npy, arr, json.loads(npy.with_suffix(".json").read_text()))


def _edit_sidecar(npy: Path, fn) -> None:
    side = npy.with_suffix(".json")
    meta = json.loads(side.read_text())
    fn(meta)
    side.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Paths of the world; every file under ``w['top']`` is digested around each case."""
    import torch

    import get_features_captions
    import img2text
    import make_database_img
    import make_database_text
    import retrieve_img2text
    from crossmodal.demo_data import generate_demo_dataset

    top = tmp_path_factory.mktemp("world")
    root, feats, runs = top / "demo", top / "features", top / "runs"
    generate_demo_dataset(root, num_train=24, num_val=12, seed=0, image_size=96)
    common = ["--coco-root", str(root), "--features-dir", str(feats), "--no-progress"]
    for split in ("train", "val"):
        make_database_img.main([*common, "--split", split, "--input-size", "96", "--workers", "0"])
        make_database_text.main([*common, "--split", split, "--encoder", "fasttext", "--fasttext-train-split",
                                 "train", "--fasttext-dim", "16", "--fasttext-bucket", "2000"])
    img2text.main(["--features-dir", str(feats), "--runs-dir", str(runs), "--epochs", "2", "--hidden", "32",
                   "--batch-size", "32", "--no-progress"])
    run = runs / "img2text_fasttext"
    get_features_captions.main(["--run", str(run), "--split", "val"])
    retrieve_img2text.main(["--run", str(run), "--split", "val"])
    w = {"top": top, "root": root, "feats": feats, "run": run, "missing": top / "no_such_thing"}

    # broken copies of the features
    for name, edit in (
        ("feats_nan", _with_nan),
        ("feats_noids", lambda p: _edit_sidecar(p, lambda m: m.pop("ids"))),
        ("feats_zero", lambda p: p.write_bytes(b"")),
        ("feats_badjson", lambda p: p.with_suffix(".json").write_text("{not json")),
    ):
        d = top / name
        shutil.copytree(feats, d)
        edit(d / f"{IMG}.npy")
        w[name] = d
    # a checkpoint without its run arguments; embeddings whose sidecar lost its ids
    w["run_noargs"] = top / "runs_noargs" / "img2text_fasttext"
    shutil.copytree(run, w["run_noargs"])
    ck = torch.load(run / "best.pt", weights_only=True)
    del ck["args"]
    torch.save(ck, w["run_noargs"] / "best.pt")
    w["run_copy"] = top / "runs_copy" / "img2text_fasttext"  # for cases that may write into a run
    shutil.copytree(run, w["run_copy"])
    w["run_embnoids"] = top / "runs_embnoids" / "img2text_fasttext"
    shutil.copytree(run, w["run_embnoids"])
    _edit_sidecar(w["run_embnoids"] / "embeddings" / "val_emb_img.npy", lambda m: m.pop("ids"))

    # broken COCO folders
    bad = top / "bad_coco"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "captions_notjson.json").write_text("{not json")
    _write_coco(bad, "strid", [{"id": "abc", "file_name": "a.png"}],
                [{"id": 1, "image_id": "abc", "caption": "a red circle"}])
    _write_coco(bad, "floatid", [{"id": 1.5, "file_name": "a.png"}],
                [{"id": 1, "image_id": 1.5, "caption": "a red circle"}])
    good = sorted((root / "val").iterdir())[0]
    _write_coco(bad, "bomb", [{"id": 1, "file_name": "huge.png"}, {"id": 2, "file_name": "big.png"},
                              {"id": 3, "file_name": good.name}],
                [{"id": 10 + i, "image_id": i, "caption": "a red circle"} for i in (1, 2, 3)])
    _png_header_only(bad / "bomb" / "huge.png", 20_000, 20_000)  # > 2x the limit: PIL refuses it
    _png_header_only(bad / "bomb" / "big.png", 10_000, 10_000)  # > the limit: PIL only warns
    shutil.copy(good, bad / "bomb" / good.name)
    w["bad_coco"] = bad
    w["karpathy_notjson"] = top / "karpathy_notjson.json"
    w["karpathy_notjson"].write_text("[1, 2")
    w["karpathy_strid"] = top / "karpathy_strid.json"
    w["karpathy_strid"].write_text(json.dumps({"images": [{"split": "train", "cocoid": "x7", "filepath": "val",
                                                           "filename": "a.png", "sentences": [{"sentid": 1,
                                                                                               "raw": "a cat"}]}]}))
    _write_coco(bad, "orphan", [{"id": 1, "file_name": "a.png"}],
                [{"id": 1, "image_id": 1, "caption": "a cat"}, {"id": 2, "image_id": 99, "caption": "a dog"}])
    # a COCO folder whose val split holds other images than the embeddings
    other = top / "other_coco"
    ann = json.loads((root / "annotations" / "captions_val.json").read_text())
    for im in ann["images"]:
        im["id"] += 1_000_000
    for a in ann["annotations"]:
        a["image_id"] += 1_000_000
    _write_coco(other, "val", ann["images"], ann["annotations"])
    w["other_coco"] = other
    (top / "empty_coco" / "annotations").mkdir(parents=True)
    w["empty_coco"] = top / "empty_coco"
    w["notbin"] = top / "model.bin"
    w["notbin"].write_text("not a fastText model\n")
    return w


def _finished(path: Path) -> bool:
    """Finished outputs; partial files of an interrupted job (kept for resuming) are not."""
    return not any(s in path.name for s in (".partial.", ".progress.", ".tmp", ".lock"))


def digests(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(top.rglob("*")) if p.is_file() and _finished(p)}


# --- the table -------------------------------------------------------------------------------

D = ["--no-progress"]  # extraction stages
IMGS = ["make_database_img.py", "--coco-root", "{root}", "--features-dir", "{feats}", *D]
TEXTS = ["make_database_text.py", "--coco-root", "{root}", "--features-dir", "{feats}", *D]
TRAIN = ["img2text.py", "--features-dir", "{feats}", "--runs-dir", "{top}/runs", "--no-progress"]
EMBED = ["get_features_captions.py", "--run", "{run}"]
METRICS = ["retrieve_img2text.py", "--run", "{run}"]
FIGS = ["main_retrieve.py", "--run", "{run}", "--coco-root", "{root}", "--split", "val"]


def case(cid, argv, *expect, marks=(), env=None):
    """``argv``: script and its arguments ({root}, {feats}... from the world); ``expect``: strings
    that the one error line must contain."""
    return pytest.param(argv, expect, env or {}, id=cid, marks=marks)


CASES = [
    # make_database_img.py: data flags
    case("img-coco-root-missing", [*IMGS[:1], "--coco-root", "{missing}", "--split", "train"],
         "--coco-root", "no_such_thing", "no such folder"),
    case("img-coco-root-is-file", [*IMGS[:1], "--coco-root", "{notbin}", "--split", "train"],
         "--coco-root", "model.bin", "not a folder"),
    case("img-split-unknown", [*IMGS, "--split", "nosuch"], "'nosuch'", "captions_nosuch.json"),
    case("img-split-bad-slice", [*IMGS, "--split", "train[a:b]"], "--split", "train[a:b]"),
    case("img-split-empty-slice", [*IMGS, "--split", "train[5:5]"], "train[5:5]", "no images"),
    case("img-annotations-missing", [*IMGS[:1], "--coco-root", "{empty_coco}", "--split", "train"],
         "captions_train.json", "does not exist"),
    case("img-annotations-not-json", [*IMGS[:1], "--coco-root", "{bad_coco}", "--split", "notjson"],
         "captions_notjson.json", "not valid COCO json"),
    case("img-image-id-not-integer", [*IMGS[:1], "--coco-root", "{bad_coco}", "--split", "strid"],
         "captions_strid.json", "'abc'", "not an integer id"),
    case("img-image-id-float", [*IMGS[:1], "--coco-root", "{bad_coco}", "--split", "floatid"],
         "captions_floatid.json", "1.5"),
    case("img-karpathy-file-missing", [*IMGS, "--split", "train", "--karpathy-file", "{missing}.json"],
         "--karpathy-file", "no_such_thing.json"),
    case("img-image-over-pixel-limit", [*IMGS[:1], "--coco-root", "{bad_coco}", "--split", "bomb",
                                        "--features-dir", "{top}/features"], "huge.png", "too large"),
    # make_database_img.py: value flags
    case("img-batch-size-0", [*IMGS, "--split", "train", "--batch-size", "0"], "--batch-size", "'0'"),
    case("img-batch-size-text", [*IMGS, "--split", "train", "--batch-size", "four"], "--batch-size", "'four'"),
    case("img-workers-negative", [*IMGS, "--split", "train", "--workers", "-1"], "--workers", "'-1'"),
    case("img-input-size-8", [*IMGS, "--split", "train", "--input-size", "8"], "--input-size", "'8'"),
    case("img-input-size-huge", [*IMGS, "--split", "train", "--input-size", "100000"], "--input-size", "100000"),
    case("img-top-n-0", [*IMGS, "--split", "train", "--top-n", "0"], "--top-n", "'0'"),
    case("img-min-size-0", [*IMGS, "--split", "train", "--min-size", "0"], "--min-size", "'0'"),
    case("img-seed-negative", [*IMGS, "--split", "train", "--seed", "-1"], "--seed", "'-1'"),
    case("img-shard-ge-num-shards", [*IMGS, "--split", "train", "--shard", "2", "--num-shards", "2"],
         "--shard", "2", "--num-shards 2"),
    case("img-shard-without-num-shards", [*IMGS, "--split", "train", "--shard", "1"], "--shard", "1"),
    case("img-shard-negative", [*IMGS, "--split", "train", "--shard", "-1", "--num-shards", "2"],
         "--shard", "'-1'"),
    case("img-num-shards-0", [*IMGS, "--split", "train", "--num-shards", "0"], "--num-shards", "'0'"),
    case("img-features-dir-is-a-file", [*IMGS, "--split", "train", "--features-dir", "{notbin}"], "model.bin"),
    case("img-device-bad", [*IMGS, "--split", "train", "--device", "tpu"], "--device", "'tpu'"),
    case("img-encoder-unknown", [*IMGS, "--split", "train", "--encoder", "vit"], "--encoder", "'vit'"),
    # make_database_text.py
    case("text-fasttext-dim-0", [*TEXTS, "--split", "train", "--fasttext-dim", "0"], "--fasttext-dim", "'0'"),
    case("text-fasttext-bucket-0", [*TEXTS, "--split", "train", "--fasttext-bucket", "0"],
         "--fasttext-bucket", "'0'"),
    case("text-fasttext-epoch-0", [*TEXTS, "--split", "train", "--fasttext-epoch", "0"], "--fasttext-epoch", "'0'"),
    case("text-fasttext-model-missing", [*TEXTS, "--split", "train", "--fasttext-model", "{missing}.bin"],
         "--fasttext-model", "no_such_thing.bin", "no such file"),
    case("text-fasttext-model-not-bin", [*TEXTS, "--split", "train", "--fasttext-model", "{notbin}",
                                         "--features-dir", "{top}/features_text"], "model.bin", "fastText"),
    case("text-fasttext-train-split-bad-slice", [*TEXTS, "--split", "val", "--fasttext-train-split", "train[:x]"],
         "--fasttext-train-split", "train[:x]"),
    case("text-fasttext-held-out-split-trains-itself", [*TEXTS, "--split", "val"], "--split val", "held-out",
         "--fasttext-train-split"),
    case("text-fasttext-train-split-unknown", [*TEXTS, "--split", "val", "--fasttext-train-split", "nosuch"],
         "captions_nosuch.json"),
    case("text-bert-model-missing-offline", [*TEXTS, "--split", "train", "--encoder", "bert", "--bert-model",
                                             "{missing}"], "no_such_thing", "--bert-model", env=OFFLINE_ENV),
    case("text-max-length-0", [*TEXTS, "--split", "train", "--encoder", "bert", "--max-length", "0"],
         "--max-length", "'0'"),
    case("text-batch-size-negative", [*TEXTS, "--split", "train", "--batch-size", "-5"], "--batch-size", "'-5'"),
    # training (img2text.py)
    case("train-epochs-0", [*TRAIN, "--epochs", "0"], "--epochs", "'0'"),
    case("train-hidden-0", [*TRAIN, "--hidden", "0"], "--hidden", "'0'"),
    case("train-out-dim-0", [*TRAIN, "--out-dim", "0"], "--out-dim", "'0'"),
    case("train-lr-0", [*TRAIN, "--lr", "0"], "--lr", "'0'"),
    case("train-lr-negative", [*TRAIN, "--lr", "-0.1"], "--lr", "'-0.1'"),
    case("train-lr-nan", [*TRAIN, "--lr", "nan"], "--lr", "'nan'"),
    case("train-dropout-1.5", [*TRAIN, "--dropout", "1.5"], "--dropout", "'1.5'"),
    case("train-margin-negative", [*TRAIN, "--margin", "-1"], "--margin", "'-1'"),
    case("train-patience-negative", [*TRAIN, "--patience", "-1"], "--patience", "'-1'"),
    case("train-weight-decay-negative", [*TRAIN, "--weight-decay", "-1"], "--weight-decay", "'-1'"),
    case("train-batch-size-0", [*TRAIN, "--batch-size", "0"], "--batch-size", "'0'"),
    case("train-features-dir-missing", [*TRAIN, "--features-dir", "{missing}"], "--features-dir", "no_such_thing"),
    case("train-split-unknown", [*TRAIN, "--train-split", "nosuch"], "nosuch_img_effnet-lite0.npy",
         "does not exist"),
    case("train-same-train-and-val", [*TRAIN, "--train-split", "val"], "'val'", "held-out"),
    case("train-features-nan", [*TRAIN, "--features-dir", "{feats_nan}"], f"{IMG}.npy", "NaN"),
    case("train-sidecar-without-ids", [*TRAIN, "--features-dir", "{feats_noids}"], IMG, "ids"),
    case("train-sidecar-not-json", [*TRAIN, "--features-dir", "{feats_badjson}"], f"{IMG}.json", "not valid json"),
    case("train-features-zero-bytes", [*TRAIN, "--features-dir", "{feats_zero}"], f"{IMG}.npy"),
    # get_features_captions.py
    case("embed-run-missing", [*EMBED[:1], "--run", "{missing}"], "--run", "no_such_thing", "no such folder"),
    case("embed-checkpoint-missing", [*EMBED, "--checkpoint", "nosuch.pt"], "nosuch.pt", "does not exist"),
    case("embed-checkpoint-without-args", [*EMBED[:1], "--run", "{run_noargs}"], "best.pt", "args"),
    case("embed-split-without-features", [*EMBED, "--split", "nosuch"], "nosuch_img_effnet-lite0.npy"),
    case("embed-nprobe-0", [*EMBED, "--nprobe", "0"], "--nprobe", "'0'"),
    case("embed-nlist-0", [*EMBED, "--nlist", "0"], "--nlist", "'0'"),
    case("embed-hnsw-m-0", [*EMBED, "--hnsw-m", "0"], "--hnsw-m", "'0'"),
    case("embed-ef-search-0", [*EMBED, "--ef-search", "0"], "--ef-search", "'0'"),
    case("embed-nlist-over-gallery", [*EMBED[:1], "--run", "{run_copy}", "--index", "ivf", "--nlist", "100000"],
         "100000", "nlist"),
    case("embed-nlist-over-gallery-force", [*EMBED[:1], "--run", "{run_copy}", "--index", "ivf", "--nlist", "100000",
                                            "--force"], "--nlist", "100000"),
    case("embed-features-dir-missing", [*EMBED, "--features-dir", "{missing}"], "--features-dir", "no_such_thing"),
    # retrieve_img2text.py / retrieve_text2img.py
    case("metrics-k-0", [*METRICS, "--k", "0"], "--k", "'0'"),
    case("metrics-k-huge", [*METRICS, "--k", "5000"], "--k", "'5000'"),
    case("metrics-chunk-0", [*METRICS, "--chunk", "0"], "--chunk", "'0'"),
    case("metrics-protocol-5k-small-split", [*METRICS, "--protocol", "5k"], "'val'", "5k"),
    case("metrics-protocol-1k-small-split", ["retrieve_text2img.py", "--run", "{run}", "--protocol", "1k"],
         "'val'", "1k"),
    case("metrics-protocol-unknown", [*METRICS, "--protocol", "10k"], "--protocol", "'10k'"),
    case("metrics-split-without-embeddings", [*METRICS, "--split", "nosuch"], "nosuch_emb_img.npy",
         "does not exist"),
    case("metrics-run-missing", [*METRICS[:1], "--run", "{missing}"], "--run", "no_such_thing"),
    case("metrics-embeddings-without-ids", [*METRICS[:1], "--run", "{run_embnoids}"], "val_emb_img", "ids"),
    # main_retrieve.py
    case("figs-wrong-coco-root", [*FIGS[:3], "--coco-root", "{other_coco}", "--split", "val", "--random", "1"],
         "captions_val.json", "--coco-root"),
    case("figs-query-text-empty", [*FIGS, "--query-text", ""], "--query-text", "blank"),
    case("figs-query-text-blank", [*FIGS, "--query-text", "   "], "--query-text", "blank"),
    case("figs-query-text-too-long", [*FIGS, "--query-text", "word " * 300], "--query-text", "1500 characters"),
    case("figs-query-id-unknown", [*FIGS, "--direction", "img2text", "--query-id", "999999999"],
         "--query-id 999999999"),
    case("figs-query-id-not-int", [*FIGS, "--query-id", "x1"], "--query-id", "'x1'"),
    case("figs-random-negative", [*FIGS, "--random", "-1"], "--random", "'-1'"),
    case("figs-k-0", [*FIGS, "--random", "1", "--k", "0"], "--k", "'0'"),
    case("figs-k-101", [*FIGS, "--random", "1", "--k", "101"], "--k", "'101'"),
    case("figs-no-query", FIGS, "no query given"),
    case("figs-karpathy-file-missing", [*FIGS, "--random", "1", "--karpathy-file", "{missing}"],
         "--karpathy-file", "no_such_thing"),
    case("figs-coco-root-missing", [*FIGS[:3], "--coco-root", "{missing}", "--random", "1"],
         "--coco-root", "no_such_thing"),
    # coco_triplet_dataset.py
    case("dataset-coco-root-missing", ["coco_triplet_dataset.py", "--coco-root", "{missing}", "--split", "train"],
         "--coco-root", "no_such_thing"),
    case("dataset-image-over-pixel-limit", ["coco_triplet_dataset.py", "--coco-root", "{bad_coco}", "--split",
                                            "bomb", "--check-images"], "huge.png", "too large"),
    case("dataset-karpathy-not-json", ["coco_triplet_dataset.py", "--coco-root", "{root}", "--split", "train",
                                       "--karpathy-file", "{karpathy_notjson}"], "karpathy_notjson.json", "json"),
    case("dataset-karpathy-id-not-integer", ["coco_triplet_dataset.py", "--coco-root", "{root}", "--split", "train",
                                             "--karpathy-file", "{karpathy_strid}"], "karpathy_strid.json", "'x7'"),
    case("dataset-karpathy-split-unknown", ["coco_triplet_dataset.py", "--coco-root", "{root}", "--split", "val2014",
                                            "--karpathy-file", "{karpathy_strid}"], "'val2014'", "karpathy_strid.json"),
    case("dataset-caption-of-unknown-image", ["coco_triplet_dataset.py", "--coco-root", "{bad_coco}", "--split",
                                              "orphan"], "image 99", "captions_orphan.json"),
    # the pipeline
    case("pipeline-epochs-0", ["crossmodal.pipeline", "--demo", "--epochs", "0"], "--epochs", "'0'"),
    case("pipeline-demo-train-0", ["crossmodal.pipeline", "--demo", "--demo-train", "0"], "--demo-train", "'0'"),
    case("pipeline-no-data", ["crossmodal.pipeline"], "--demo", "--coco-root"),
]

# real processes for a representative subset (one or more per script and per kind of failure)
SUBPROCESS = {
    "img-batch-size-0", "img-image-id-not-integer", "img-image-over-pixel-limit", "text-fasttext-dim-0",
    "train-epochs-0", "train-features-nan", "embed-checkpoint-without-args", "metrics-k-0",
    "metrics-protocol-5k-small-split", "figs-wrong-coco-root", "figs-query-text-blank", "dataset-coco-root-missing",
    "pipeline-epochs-0",
}


def _fill(argv: list[str], w: dict) -> list[str]:
    return [a.format(**w) if "{" in a else a for a in argv]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _in_process(argv, env, cwd, monkeypatch, capsys, caplog) -> tuple[int, str, str]:
    """Run ``script.main(args)`` through ``run_script``, as ``python script.py args`` does."""
    script, args = argv[0], argv[1:]
    if script == "crossmodal.pipeline":
        main = importlib.import_module("crossmodal.pipeline").run
    else:
        main = importlib.import_module(script.removesuffix(".py")).main
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.chdir(cwd)  # relative default paths (features/, runs/, data/demo) land in the world, not the repo
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        run_script(lambda: main(args))
    err = capsys.readouterr().err
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) <= 1, [r.getMessage() for r in errors]
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.INFO)
    line = errors[0].getMessage() if errors else _last_line(err)
    return exit_info.value.code, line, err


def _subprocess(argv, env, cwd) -> tuple[int, str, str]:
    script, args = argv[0], argv[1:]
    cmd = [sys.executable, "-m", script] if script == "crossmodal.pipeline" else [sys.executable, str(ROOT / script)]
    p = subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    return p.returncode, _last_line(p.stderr), p.stderr


def _check(world, argv, expect, env, runner):
    before = digests(world["top"])
    cwd = world["top"] / "cwd"
    cwd.mkdir(exist_ok=True)
    code, line, err = runner(_fill(argv, world), env, cwd)
    assert "Traceback" not in err, err[-3000:]
    assert code == 2, (code, err[-3000:])
    for s in expect:
        assert s.format(**world) in line, (s, line)
    after = digests(world["top"])
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"finished files changed or appeared: {changed}"


@pytest.mark.parametrize("argv, expect, env", CASES)
def test_bad_input_is_one_line(world, argv, expect, env, monkeypatch, capsys, caplog, request):
    if ALL_SUBPROCESS:
        _check(world, argv, expect, env, _subprocess)
    else:
        _check(world, argv, expect, env, lambda a, e, cwd: _in_process(a, e, cwd, monkeypatch, capsys, caplog))


@pytest.mark.slow
@pytest.mark.parametrize("argv, expect, env", [c for c in CASES if c.id in SUBPROCESS])
def test_bad_input_is_one_line_as_a_process(world, argv, expect, env):
    _check(world, argv, expect, env, _subprocess)


def test_table_is_large_enough():
    """The table covers every entry point of the project (each top-level script and the pipeline)
    with several cases, ids are unique, every case names what its line must contain, and every
    id run as a process is a case of the table."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40 and set(ids) >= SUBPROCESS
    assert all(c.values[1] and all(isinstance(x, str) and x for x in c.values[1]) for c in CASES)
    scripts = {p.name for p in ROOT.glob("*.py")}
    per_script = {}
    for c in CASES:
        per_script.setdefault(c.values[0][0], []).append(c.id)
    assert scripts - {"text2img.py", "img2text_bert.py", "text2img_bert.py", "retrieve_text2img.py"} \
        <= set(per_script), sorted(scripts - set(per_script))  # the twins share their parsers with these
    assert "crossmodal.pipeline" in per_script
    assert all(len(v) >= 3 for k, v in per_script.items() if k.endswith(".py") and k in (
        "make_database_img.py", "make_database_text.py", "img2text.py", "get_features_captions.py",
        "retrieve_img2text.py", "main_retrieve.py", "coco_triplet_dataset.py")), per_script
    processes = {c.values[0][0] for c in CASES if c.id in SUBPROCESS}
    assert {"make_database_img.py", "make_database_text.py", "img2text.py", "get_features_captions.py",
            "retrieve_img2text.py", "main_retrieve.py", "coco_triplet_dataset.py"} <= processes, processes


# --- skipping, -v, OS errors, threads ------------------------------------------------------------


def test_image_over_pixel_limit_is_a_counted_skip_with_skip_bad(world, tmp_path):
    import make_database_img

    meta = make_database_img.main(["--coco-root", str(world["bad_coco"]), "--split", "bomb", "--features-dir",
                                   str(tmp_path), "--skip-bad", "--input-size", "96", "--workers", "0",
                                   "--no-progress"])
    assert meta["ids"] == [3] and sorted(meta["skipped_ids"]) == [1, 2]


def test_verbose_shows_debug_lines(world):
    argv = [sys.executable, "retrieve_img2text.py", "--run", str(world["run"]), "--split", "val"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    loud = subprocess.run([*argv, "-v"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr
    assert " DEBUG " not in quiet.stderr
    assert " DEBUG crossmodal" in loud.stderr and "threads" in loud.stderr


def test_os_errors_a_user_can_fix_are_one_line_and_bugs_keep_their_traceback(monkeypatch, caplog):
    full = OSError(errno.ENOSPC, "No space left on device", "features/x.npy")
    assert "no space left" in os_error_line(full) and "features/x.npy" in os_error_line(full)
    denied = PermissionError(errno.EACCES, "Permission denied", "runs/a/best.pt")
    assert os_error_line(denied) == "runs/a/best.pt: Permission denied"
    assert "x.json" in os_error_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "x.json"))
    assert os_error_line(FileNotFoundError("no file named")) is None  # no path: a bug, not a user's error
    assert os_error_line(OSError(errno.EIO, "Input/output error")) is None

    def disk_full():
        raise full

    monkeypatch.setattr(sys, "argv", ["x.py"])
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as e:
        run_script(disk_full)
    assert e.value.code == 2 and "features/x.npy" in caplog.records[-1].getMessage()

    def bug():
        return {}["missing key"]

    with pytest.raises(KeyError):
        run_script(bug)


def test_threads_follow_the_cores_available_to_the_process(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    old = torch.get_num_threads()
    try:
        assert set_threads() == available_cores() == torch.get_num_threads()
        assert available_cores() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(old)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # README: OMP_NUM_THREADS wins when set
    try:
        assert set_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    monkeypatch.delenv("OMP_NUM_THREADS")
    out = subprocess.run([sys.executable, "-c", "from crossmodal.cli import set_threads; import torch; "
                          "print(set_threads(), torch.get_num_threads())"],  # more threads than cores: still wins
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(available_cores() + 1)})
    assert out.stdout.split() == [str(available_cores() + 1)] * 2, out.stderr
    out = subprocess.run([sys.executable, "-c", "import crossmodal.cli, os; print(os.environ['OMP_WAIT_POLICY'])"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    assert out.stdout.strip() == "PASSIVE", out.stderr  # waiting OpenMP threads sleep: README "Several jobs"
    if shutil.which("taskset"):
        out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                              "from crossmodal.cli import set_threads; import torch; set_threads(); "
                              "print(torch.get_num_threads())"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": ""})
        assert out.stdout.strip() == "1", out.stderr


def test_fasttext_trains_on_a_held_out_split_only_when_asked():
    from crossmodal.databases import fasttext_train_split

    assert fasttext_train_split("train2017", None) == "train2017"
    assert fasttext_train_split("train+restval", None) == "train+restval"
    assert fasttext_train_split("train[0:40]", None) == "train[0:40]"
    assert fasttext_train_split("val2017", "train2017") == "train2017"
    assert fasttext_train_split("val", "val") == "val"  # said on purpose
    for held_out, part in (("val", "val"), ("test", "test"), ("val2014[0:5]", "val2014"), ("train+test", "test")):
        with pytest.raises(DataError, match=f"--split .* held-out split.*'{part}'.*--fasttext-train-split"):
            fasttext_train_split(held_out, None)

"""Shared pieces of the tests/test_runs_*.py files: small features, a fast training, comparisons.

Holds no tests itself; the other files import its helpers."""

import json

import torch

from crossmodal import outputs
from crossmodal.train import read_results
from img2text import main as train_main
from make_database_img import main as img_main
from make_database_text import main as text_main

IMG = ["--encoder", "effnet-lite0", "--input-size", "96", "--workers", "0", "--batch-size", "4", "--no-progress"]
FT = ["--encoder", "fasttext", "--fasttext-dim", "16", "--fasttext-bucket", "2000", "--fasttext-epoch", "3",
      "--fasttext-train-split", "train", "--no-progress"]
FAST = ["--hidden", "32", "--batch-size", "32", "--no-progress"]


def make_features(root, feats) -> None:
    for split in ("train", "val"):
        img_main(["--coco-root", str(root), "--split", split, "--features-dir", str(feats), *IMG])
        text_main(["--coco-root", str(root), "--split", split, "--features-dir", str(feats), *FT])


def features_for(small_root, tmp_path_factory):
    """Image and fastText features of ``small_root`` (24 train / 16 val images), for a module fixture."""
    d = tmp_path_factory.mktemp("run_feats")
    make_features(small_root, d)
    return d


def train(feats, runs, *extra, epochs: int = 3):
    return train_main(["--features-dir", str(feats), "--runs-dir", str(runs), "--epochs", str(epochs), *FAST,
                       *extra])


def epoch_rows(run) -> list[dict]:
    """The epoch rows a run's results say it trained, without timings."""
    return [{k: v for k, v in r.items() if k != "train_s"} for r in read_results(run / "results.jsonl")]


def checkpoint_state(path) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return {"epoch": ck["epoch"], "best": ck["best"], "img_head": ck["img_head"], "txt_head": ck["txt_head"],
            "optimizer": ck["optimizer"]["state"]}


def same_tensors(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def assert_same_run(got, ref) -> None:
    """Two run folders hold the same training: epoch rows, checkpoints, done.json and plot."""
    assert epoch_rows(got) == epoch_rows(ref)
    for name in ("best.pt", "last.pt"):
        assert same_tensors(checkpoint_state(got / name), checkpoint_state(ref / name)), name
    dg, dr = (json.loads((x / "done.json").read_text()) for x in (got, ref))
    assert dg["best"] == dr["best"] and dg["epochs_run"] == dr["epochs_run"]
    assert dg["best_file"]["sha256"] == outputs.file_digest(got / "best.pt")
    assert (got / "figures" / "training.png").stat().st_size > 1000


def sidecar_view(meta: dict) -> dict:
    """A sidecar without what differs between two equal runs (creation time, file mtimes, timings)."""
    out = {k: v for k, v in meta.items() if k not in ("created", "eval_s")}
    if isinstance(out.get("files"), dict):
        out["files"] = {n: r["sha256"] for n, r in out["files"].items()}
    return out

"""Shared fixtures: the real COCO samples in ../shared/data and a demo dataset made once."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CROSSMODAL_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(name: str) -> Path:
    """Path of a folder in ../shared/data, or skip the test with a message when absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real COCO samples not found at {path} (set CROSSMODAL_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A reduced demo dataset (200 train / 50 val images, 128 px), generated once per session."""
    from crossmodal.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, num_train=200, num_val=50, seed=0, image_size=128)
    return root


@pytest.fixture(scope="session")
def demo_features(demo_root, tmp_path_factory):
    """Features of the reduced demo dataset: effnet-lite0 images, fastText (small) and BERT captions."""
    from make_database_img import main as img_main
    from make_database_text import main as text_main

    feats = tmp_path_factory.mktemp("features")
    common = ["--coco-root", str(demo_root), "--features-dir", str(feats), "--no-progress"]
    for split in ("train", "val"):
        img_main([*common, "--split", split, "--input-size", "128", "--workers", "0"])
        text_main([*common, "--split", split, "--encoder", "fasttext", "--fasttext-train-split", "train",
                   "--fasttext-dim", "64", "--fasttext-bucket", "5000"])
        text_main([*common, "--split", split, "--encoder", "bert", "--bert-model", "minilm"])
    return feats


@pytest.fixture(scope="session")
def small_root(tmp_path_factory):
    """A small generated dataset in COCO layout (24 train / 16 val JPEGs, 96 px): the core
    guarantees (resume, kill, shards, bad input) are tested on it, so they run without ../shared."""
    from crossmodal.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp("small")
    generate_demo_dataset(root, num_train=24, num_val=16, seed=1, image_size=96)
    return root

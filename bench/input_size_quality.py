"""What input size keeps retrieval quality: EfficientNet-Lite0 features of the real images in
../shared/data/coco-mini at several input sizes, the same BERT captions, one img2text_bert
model each (70 training images, 60 held-out images / 300 captions), validation R@1 and rsum.

    python -m bench.input_size_quality

Small data: differences of a few rsum points are noise; it shows where quality falls off.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import SHARED, save
from img2text_bert import main as train
from make_database_img import main as img_main
from make_database_text import main as text_main

TRAIN, VAL = "train2017[:70]", "train2017[70:]"


def main(argv=None):
    root = SHARED / "coco-mini"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        text_dir = Path(d) / "text"
        for split in (TRAIN, VAL):
            text_main(["--coco-root", str(root), "--split", split, "--encoder", "bert", "--features-dir",
                       str(text_dir), "--no-progress"])
        for size in (224, 256, 384, 512, 800):
            feats = Path(d) / f"s{size}"
            shutil.copytree(text_dir, feats)
            t0 = time.perf_counter()
            for split in (TRAIN, VAL):
                img_main(["--coco-root", str(root), "--split", split, "--input-size", str(size), "--features-dir",
                          str(feats), "--no-progress"])
            t_img = time.perf_counter() - t0
            best = train(["--features-dir", str(feats), "--runs-dir", str(feats / "runs"), "--train-split", TRAIN,
                          "--val-split", VAL, "--epochs", "30", "--no-progress"])["best"]
            rows.append((size, 130 / t_img, best["rsum"], best["val_img2text_R@1"], best["val_text2img_R@1"]))
    print("| input px | images/s (130 images) | val rsum | i2t R@1 | t2i R@1 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} |")
    save("input_size_quality", {"rows": [dict(zip(("input", "img_s", "rsum", "i2t_R1", "t2i_R1"), r, strict=True))
                                         for r in rows]})


if __name__ == "__main__":
    main()

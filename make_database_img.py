"""Encode the images of a COCO split once: region-averaged features, cached as .npy + .json.

    python make_database_img.py --coco-root data/demo --split train                      # offline default
    python make_database_img.py --coco-root COCO --split train2014 --encoder fasterrcnn \\
        --device cuda --batch-size 8                                                      # Faster R-CNN fc7
    torchrun --nproc-per-node 4 make_database_img.py ... && python make_database_img.py ... --merge --num-shards 4

Writes ``features/<split>_img_<encoder>.npy`` (N_img, D) and its sidecar; resumes when
interrupted; skipped when its output is up to date.
"""

from crossmodal.cli import run_script
from crossmodal.databases import run_image as main

if __name__ == "__main__":
    run_script(main)

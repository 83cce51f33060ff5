"""Train the projection heads: img2text triplets (image anchor, +/- captions), fasttext caption features.

    python img2text.py --features-dir features --train-split train --val-split val
    python img2text.py --negatives random          # the seed's recipe: TripletMarginLoss, margin 1.0

Reads features/<split>_img_<image-encoder>.npy and features/<split>_text_fasttext.npy; writes
runs/img2text_fasttext/ (args.json, results.jsonl, best.pt, last.pt, figures/training.png).
"""

from crossmodal.cli import run_script
from crossmodal.train import run


def main(argv=None):
    return run(argv, direction="img2text", text_encoder="fasttext")


if __name__ == "__main__":
    run_script(main)

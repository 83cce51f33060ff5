"""Train the projection heads: text2img triplets (caption anchor, +/- images), bert caption features.

    python text2img_bert.py --features-dir features --train-split train --val-split val
    python text2img_bert.py --negatives random          # the seed's recipe: TripletMarginLoss, margin 1.0

Reads features/<split>_img_<image-encoder>.npy and features/<split>_text_bert.npy; writes
runs/text2img_bert/ (args.json, results.jsonl, best.pt, last.pt, figures/training.png).
"""

from crossmodal.cli import run_script
from crossmodal.train import run


def main(argv=None):
    return run(argv, direction="text2img", text_encoder="bert")


if __name__ == "__main__":
    run_script(main)

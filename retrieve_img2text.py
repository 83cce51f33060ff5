"""Score img2text retrieval of a trained run: P@1, P@5, mAP, R@1/5/10, medr, meanr.

    python retrieve_img2text.py --run runs/img2text_fasttext --split val
    python retrieve_img2text.py --run runs/img2text_bert --split test --protocol 1k   # Karpathy 1K folds

Prints a table; writes runs/<name>/retrieval/<split>_img2text_<protocol>_metrics.json, the Faiss
top-k lists, a line in runs/<name>/results.jsonl and runs/<name>/figures/pr_*.png.
"""

from crossmodal.cli import run_script
from crossmodal.retrieve import run_metrics


def main(argv=None):
    return run_metrics(argv, direction="img2text")


if __name__ == "__main__":
    run_script(main)

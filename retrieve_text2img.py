"""Score text2img retrieval of a trained run: P@1, P@5, mAP, R@1/5/10, medr, meanr.

    python retrieve_text2img.py --run runs/text2img_fasttext --split val
    python retrieve_text2img.py --run runs/text2img_bert --split test --protocol 1k   # Karpathy 1K folds

Prints a table; writes runs/<name>/retrieval/<split>_text2img_<protocol>_metrics.json, the Faiss
top-k lists, a line in runs/<name>/results.jsonl and runs/<name>/figures/pr_*.png.
"""

from crossmodal.cli import run_script
from crossmodal.retrieve import run_metrics


def main(argv=None):
    return run_metrics(argv, direction="text2img")


if __name__ == "__main__":
    run_script(main)

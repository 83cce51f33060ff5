"""Figures of retrieval results: a query image beside its k nearest captions, and a caption
(or any sentence you type) above its k nearest images; the true matches are marked.

    python main_retrieve.py --run runs/img2text_bert --coco-root data/demo --split val --random 3
    python main_retrieve.py --run runs/text2img_bert --coco-root data/demo --split val \
        --query-text "a red circle to the left of a blue square"

PNGs go to runs/<name>/figures/ (or --out).
"""

from crossmodal.cli import run_script
from crossmodal.retrieve import run_figures as main

if __name__ == "__main__":
    run_script(main)

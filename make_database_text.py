"""Encode the captions of a COCO split once with FastText or BERT, cached as .npy + .json.

    python make_database_text.py --coco-root data/demo --split train --encoder fasttext
    python make_database_text.py --coco-root data/demo --split val --encoder fasttext --fasttext-train-split train
    python make_database_text.py --coco-root COCO --split train2014 --encoder bert --bert-model bert-base-uncased

fastText is trained on the TRAIN split's captions only (saved beside the features and
reused for val/test). Writes ``features/<split>_text_<encoder>.npy`` (N_cap, D) and its
sidecar with caption ids and their image ids.

BERT on a CPU runs through OpenVINO (bf16 matmuls, where the CPU has them) or ONNX Runtime when
installed, at PyTorch's vectors (cosine >= 0.9999 on every row); ``--runtime`` chooses, and
``--precision int8`` is ONNX Runtime's lossy quantisation (crossmodal/runtimes.py).
"""

from crossmodal.cli import run_script
from crossmodal.databases import run_text as main

if __name__ == "__main__":
    run_script(main)

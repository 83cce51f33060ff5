"""Project a split's cached features with a trained run's heads into the 128-d common space,
and index both galleries with Faiss (inner product on L2-normalised vectors = cosine).

    python get_features_captions.py --run runs/img2text_fasttext --split val
    python get_features_captions.py --run runs/img2text_bert --split test --index hnsw --ef-search 128

Writes runs/<name>/embeddings/<split>_emb_{img,text}.npy (+ .json) and .faiss indexes.
"""

from crossmodal.cli import run_script
from crossmodal.embed import run as main

if __name__ == "__main__":
    run_script(main)

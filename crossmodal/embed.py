"""The common space: a trained run's heads applied to a split's cached features
(``get_features_captions.py``), with Faiss indexes over both galleries.

Writes into ``runs/<name>/embeddings/``:

- ``<split>_img.npy`` (N_img, 128) and ``<split>_text.npy`` (N_cap, 128), L2-normalised, with
  sidecars (ids; caption image ids; the checkpoint and features they came from);
- ``<split>_img.faiss`` (gallery of text2img) and ``<split>_text.faiss`` (gallery of img2text).

This module is the stage's command line; the run is opened, checked and embedded by
:mod:`crossmodal.runs`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import existing_dir, int_in_range, positive_int, setup_logging, split_name
from .index import AUTO_IVF_FROM, INDEX_CHOICES
from .runs import Run, embedding_paths  # noqa: F401 (embedding_paths re-exported: its old home)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Project a split's features into the common space; build Faiss indexes.")
    p.add_argument("--run", required=True, type=existing_dir, help="a training run folder, runs/<name>")
    p.add_argument("--split", default="val", type=split_name)
    p.add_argument("--features-dir", default=None, type=existing_dir, help="default: the one the run was trained from")
    p.add_argument("--checkpoint", default="best.pt", help="file in the run folder (best.pt or last.pt)")
    p.add_argument("--index", default="auto", choices=INDEX_CHOICES,
                   help=f"auto (default): flat (exact) below {AUTO_IVF_FROM:,} vectors, ivf from there, per gallery")
    p.add_argument("--nlist", type=positive_int, default=None, help="ivf cells (default ~4 sqrt(N))")
    p.add_argument("--nprobe", type=positive_int, default=16)
    p.add_argument("--hnsw-m", type=int_in_range(2, 512), default=32)
    p.add_argument("--ef-search", type=positive_int, default=128)
    p.add_argument("--force", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run(argv=None) -> dict:
    """Build (or find fresh) the split's embeddings and indexes: :meth:`crossmodal.runs.Run.embed`."""
    a = parser().parse_args(argv)
    setup_logging(a.verbose)
    index = {"kind": a.index, "nlist": a.nlist, "nprobe": a.nprobe, "hnsw_m": a.hnsw_m, "ef_search": a.ef_search}
    return Run(a.run).embed(a.split, a.checkpoint, a.features_dir, index, a.force)


def load_embeddings(run_dir: str | Path, split: str) -> tuple:
    """A run folder's checked embeddings of ``split``: :meth:`crossmodal.runs.Run.embeddings`."""
    return Run(run_dir).embeddings(split)

"""Faiss indexes over L2-normalised embeddings, inner product (= cosine).

``flat`` is exact; ``ivf`` (IndexIVFFlat: ``nlist`` cells, ``nprobe`` visited) and ``hnsw``
(IndexHNSWFlat: ``M`` links, ``efSearch``) trade a little recall for speed on large galleries.
``auto`` (the default of ``get_features_captions.py``) is the rule by gallery size,
:func:`auto_kind`: flat below :data:`AUTO_IVF_FROM` vectors, IVF from there (BENCHMARKS.md,
"Search at full-COCO scale"). Variable names follow faiss: ``xb`` gallery, ``xq`` queries,
``k``, ``D`` scores, ``I`` ids.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .errors import FeatureError

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_CHOICES = ("auto", *INDEX_KINDS)  # what --index accepts: a kind, or the rule by size
# galleries of this many vectors or more get an IVF index by default. One query on one thread
# against a flat index costs about 0.03 ms per 1,000 vectors here (3.3 ms at 123K images, 20-25 ms at
# 616K captions: most of a full-COCO query's CPU); with IVF an image-id query's two searches and its
# answer took 0.45-0.67 ms, recall@10 1.000 on clustered synthetic vectors (BENCHMARKS.md, "Search at
# full-COCO scale"); below this size flat stays exact and costs under 3 ms
AUTO_IVF_FROM = 100_000


def auto_kind(n: int) -> str:
    """The index kind a gallery of ``n`` vectors gets from ``auto``: ``flat`` below
    :data:`AUTO_IVF_FROM`, else ``ivf``."""
    return "ivf" if n >= AUTO_IVF_FROM else "flat"


def resolve_kind(kind: str, n: int, nlist: int | None = None) -> str:
    """``kind``, with ``auto`` replaced by :func:`auto_kind` of the gallery size ``n``; refuses an
    ``nlist`` over ``n`` where that gives IVF (before anything is built or replaced)."""
    if kind not in INDEX_CHOICES:
        raise ValueError(f"unknown index kind {kind!r}: {', '.join(INDEX_CHOICES)}")
    kind = auto_kind(n) if kind == "auto" else kind
    if kind == "ivf" and nlist and nlist > n:
        raise FeatureError(f"--nlist {nlist}: an IVF index needs at least as many vectors as cells, "
                           f"the gallery has {n}")
    return kind


def stale_on(requested: str, sidecar: str | Path, job: dict) -> tuple[str, ...]:
    """The keys of an embeddings ``job`` whose change makes the embeddings behind ``sidecar`` stale
    (rebuilt) rather than other work (refused): their inputs; with ``auto`` requested, also the
    index kind when the inputs changed too and the old kind was one the rule gives (the rule
    follows the gallery, and the gallery changed)."""
    from .outputs import read_sidecar

    old = (read_sidecar(sidecar) or {}).get("job")
    if requested == "auto" and isinstance(old, dict) and old.get("inputs") != job.get("inputs") and (
            (old.get("index") or {}).get("kind") in ("flat", "ivf")):
        return ("inputs", "index.kind")
    return ("inputs",)


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) cells, but at least 39 training points per cell (faiss's own minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(xb: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
                hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 200):
    """Index ``xb`` (N, d) float32 (``kind`` ``auto``: :func:`resolve_kind`). Returns a faiss
    index; its parameters are in :func:`describe`."""
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    d = xb.shape[1]
    kind = resolve_kind(kind, len(xb), nlist)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or default_nlist(len(xb))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(xb)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r}: {', '.join(INDEX_KINDS)}")
    index.add(xb)
    return index


def describe(index) -> dict:
    import faiss

    out = {"type": type(index).__name__, "ntotal": int(index.ntotal), "d": int(index.d), "metric": "inner_product"}
    if isinstance(index, faiss.IndexIVF):
        out.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
    if isinstance(index, faiss.IndexHNSW):
        out.update(M=int(index.hnsw.nb_neighbors(1)), efSearch=int(index.hnsw.efSearch))
    return out


def index_bytes(index) -> bytes:
    """A faiss index serialised in memory (``write_index`` format), to be written by
    :mod:`crossmodal.outputs` with the embeddings it indexes."""
    import faiss

    return faiss.serialize_index(index).tobytes()


def save_index(index, path: str | Path) -> None:
    """Write an index on its own (benchmarks, tools), atomically."""
    from .outputs import tmp_path, write_bytes

    path = Path(path)
    tmp = tmp_path(path)
    write_bytes(tmp, index_bytes(index))
    tmp.replace(path)


def load_index(path: str | Path, expect_ntotal: int | None = None):
    import faiss

    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"Faiss index {path} does not exist (run get_features_captions.py first)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise FeatureError(f"Faiss index {path} cannot be read (truncated or corrupt: {str(e).splitlines()[0]}); "
                           "rerun get_features_captions.py") from None
    if expect_ntotal is not None and index.ntotal != expect_ntotal:
        raise FeatureError(f"Faiss index {path} holds {index.ntotal} vectors, its embeddings {expect_ntotal}")
    return index


def search(index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k``: ``D`` (Q, k') scores and ``I`` (Q, k') gallery rows, best first, ``k' = min(k, ntotal)``.

    Never Faiss's filler (row -1, score -3.4e38): queries an IVF (HNSW) index answers with fewer
    than ``k'`` rows (their ``nprobe`` cells, or ``efSearch`` candidates, hold too few vectors) are
    searched again with every cell (``efSearch`` >= the gallery), said in one logged line; rows
    still incomplete after that drop the columns no query fills (fewer results, said too)."""
    k = min(k, index.ntotal)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    D, I = index.search(xq, k)
    short = (I < 0).any(axis=1)
    if not short.any():
        return D, I
    wider = _wider_search(index)
    if wider is not None:
        params, how = wider
        D2, I2 = index.search(xq[short], k, params=params)
        D, I = D.copy(), I.copy()
        D[short], I[short] = D2, I2
        _say_once(index, "widened", f"Faiss index ({describe(index)['type']}): {int(short.sum())} of {len(xq)} "
                         f"queries had fewer than {k} results at {how}: searched again with {_wide_words(index)} "
                         "(raise --nprobe / --ef-search in get_features_captions.py to avoid it)")
    filled = int((I >= 0).all(axis=0).sum()) if (I < 0).any() else k
    if filled < k:
        _say_once(index, "cut", f"Faiss index ({describe(index)['type']}) returned only {filled} of the {k} "
                         "results asked for: the lists are cut to those")
        D, I = D[:, :filled], I[:, :filled]
    return D, I


def _wider_search(index):
    """Search parameters that visit the whole gallery: every IVF cell, or an HNSW ``efSearch`` as
    large as the gallery; with a description of the current ones. None for an exact index."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(index.nlist)), f"nprobe {index.nprobe} of {index.nlist} cells"
    if isinstance(index, faiss.IndexHNSW):
        return (faiss.SearchParametersHNSW(efSearch=max(int(index.ntotal), int(index.hnsw.efSearch))),
                f"efSearch {index.hnsw.efSearch}")
    return None


def _wide_words(index) -> str:
    import faiss

    return f"all {index.nlist} cells" if isinstance(index, faiss.IndexIVF) else f"efSearch {index.ntotal}"


_SAID: set = set()


def _say_once(index, what: str, line: str) -> None:
    """Log ``line`` once per index object and kind of message (a server's every query would repeat it)."""
    key = (id(index), what)
    if key not in _SAID:
        _SAID.add(key)
        log.warning("%s", line)

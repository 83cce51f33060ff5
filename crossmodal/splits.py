"""Split names and dataset names: the syntax every command line and loader shares.

A leaf module (it imports only :mod:`crossmodal.errors`), so that :mod:`crossmodal.cli` can check
``--split`` values at parse time without importing the dataset loaders, which themselves use the
command-line helpers (no import cycle).
"""

from __future__ import annotations

import re

from .errors import DataError

#: ``--dataset`` values: ``auto`` reads the kind from the root's files (or the Karpathy file's content).
DATASETS = ("auto", "coco", "flickr8k", "flickr30k")
_SLICE_RE = re.compile(r"^(?P<base>[^\[\]]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


def parse_split(split: str) -> tuple[str, slice]:
    """``'train2017[10:20]'`` -> ``('train2017', slice(10, 20))``."""
    m = _SLICE_RE.match(split)
    if not m:
        raise DataError(f"bad split name {split!r}: expected NAME or NAME[start:stop]")
    if any(c in m["base"] for c in "/\\\0") or m["base"].strip(".") == "":
        raise DataError(f"bad split name {split!r}: a split is a name (train2017, val), not a path")
    to_int = lambda s: int(s) if s not in (None, "") else None  # noqa: E731
    return m["base"], slice(to_int(m["start"]), to_int(m["stop"]))


def dataset_of_source(source: str) -> str:
    """The dataset a split came from, read from its ``CaptionSplit.source`` (also recorded in
    feature sidecars): Flickr sources start with ``flickr8k:`` / ``flickr30k:``; anything else is COCO."""
    head = str(source).split(":", 1)[0]
    return head if head in ("flickr8k", "flickr30k") else "coco"

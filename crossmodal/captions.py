"""The split object every dataset loader returns, and the checks they share.

A split is read once into a :class:`CaptionSplit`, a plain columnar view:

- images sorted by id: ``image_ids`` (N_img,), ``file_names`` (N_img,) relative to ``image_dir``;
- captions grouped by image (in image order), then by caption id: ``caption_ids``,
  ``caption_image_ids`` (N_cap,) and ``captions`` (N_cap,). Every caption is kept (some COCO
  images have 6 or 7).

The loaders (:mod:`crossmodal.coco`, :mod:`crossmodal.flickr`) read their files into
``images`` [(image id, file name)] and ``anns`` [(caption id, image id, text)] and call
:func:`build_split`, which applies the same checks to every dataset (duplicate ids, captions of
unknown images, empty captions, images without captions; ``skip_bad`` drops and counts them).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cli import has_visible_text
from .errors import DataError

log = logging.getLogger(__name__)


@dataclass
class CaptionSplit:
    """One caption split, columnar. Shapes: images (N_img,), captions (N_cap,)."""

    name: str
    image_dir: Path
    image_ids: np.ndarray
    file_names: list[str]
    caption_ids: np.ndarray
    caption_image_ids: np.ndarray
    captions: list[str]
    source: str
    skipped: dict[str, list[int]] = field(default_factory=dict)
    dataset: str = "coco"

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.caption_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.file_names[index]

    def caption_image_rows(self) -> np.ndarray:
        """Row (index into ``image_ids``) of each caption's image, shape (N_cap,)."""
        return rows_of(self.image_ids, self.caption_image_ids)

    def captions_of(self, image_id: int) -> list[str]:
        return [c for c, i in zip(self.captions, self.caption_image_ids, strict=True) if i == image_id]

    def summary(self) -> str:
        per_image = np.bincount(self.caption_image_rows(), minlength=self.num_images)
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(zip(*np.unique(per_image, return_counts=True), strict=True)))
        text = (
            f"split {self.name}: {self.num_images} images, {self.num_captions} captions "
            f"(captions per image -> images: {hist}) from {self.source}"
        )
        for what, ids in self.skipped.items():
            text += f"\n  skipped {len(ids)} {what}"
        return text


def rows_of(ids: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """Positions of ``query_ids`` in ``ids`` (both int arrays); raises if any is absent."""
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, query_ids, sorter=order)
    pos = np.clip(pos, 0, len(ids) - 1)
    rows = order[pos]
    missing = ids[rows] != query_ids if len(ids) else np.ones(len(query_ids), bool)
    if np.any(missing):
        raise DataError(f"ids not found: {np.asarray(query_ids)[missing][:10].tolist()}")
    return rows


def check_file_name(value, image_id: int, source) -> str:
    """An image's file name relative to its split folder: a non-empty string that stays inside it
    (no absolute path, no ``..``), else a one-line :class:`DataError` naming the image."""
    from pathlib import PurePosixPath

    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise DataError(f"{source}: image {image_id} has file_name {value!r}, not a file name")
    parts = PurePosixPath(value.replace("\\", "/")).parts
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or ".." in parts:
        raise DataError(f"{source}: image {image_id} has file_name {value!r}, which points outside the image folder "
                        "(file names must be relative, without '..')")
    return value


def duplicates(ids, what: str, source) -> None:
    """Refuse repeated ids (pycocotools would silently keep one of them), naming the first few."""
    seen, dup = set(), []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    if dup:
        raise DataError(f"{source}: duplicate {what} {', '.join(map(str, dup[:5]))}"
                        f"{f' and {len(dup) - 5} more' if len(dup) > 5 else ''}: each must appear once")


def int_id(value, what: str, source) -> int:
    """A COCO id: a JSON integer (or a string of digits); anything else is refused, naming the file."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise DataError(f"{source}: {what} {value!r:.40} is not an integer id (0 to 2^63-1)")


def build_split(name, image_dir, images, anns, source, sl, skip_bad, skipped=None, dataset="coco") -> CaptionSplit:
    """The checked :class:`CaptionSplit` of ``images`` [(id, file name)] and ``anns`` [(caption id, image id,
    text)], the images cut by the slice ``sl``. ``skipped``: what the reader already dropped (with ``skip_bad``)."""
    if not images:
        raise DataError(f"split {name!r} in {source} has no images")
    duplicates([i for i, _ in images], "image ids", source)
    duplicates([c for c, _, _ in anns], "caption ids", source)
    images.sort()
    all_ids = {i for i, _ in images}
    images = images[sl]
    if not images:
        raise DataError(f"split {name!r}: the slice leaves no images (source {source})")
    image_ids = np.array([i for i, _ in images], dtype=np.int64)
    if len(np.unique(image_ids)) != len(image_ids):
        raise DataError(f"split {name!r} in {source}: duplicate image ids")
    known = set(image_ids.tolist())
    skipped = dict(skipped or {})

    def bad(what: str, ident: int, msg: str):
        if not skip_bad:
            raise DataError(f"{msg} (in {source}; pass --skip-bad to drop and count such entries)")
        skipped.setdefault(what, []).append(ident)

    kept = []
    for cid, iid, text in sorted(anns, key=lambda a: (a[1], a[0])):
        if iid not in known:
            if iid not in all_ids:
                raise DataError(f"caption {cid} refers to image {iid}, which is not in {source}")
            continue  # belongs to an image outside the slice
        if not isinstance(text, str):
            bad("captions that are not text", cid, f"caption {cid} of image {iid} is not a string (it is "
                f"{'null' if text is None else type(text).__name__} {text!r:.40})")
            continue
        if not has_visible_text(text):
            why = "is empty" if not text.strip() else f"has no visible character ({text!r:.40})"
            bad("empty captions", cid, f"caption {cid} of image {iid} {why}")
            continue
        kept.append((cid, iid, " ".join(text.split())))
    with_caps = {iid for _, iid, _ in kept}
    keep_img = []
    for iid, fn in images:
        if iid in with_caps:
            keep_img.append((iid, fn))
        else:
            bad("images without captions", iid, f"image {iid} ({fn}) has no captions")
    if not keep_img:
        raise DataError(f"split {name!r} in {source} has no image with a caption")
    for what, ids in skipped.items():
        log.warning("split %s: skipped %d %s (first ids: %s)", name, len(ids), what, ids[:5])
    order = {iid: k for k, (iid, _) in enumerate(keep_img)}
    kept.sort(key=lambda a: (order[a[1]], a[0]))
    return CaptionSplit(
        name=name,
        image_dir=Path(image_dir),
        image_ids=np.array([i for i, _ in keep_img], dtype=np.int64),
        file_names=[f for _, f in keep_img],
        caption_ids=np.array([c for c, _, _ in kept], dtype=np.int64),
        caption_image_ids=np.array([i for _, i, _ in kept], dtype=np.int64),
        captions=[t for _, _, t in kept],
        source=source,
        skipped=skipped,
        dataset=dataset,
    )

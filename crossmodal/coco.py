"""COCO caption splits: reading annotations (pycocotools or the Karpathy file) and images.

A split is read once into a :class:`CaptionSplit`, a plain columnar view:

- images sorted by COCO id: ``image_ids`` (N_img,), ``file_names`` (N_img,) relative to
  ``image_dir``;
- captions grouped by image (in image order), then by caption id: ``caption_ids``,
  ``caption_image_ids`` (N_cap,) and ``captions`` (N_cap,). Every caption is kept (some COCO
  images have 6 or 7).

Split names are free (``train2014``, ``val2017``, ``train``...). A suffix ``[a:b]`` takes a
slice of the images sorted by id, so one annotated split can be cut into train and
held-out parts (``train2017[:100]``, ``train2017[100:]``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .cli import has_visible_text
from .errors import DataError

log = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_SLICE_RE = re.compile(r"^(?P<base>[^\[\]]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


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


def parse_split(split: str) -> tuple[str, slice]:
    """``'train2017[10:20]'`` -> ``('train2017', slice(10, 20))``."""
    m = _SLICE_RE.match(split)
    if not m:
        raise DataError(f"bad split name {split!r}: expected NAME or NAME[start:stop]")
    if any(c in m["base"] for c in "/\\\0") or m["base"].strip(".") == "":
        raise DataError(f"bad split name {split!r}: a split is a name (train2017, val), not a path")
    to_int = lambda s: int(s) if s not in (None, "") else None  # noqa: E731
    return m["base"], slice(to_int(m["start"]), to_int(m["stop"]))


def load_split(
    coco_root: str | Path,
    split: str,
    karpathy_file: str | Path | None = None,
    skip_bad: bool = False,
) -> CaptionSplit:
    """Read a caption split.

    COCO layout: ``<coco_root>/annotations/captions_<split>.json`` with images under
    ``<coco_root>/<split>/``. With ``karpathy_file`` (``dataset_coco.json``), ``split`` is one
    of train/restval/val/test, or several joined by ``+``; images under
    ``<coco_root>/<filepath>/<filename>``.

    Images without captions and empty captions raise :class:`DataError`, or with
    ``skip_bad`` are dropped, counted in ``CaptionSplit.skipped`` and logged.
    """
    coco_root = Path(coco_root)
    base, sl = parse_split(split)
    if karpathy_file is not None:
        images, anns, image_dir, source = _read_karpathy(coco_root, base, Path(karpathy_file))
    else:
        images, anns, image_dir, source = _read_coco(coco_root, base)
    return _build(split, image_dir, images, anns, source, sl, skip_bad)


def _read_coco(root: Path, base: str):
    ann_file = root / "annotations" / f"captions_{base}.json"
    if not ann_file.is_file():
        ann_dir = root / "annotations"
        found = sorted(p.name[len("captions_") : -5] for p in ann_dir.glob("captions_*.json"))
        hint = f"; splits available there: {', '.join(found)}" if found else ""
        raise DataError(f"split {base!r}: annotation file {ann_file} does not exist{hint}")
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(ann_file))
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
        raise DataError(f"annotation file {ann_file} is not valid COCO json: {e}") from e
    except (KeyError, TypeError) as e:
        raise DataError(f"annotation file {ann_file} lacks a required field: {e}") from e
    try:  # pycocotools keys its dicts by id, merging duplicates: read the lists it was given
        images = [(iid := _coco_id(im["id"], "image id", ann_file), _file_name(im["file_name"], iid, ann_file))
                  for im in coco.dataset["images"]]
        anns = [(_coco_id(a["id"], "caption id", ann_file), _coco_id(a["image_id"], "image_id", ann_file),
                 a["caption"]) for a in coco.dataset["annotations"]]
    except KeyError as e:
        raise DataError(f"annotation file {ann_file}: an entry lacks the field {e}") from e
    except TypeError as e:
        raise DataError(f"annotation file {ann_file}: an entry is not a JSON object ({e})") from e
    return images, anns, root / base, str(ann_file)


def _file_name(value, image_id: int, source) -> str:
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


def _duplicates(ids, what: str, source) -> None:
    """Refuse repeated ids (pycocotools would silently keep one of them), naming the first few."""
    seen, dup = set(), []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    if dup:
        raise DataError(f"{source}: duplicate {what} {', '.join(map(str, dup[:5]))}"
                        f"{f' and {len(dup) - 5} more' if len(dup) > 5 else ''}: each must appear once")


def _coco_id(value, what: str, source) -> int:
    """A COCO id: a JSON integer (or a string of digits); anything else is refused, naming the file."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise DataError(f"{source}: {what} {value!r:.40} is not an integer id (0 to 2^63-1)")


def _read_karpathy(root: Path, base: str, path: Path):
    if not path.is_file():
        raise DataError(f"Karpathy split file {path} does not exist")
    parts = base.split("+")
    bad = [p for p in parts if p not in KARPATHY_SPLITS]
    if bad:
        raise DataError(f"split {base!r} not in the Karpathy file {path}: use {'/'.join(KARPATHY_SPLITS)}")
    try:
        data = json.loads(path.read_text())
        images, anns = [], []
        for im in data["images"]:
            if im["split"] not in parts:
                continue
            iid = _coco_id(im["cocoid"], "cocoid", path)
            images.append((iid, _file_name(f"{_file_name(im['filepath'], iid, path)}/"
                                           f"{_file_name(im['filename'], iid, path)}", iid, path)))
            anns += [(_coco_id(s["sentid"], "sentid", path), iid, s["raw"]) for s in im["sentences"]]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"Karpathy split file {path} is not valid json: {e}") from e
    except (KeyError, TypeError) as e:
        raise DataError(f"Karpathy split file {path}: an entry lacks the field {e}") from e
    return images, anns, root, f"{path}:{base}"


def _build(name, image_dir, images, anns, source, sl, skip_bad) -> CaptionSplit:
    if not images:
        raise DataError(f"split {name!r} in {source} has no images")
    _duplicates([i for i, _ in images], "image ids", source)
    _duplicates([c for c, _, _ in anns], "caption ids", source)
    images.sort()
    all_ids = {i for i, _ in images}
    images = images[sl]
    if not images:
        raise DataError(f"split {name!r}: the slice leaves no images (source {source})")
    image_ids = np.array([i for i, _ in images], dtype=np.int64)
    if len(np.unique(image_ids)) != len(image_ids):
        raise DataError(f"split {name!r} in {source}: duplicate image ids")
    known = set(image_ids.tolist())
    skipped: dict[str, list[int]] = {}

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
    )


def load_image(path: str | Path, image_id: int | None = None, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file to RGB, whatever its mode (L, CMYK, P, RGBA...).

    ``draft`` (w, h): a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, the smallest that
    keeps it at least w x h (Pillow's ``Image.draft``); other formats are decoded in full.

    Transparent images are composited on white. Missing, unreadable, truncated or corrupt
    files, and images over PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``, its guard against
    decompression bombs), raise :class:`DataError` naming the file and the image id.
    """
    what = f"image {path}" + (f" (id {image_id})" if image_id is not None else "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not decoded
            im = Image.open(path)
        with im:
            if draft is not None:
                im.draft("RGB", tuple(draft))
            im.load()  # forces a full decode: truncated files fail here, not later
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, rgba).convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"{what} does not exist") from e
    except UnidentifiedImageError as e:
        raise DataError(f"{what} is not a readable image (corrupt or not an image file)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{what} is too large to decode safely: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{what} cannot be decoded ({e}); the file may be truncated or corrupt") from e

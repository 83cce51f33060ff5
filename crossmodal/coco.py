"""COCO caption splits (pycocotools or Karpathy's ``dataset_coco.json``), image decoding, and the
one entry point of the dataset layer, :func:`load_split`.

:func:`load_split` reads COCO here and hands Flickr8k / Flickr30k roots (or Karpathy's Flickr
files) to :mod:`crossmodal.flickr`; every dataset ends as the same :class:`CaptionSplit`
(:mod:`crossmodal.captions`, which also documents its layout).

Split names are free for COCO (``train2014``, ``val2017``, ``train``...). A suffix ``[a:b]`` takes a
slice of the images sorted by id, so one annotated split can be cut into train and
held-out parts (``train2017[:100]``, ``train2017[100:]``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import flickr
from .captions import CaptionSplit, build_split, check_file_name, int_id, rows_of
from .errors import DataError
from .splits import parse_split

log = logging.getLogger(__name__)

__all__ = ["CaptionSplit", "load_image", "load_split", "parse_split", "rows_of"]

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_split(
    coco_root: str | Path,
    split: str,
    karpathy_file: str | Path | None = None,
    skip_bad: bool = False,
    dataset: str = "auto",
) -> CaptionSplit:
    """Read a caption split of COCO, Flickr8k or Flickr30k.

    ``dataset``: ``coco``, ``flickr8k``, ``flickr30k``, or ``auto`` (default): read from
    ``karpathy_file``'s content when given, else from ``coco_root``'s files
    (:func:`crossmodal.flickr.detect_dataset`). Flickr layouts and ids: :mod:`crossmodal.flickr`.

    COCO layout: ``<coco_root>/annotations/captions_<split>.json`` with images under
    ``<coco_root>/<split>/``. With ``karpathy_file`` (``dataset_coco.json``), ``split`` is one
    of train/restval/val/test, or several joined by ``+``; images under
    ``<coco_root>/<filepath>/<filename>``.

    Images without captions and empty captions raise :class:`DataError`, or with
    ``skip_bad`` are dropped, counted in ``CaptionSplit.skipped`` and logged.
    """
    coco_root = Path(coco_root)
    base, sl = parse_split(split)
    data = flickr.read_karpathy_json(Path(karpathy_file)) if karpathy_file is not None else None
    dataset = flickr.resolve_dataset(coco_root, dataset, karpathy_file, data)
    if dataset != "coco":
        images, anns, image_dir, source, skipped = flickr.read_split(coco_root, base, dataset, karpathy_file, data,
                                                                     skip_bad)
        return build_split(split, image_dir, images, anns, source, sl, skip_bad, skipped, dataset)
    if karpathy_file is not None:
        images, anns, image_dir, source = _read_karpathy(coco_root, base, Path(karpathy_file), data)
    else:
        images, anns, image_dir, source = _read_coco(coco_root, base)
    return build_split(split, image_dir, images, anns, source, sl, skip_bad)


def _read_coco(root: Path, base: str):
    ann_file = root / "annotations" / f"captions_{base}.json"
    if not ann_file.is_file():
        ann_dir = root / "annotations"
        found = sorted(p.name[len("captions_") : -5] for p in ann_dir.glob("captions_*.json"))
        hint = f"; splits available there: {', '.join(found)}" if found else ""
        kind = flickr.detect_dataset(root)
        if not found and kind != "coco":  # --dataset coco given on a Flickr root
            hint = f" ({root} is a {kind} root: pass --dataset {kind} or auto)"
        elif not found:
            hint = (f" (nor is it a Flickr root: no {flickr.FLICKR8K_TOKEN}, {flickr.FLICKR30K_TOKEN} or "
                    f"{flickr.FLICKR30K_CSV}; docs/datasets.md)")
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
        images = [(iid := int_id(im["id"], "image id", ann_file), check_file_name(im["file_name"], iid, ann_file))
                  for im in coco.dataset["images"]]
        anns = [(int_id(a["id"], "caption id", ann_file), int_id(a["image_id"], "image_id", ann_file),
                 a["caption"]) for a in coco.dataset["annotations"]]
    except KeyError as e:
        raise DataError(f"annotation file {ann_file}: an entry lacks the field {e}") from e
    except TypeError as e:
        raise DataError(f"annotation file {ann_file}: an entry is not a JSON object ({e})") from e
    return images, anns, root / base, str(ann_file)


def _read_karpathy(root: Path, base: str, path: Path, data: dict):
    parts = base.split("+")
    bad = [p for p in parts if p not in KARPATHY_SPLITS]
    if bad:
        raise DataError(f"split {base!r} not in the Karpathy file {path}: use {'/'.join(KARPATHY_SPLITS)}")
    try:
        images, anns = [], []
        for im in data["images"]:
            if im["split"] not in parts:
                continue
            iid = int_id(im["cocoid"], "cocoid", path)
            images.append((iid, check_file_name(f"{check_file_name(im['filepath'], iid, path)}/"
                                                f"{check_file_name(im['filename'], iid, path)}", iid, path)))
            anns += [(int_id(s["sentid"], "sentid", path), iid, s["raw"]) for s in im["sentences"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"Karpathy split file {path}: an entry lacks the field {e}") from e
    return images, anns, root, f"{path}:{base}"


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

"""Flickr8k and Flickr30k caption splits: the official files and Karpathy's ``dataset_flickr*.json``.

Layouts (``<root>`` is what ``--coco-root`` names; every file is the one the dataset ships):

- **Flickr8k** (Hodosh, Young and Hockenmaier 2013): ``<root>/Flickr8k.token.txt`` (one caption a
  line, ``<name>.jpg#<0-4>`` TAB caption), ``<root>/Flickr_8k.{train,dev,test}Images.txt`` (one
  file name a line), images in ``<root>/Images/`` (the official zip's ``Flicker8k_Dataset/`` is
  accepted too). Splits ``train``, ``dev``, ``test``, joined with ``+`` (``train+dev``). Caption
  lines of images in none of the chosen lists are ignored (the official token file has a few, for
  names such as ``2258277193_586949ec62.jpg.1``).
- **Flickr30k** (Young et al. 2014): ``<root>/results_20130124.token`` (same line format) or the
  Kaggle ``<root>/results.csv`` (header ``image_name| comment_number| comment``, ``|``-separated),
  images in ``<root>/flickr30k-images/``. Flickr30k has no official split: ``all`` is every image
  of the caption file; train/val/test come from Karpathy's ``dataset_flickr30k.json``
  (``--karpathy-file``, or found in ``<root>``).
- **Karpathy files** ``dataset_flickr8k.json`` / ``dataset_flickr30k.json``: ``images[]`` with
  ``filename``, ``split`` (train/val/test) and ``sentences[].raw``; images in the folders above.

**Ids** (the same rule for the official files and Karpathy's, so features made from either are
interchangeable): an image's id is its Flickr photo id, the leading digits of its file name
(``1000268201_693b08cb0e.jpg`` -> 1000268201, Flickr30k's ``1000092795.jpg`` -> 1000092795); a
caption's id is ``image_id * 10 + n``, n its caption number (``#n`` in the token files, the
comment number in ``results.csv``, the position in ``sentences`` in Karpathy's files; 0-4, at most
9). Two files with the same photo id, a name without leading digits, a malformed line (one line
naming the file and line number; ``skip_bad`` drops and counts malformed lines instead) are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .captions import check_file_name
from .errors import DataError

FLICKR8K_TOKEN = "Flickr8k.token.txt"
FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}
FLICKR30K_TOKEN, FLICKR30K_CSV = "results_20130124.token", "results.csv"
IMAGE_DIRS = {"flickr8k": ("Images", "Flicker8k_Dataset"), "flickr30k": ("flickr30k-images", "flickr30k_images",
                                                                        "Images")}
KARPATHY_FILES = {"flickr8k": "dataset_flickr8k.json", "flickr30k": "dataset_flickr30k.json"}
KARPATHY_FLICKR_SPLITS = ("train", "val", "test")
_PHOTO_RE = re.compile(r"^(\d{1,17})(?!\d)")
MALFORMED = "malformed lines"


def photo_id(name: str, where: str) -> int:
    """The image id of a Flickr file name: its leading digits (the Flickr photo id)."""
    m = _PHOTO_RE.match(name)
    if not m:
        raise DataError(f"{where}: image file name {name!r} does not start with a Flickr photo id (digits)")
    return int(m[1])


def caption_id(image_id: int, number: int) -> int:
    """The id of caption ``number`` (0-9) of image ``image_id``: ``image_id * 10 + number``."""
    return image_id * 10 + number


# --- which dataset --------------------------------------------------------------------------------


def detect_dataset(root: Path) -> str:
    """The dataset a root holds, from its files: Flickr8k's token file, Flickr30k's caption file,
    COCO's ``annotations/``, a Flickr Karpathy file; else COCO (whose reader then names the
    annotation file it lacks)."""
    if (root / FLICKR8K_TOKEN).is_file():
        return "flickr8k"
    if (root / FLICKR30K_TOKEN).is_file() or (root / FLICKR30K_CSV).is_file():
        return "flickr30k"
    if (root / "annotations").is_dir():
        return "coco"
    for name in ("flickr8k", "flickr30k"):
        if (root / KARPATHY_FILES[name]).is_file():
            return name
    return "coco"


def read_karpathy_json(path: Path) -> dict:
    """A Karpathy split file (``dataset_{coco,flickr8k,flickr30k}.json``), parsed; one line when unreadable."""
    if not path.is_file():
        raise DataError(f"Karpathy split file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"Karpathy split file {path} is not valid json: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"Karpathy split file {path}: no 'images' list at the top")
    return data


def karpathy_dataset(data: dict, path) -> str:
    """``coco``, ``flickr8k`` or ``flickr30k``: the file's ``dataset`` field, else ``coco`` when its
    images have ``cocoid``."""
    kind = data.get("dataset")
    if kind in ("coco", "flickr8k", "flickr30k"):
        return kind
    first = data["images"][0] if data["images"] else {}
    if isinstance(first, dict) and "cocoid" in first:
        return "coco"
    raise DataError(f"Karpathy split file {path}: cannot tell its dataset (no 'dataset' field and no 'cocoid'); "
                    "pass --dataset")


def resolve_dataset(root: Path, dataset: str, karpathy_file, data: dict | None) -> str:
    """``dataset`` as asked, ``auto`` resolved; a Karpathy file of another dataset is refused."""
    if dataset not in ("auto", "coco", "flickr8k", "flickr30k"):
        raise DataError(f"unknown dataset {dataset!r}: auto, coco, flickr8k or flickr30k")
    if data is not None:
        kind = karpathy_dataset(data, karpathy_file)
        if dataset not in ("auto", kind):
            raise DataError(f"--dataset {dataset}, but the Karpathy file {karpathy_file} is of {kind}")
        return kind
    return detect_dataset(root) if dataset == "auto" else dataset


def image_dir(root: Path, dataset: str) -> Path:
    """The image folder of a Flickr root: the first of :data:`IMAGE_DIRS` that exists."""
    for name in IMAGE_DIRS[dataset]:
        if (root / name).is_dir():
            return root / name
    return root / IMAGE_DIRS[dataset][0]


# --- reading --------------------------------------------------------------------------------------


def read_split(root: Path, base: str, dataset: str, karpathy_file, data: dict | None, skip_bad: bool):
    """``(images, anns, image_dir, source, skipped)`` of split ``base`` (no slice) of a Flickr root,
    for :func:`crossmodal.captions.build_split`."""
    parts = base.split("+")
    if data is None:
        official = set(FLICKR8K_LISTS) if dataset == "flickr8k" else {"all"}
        found = root / KARPATHY_FILES[dataset]
        if found.is_file() and not set(parts) <= official:
            karpathy_file, data = found, read_karpathy_json(found)
    if data is not None:
        return (*_read_karpathy(root, parts, dataset, Path(karpathy_file), data), {})
    if dataset == "flickr8k":
        return _read_flickr8k(root, parts, skip_bad)
    return _read_flickr30k(root, parts, skip_bad)


def _read_flickr8k(root: Path, parts: list[str], skip_bad: bool):
    bad = [p for p in parts if p not in FLICKR8K_LISTS]
    if bad:
        raise DataError(f"split {'+'.join(parts)!r}: Flickr8k's splits are {'/'.join(FLICKR8K_LISTS)} (joined by +), "
                        f"not {bad[0]!r}")
    token = root / FLICKR8K_TOKEN
    if not token.is_file():
        raise DataError(f"Flickr8k caption file {token} does not exist")
    lists = {p: root / FLICKR8K_LISTS[p] for p in parts}
    for p, path in lists.items():
        if not path.is_file():
            raise DataError(f"split {p!r}: the Flickr8k split list {path} does not exist")
    owner: dict[int, tuple[str, str]] = {}  # every list present: ids stay unique across the splits
    for path in [root / f for f in FLICKR8K_LISTS.values() if (root / f).is_file()]:
        for name, where in _read_list(path):
            _claim(owner, check_file_name(name, name, where), where)
    chosen = {name for path in lists.values() for name, _ in _read_list(path)}
    images = sorted((photo_id(n, str(token)), n) for n in chosen)
    entries, skipped = _read_token(token, skip_bad)
    source = f"flickr8k:{token} ({'+'.join(FLICKR8K_LISTS[p] for p in parts)})"
    return images, _anns(entries, chosen, token), image_dir(root, "flickr8k"), source, skipped


def _read_flickr30k(root: Path, parts: list[str], skip_bad: bool):
    if parts != ["all"]:
        raise DataError(f"split {'+'.join(parts)!r}: Flickr30k has no official splits: use 'all' (sliced, e.g. "
                        f"all[:29000]) or Karpathy's train/val/test with --karpathy-file {KARPATHY_FILES['flickr30k']}")
    path = root / FLICKR30K_TOKEN
    if path.is_file():
        entries, skipped = _read_token(path, skip_bad)
    elif (root / FLICKR30K_CSV).is_file():
        path = root / FLICKR30K_CSV
        entries, skipped = _read_csv(path, skip_bad)
    else:
        raise DataError(f"Flickr30k caption file {root / FLICKR30K_TOKEN} (or {FLICKR30K_CSV}) does not exist")
    owner: dict[int, tuple[str, str]] = {}
    names = {}
    for name, _, _, line in entries:
        if name not in names:
            names[name] = _claim(owner, check_file_name(name, name, f"{path}:{line}"), f"{path}:{line}")
    images = sorted((pid, n) for n, pid in names.items())
    return images, _anns(entries, set(names), path), image_dir(root, "flickr30k"), f"flickr30k:{path} (all)", skipped


def _read_karpathy(root: Path, parts: list[str], dataset: str, path: Path, data: dict):
    bad = [p for p in parts if p not in KARPATHY_FLICKR_SPLITS]
    if bad:
        raise DataError(f"split {'+'.join(parts)!r} not in the Karpathy file {path}: use "
                        f"{'/'.join(KARPATHY_FLICKR_SPLITS)} (joined by +)")
    owner: dict[int, tuple[str, str]] = {}
    images, anns = [], []
    try:
        for k, im in enumerate(data["images"]):
            where = f"{path} (images[{k}])"
            name = check_file_name(im["filename"], im.get("imgid", k), where)
            pid = _claim(owner, name, where)
            if im["split"] not in parts:
                continue
            images.append((pid, name))
            if len(im["sentences"]) > 10:
                raise DataError(f"{where}: {name} has {len(im['sentences'])} sentences; the id rule allows 10")
            anns += [(caption_id(pid, n), pid, s["raw"]) for n, s in enumerate(im["sentences"])]
    except KeyError as e:
        raise DataError(f"Karpathy split file {path}: an entry lacks the field {e}") from e
    except (TypeError, AttributeError) as e:  # a list where an object belongs, a string for a list...
        raise DataError(f"Karpathy split file {path}: an entry has a field of the wrong type ({e})") from e
    return images, anns, image_dir(root, dataset), f"{dataset}:{path}:{'+'.join(parts)}"


def _claim(owner: dict, name: str, where: str) -> int:
    """The photo id of ``name``, refused when another file (or another line) already has it."""
    pid = photo_id(name, where)
    if pid in owner:
        other, other_where = owner[pid]
        what = f"{name} is listed twice" if other == name else f"{other} and {name} have the same photo id {pid}"
        raise DataError(f"{where}: {what} (first at {other_where}); image ids are Flickr photo ids, one per image")
    owner[pid] = (name, where)
    return pid


def _anns(entries, names: set[str], path: Path) -> list[tuple[int, int, str]]:
    """(caption id, image id, text) of the entries whose image is in ``names``; others are ignored."""
    anns, seen = [], {}
    for name, number, text, line in entries:
        if name not in names:
            continue
        cid = caption_id(photo_id(name, f"{path}:{line}"), number)
        if cid in seen:
            raise DataError(f"{path}:{line}: caption {name}#{number} is given twice (first at line {seen[cid]})")
        seen[cid] = line
        anns.append((cid, cid // 10, text))
    return anns


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, line


def _read_list(path: Path) -> list[tuple[str, str]]:
    """(file name, ``path:line``) of a split list, one name a line."""
    return [(line.strip(), f"{path}:{n}") for n, line in _lines(path)]


def _number(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) <= 9 else None


def _malformed(path: Path, line: int, why: str, skip_bad: bool, skipped: dict) -> None:
    if not skip_bad:
        raise DataError(f"{path}:{line}: {why} (pass --skip-bad to drop and count malformed lines)")
    skipped.setdefault(MALFORMED, []).append(line)


def _read_token(path: Path, skip_bad: bool):
    """Entries ``(name, number, text, line)`` of a token file (``<name>#<n>`` TAB caption)."""
    entries, skipped = [], {}
    for n, line in _lines(path):
        key, tab, text = line.partition("\t")
        name, hash_, num = key.strip().rpartition("#")
        name = name.strip()  # "<name>.jpg #0": the caption of <name>.jpg, never dropped as another image's
        if not tab or not hash_ or not name or _number(num) is None:
            _malformed(path, n, f"expected '<image>.jpg#<0-9>' TAB caption, got {line[:60]!r}", skip_bad, skipped)
            continue
        entries.append((name, _number(num), text, n))
    return entries, skipped


def _read_csv(path: Path, skip_bad: bool):
    """Entries of Flickr30k's ``results.csv`` (Kaggle): ``image_name| comment_number| comment``."""
    entries, skipped, header = [], {}, True
    for n, line in _lines(path):
        fields = [f.strip() for f in line.split("|", 2)]
        if header:
            header = False
            if fields[0] == "image_name":
                continue
        if len(fields) != 3 or not fields[0] or _number(fields[1]) is None:
            _malformed(path, n, f"expected 'image_name| comment_number| comment', got {line[:60]!r}", skip_bad,
                       skipped)
            continue
        entries.append((fields[0], _number(fields[1]), fields[2], n))
    return entries, skipped


__all__ = ["caption_id", "detect_dataset", "photo_id", "read_split"]

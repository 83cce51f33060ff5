"""Small Flickr8k / Flickr30k roots in the real formats, made by the tests: tiny JPEGs, the token
files, the split lists, Karpathy's json, Flickr30k's ``results.csv``, Hodosh et al.'s judgement files.

Each image shows one coloured shape; its five captions name the colour and the shape, so a model
trained on a few dozen of them learns something (the end-to-end tests only need it to run)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square")
TEMPLATES = ("A {c} {s} .", "a {c} {s} on grey", "The {s} is {c}", "one {c} {s} in the middle", "{c} {s}")


def photo_name(k: int, flickr30k: bool = False) -> tuple[int, str]:
    """(photo id, file name) of image ``k``: ``<id>_<hex>.jpg`` (Flickr8k) or ``<id>.jpg`` (Flickr30k)."""
    pid = 1_000_000 + 7_919 * k
    return pid, f"{pid}.jpg" if flickr30k else f"{pid}_{(pid * 2654435761) % 16**10:010x}.jpg"


def content(k: int) -> tuple[str, str]:
    return list(COLOURS)[k % len(COLOURS)], SHAPES[(k // len(COLOURS)) % len(SHAPES)]


def captions(k: int) -> list[str]:
    c, s = content(k)
    return [t.format(c=c, s=s) for t in TEMPLATES]


def write_image(path: Path, k: int, side: int = 48) -> None:
    c, s = content(k)
    im = Image.new("RGB", (side, side), (128, 128, 128))
    box = (side // 4, side // 4, 3 * side // 4, 3 * side // 4)
    (ImageDraw.Draw(im).ellipse if s == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLOURS[c])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90)


def make_flickr8k(root: Path, n_train: int = 12, n_dev: int = 6, n_test: int = 6, image_dir: str = "Images",
                  images: bool = True, extra_token_lines: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """A Flickr8k root as downloaded; returns the image indices of each split."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": list(range(n_train)), "dev": list(range(n_train, n_train + n_dev)),
              "test": list(range(n_train + n_dev, n_train + n_dev + n_test))}
    lines = []
    for part, ks in splits.items():
        (root / f"Flickr_8k.{part}Images.txt").write_text("".join(photo_name(k)[1] + "\n" for k in ks))
        for k in ks:
            lines += [f"{photo_name(k)[1]}#{n}\t{t}" for n, t in enumerate(captions(k))]
            if images:
                write_image(root / image_dir / photo_name(k)[1], k)
    (root / "Flickr8k.token.txt").write_text("\n".join([*lines, *extra_token_lines]) + "\n")
    return splits


def karpathy_json(path: Path, splits: dict[str, list[int]], dataset: str = "flickr8k") -> Path:
    """Karpathy's ``dataset_<dataset>.json`` for the same images (``dev`` becomes ``val``)."""
    out, sent = [], 0
    for part, ks in splits.items():
        for k in ks:
            sents = []
            for t in captions(k):
                sents.append({"tokens": t.lower().split(), "raw": t, "imgid": len(out), "sentid": sent})
                sent += 1
            out.append({"filename": photo_name(k, dataset == "flickr30k")[1], "imgid": len(out),
                        "sentids": [s["sentid"] for s in sents], "sentences": sents,
                        "split": {"dev": "val"}.get(part, part)})
    path.write_text(json.dumps({"images": out, "dataset": dataset}))
    return path


def make_flickr30k(root: Path, n: int = 12, csv: bool = True, token: bool = False, images: bool = True,
                   bad_row: bool = False) -> list[int]:
    """A Flickr30k root: ``results.csv`` (Kaggle form) and/or ``results_20130124.token``, images in
    ``flickr30k-images/``. ``bad_row``: one row lacks a ``|`` (as in the Kaggle file's row 19999)."""
    root.mkdir(parents=True, exist_ok=True)
    rows, lines = ["image_name| comment_number| comment"], []
    for k in range(n):
        name = photo_name(k, True)[1]
        for j, t in enumerate(captions(k)):
            rows.append(f"{name}| {j}| {t}")
            lines.append(f"{name}#{j}\t{t}")
        if images:
            write_image(root / "flickr30k-images" / name, k)
    if bad_row:
        rows[7] = rows[7].replace("| 1| ", "| 1  ")
    if csv:
        (root / "results.csv").write_text("\n".join(rows) + "\n")
    if token:
        (root / "results_20130124.token").write_text("\n".join(lines) + "\n")
    return list(range(n))


def write_judgements(root: Path, expert: list[tuple[str, str, tuple[int, int, int]]],
                     crowd: list[tuple[str, str, int, int]]) -> None:
    """Hodosh et al.'s files: ``ExpertAnnotations.txt`` (image TAB caption-id TAB three scores 1-4) and
    ``CrowdFlowerAnnotations.txt`` (image TAB caption-id TAB percent yes TAB yes count TAB no count)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ExpertAnnotations.txt").write_text(
        "".join(f"{im}\t{cap}\t{a}\t{b}\t{c}\n" for im, cap, (a, b, c) in expert))
    (root / "CrowdFlowerAnnotations.txt").write_text(
        "".join(f"{im}\t{cap}\t{yes / (yes + no)}\t{yes}\t{no}\n" for im, cap, yes, no in crowd))

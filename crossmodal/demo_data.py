"""The embedded demo dataset: rendered scenes of shapes, captioned, in official COCO layout.

Each image holds one to three shapes (circle, square, triangle, diamond, star) of six
colours and two sizes, placed in cells of a 3x3 grid on a textured background. Every image
gets five captions (a few get six or seven, as in COCO), each worded differently and most
of them partial: a full list, a count, one object with its place, a relation between two
objects, a colour summary. Captions therefore describe their image, but several images
share most words, so retrieval is learnable and not trivial.

Writes ``<out>/annotations/captions_{train,val}.json`` and ``<out>/{train,val}/*.jpg``,
deterministically under ``seed``, in a couple of seconds::

    python -m crossmodal.demo_data --out data/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from .errors import DataError

log = logging.getLogger(__name__)

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
PLURAL = {s: s + "s" for s in SHAPES}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
NUMBERS = {1: "one", 2: "two", 3: "three"}
VERSION = 2  # bump when the generator's output changes


def _place(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "in the centre"
    if row == 1:
        return f"on the {COLS[col]}"
    if col == 1:
        return f"at the {ROWS[row]}"
    return f"in the {ROWS[row]} {COLS[col]} corner"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    else:  # star
        import math

        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _phrase(obj: dict, with_size: bool = True) -> str:
    size = f"{obj['size']} " if with_size else ""
    return _a(f"{size}{obj['colour']} {obj['shape']}")


def _captions(objs: list[dict], rng: random.Random) -> list[str]:
    n = len(objs)
    noun = rng.choice(["picture", "image", "drawing", "scene"])
    caps = []
    # 1. the full list
    caps.append(" and ".join(_phrase(o) for o in objs))
    # 2. counts of shapes
    shapes = sorted({o["shape"] for o in objs})
    counts = [(sum(o["shape"] == s for o in objs), s) for s in shapes]
    listed = " and ".join(f"{NUMBERS[c]} {PLURAL[s] if c > 1 else s}" for c, s in counts)
    caps.append(_a(f"{noun} with {listed}") if n > 1 else _a(f"{noun} with a single {objs[0]['shape']}"))
    # 3. one object and where it is
    o = rng.choice(objs)
    caps.append(f"{_phrase(o, rng.random() < 0.5)} {_place(o['row'], o['col'])}")
    # 4. a relation between two objects, or the lone object's size
    if n > 1:
        a, b = rng.sample(objs, 2)
        if a["col"] != b["col"]:
            rel = "to the left of" if a["col"] < b["col"] else "to the right of"
        else:
            rel = "above" if a["row"] < b["row"] else "below"
        caps.append(f"{_phrase(a, False)} {rel} {_phrase(b, False)}")
    else:
        caps.append(f"just one {o['size']} {o['colour']} shape on a plain background")
    # 5. the colours
    colours = sorted({o["colour"] for o in objs})
    caps.append(f"{NUMBERS[n]} {'shapes' if n > 1 else 'shape'} coloured {' and '.join(colours)}")
    # a few images get a sixth or seventh caption, as some COCO images do
    extra = rng.random()
    if extra < 0.08:
        caps.append(f"{rng.choice(['there is', 'we see'])} {_phrase(rng.choice(objs))}")
    if extra < 0.02:
        caps.append(f"{NUMBERS[n]} objects drawn on a {rng.choice(['light', 'pale'])} background")
    return caps


def _scene(rng: random.Random, size: int) -> tuple[Image.Image, list[dict]]:
    base = [rng.randint(170, 245) for _ in range(3)]
    img = Image.new("RGB", (size, size), tuple(base))
    draw = ImageDraw.Draw(img)
    for _ in range(12):  # background clutter, so pixels are not a clean lookup
        x, y = rng.randrange(size), rng.randrange(size)
        w = rng.randint(size // 16, size // 5)
        tone = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in base)
        draw.ellipse([x - w, y - w, x + w, y + w], fill=tone)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.choice([1, 2, 2, 3, 3]))
    objs = []
    for r, c in cells:
        o = {
            "shape": rng.choice(SHAPES),
            "colour": rng.choice(list(COLOURS)),
            "size": rng.choice(SIZES),
            "row": r,
            "col": c,
        }
        cell = size / 3
        rad = cell * (0.22 if o["size"] == "small" else 0.45)
        cx = (c + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (r + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[o["colour"]])
        _draw_shape(draw, o["shape"], cx, cy, rad, fill)
        objs.append(o)
    objs.sort(key=lambda o: (o["row"], o["col"]))
    return img.filter(ImageFilter.GaussianBlur(0.6)), objs


def generate_demo_dataset(
    out: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    image_size: int = 224,
) -> dict:
    """Write the demo dataset under ``out``; skip when the same one is already there, intact.

    Written through :mod:`crossmodal.outputs`: locked (``demo_meta.json.lock``), generated under
    ``out/.demo.tmp``, then each file renamed into place and ``demo_meta.json`` written last with
    every file's digest; a regeneration first removes that record, so a kill half-way is never
    taken for a finished dataset. Returns a summary dict: params, splits with their image and
    caption counts, bytes on disk.
    """
    from .outputs import file_record, locked, read_sidecar, remove, verify_files, write_json

    for name, value, lo in (("num_train", num_train, 1), ("num_val", num_val, 1), ("image_size", image_size, 16)):
        if not isinstance(value, int) or value < lo:
            raise DataError(f"demo dataset: {name} must be a whole number >= {lo}, not {value!r}")
    out = Path(out)
    params = {"version": VERSION, "num_train": num_train, "num_val": num_val, "seed": seed, "image_size": image_size}
    meta_file = out / "demo_meta.json"
    with locked(meta_file, what=f"demo dataset {out}"):
        old = read_sidecar(meta_file)
        if old and old.get("params") == params and verify_files(meta_file, old, full=True) is None \
                and _made_with(old, params):
            return old
        if old:
            why = "other settings" if old.get("params") != params else (
                verify_files(meta_file, old, full=True) or "its files are not the ones its settings make")
            log.info("regenerating the demo dataset in %s (%s)", out, why)
        remove(meta_file)  # from here on the folder is not a finished dataset until the record is back
        tmp = out / ".demo.tmp"
        remove(tmp)
        splits = _write_splits(tmp, num_train, num_val, seed, image_size)
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)
        remove(tmp)
        recorded = (old or {}).get("files") if isinstance((old or {}).get("files"), dict) else {}
        stale = [n for n in recorded if n not in names and n.split("/")[0] in ("train", "val", "annotations")
                 and ".." not in n.split("/")]  # only files a demo dataset can have
        remove(*(out / n for n in stale))  # files of the replaced version that this one lacks
        records = {n: file_record(out / n) for n in names}
        meta = {"params": params, "splits": splits, "bytes": sum(r["size"] for r in records.values()),
                "files": records}
        write_json(meta_file, meta)
    return meta


def _made_with(meta: dict, params: dict) -> bool:
    """Whether the files a record vouches for are those ``params`` make (not only what it claims):
    one image per split rendered again must have the recorded digest, and the counts must match."""
    import hashlib
    import io

    files = meta.get("files", {})
    for split, n, offset in (("train", params["num_train"], 1), ("val", params["num_val"], 1_000_001)):
        if sum(k.startswith(f"{split}/") for k in files) != n:
            return False
        buf = io.BytesIO()
        _scene(random.Random(f"{params['seed']}-{split}-0"), params["image_size"])[0].save(buf, "JPEG", quality=90)
        if files.get(f"{split}/{offset:012d}.jpg", {}).get("sha256") != hashlib.sha256(buf.getvalue()).hexdigest()[:16]:
            return False
    return True


def _write_splits(out: Path, num_train: int, num_val: int, seed: int, image_size: int) -> dict:
    """Images and annotation files of both splits under ``out``; returns their counts."""
    splits = {}
    next_cap = 1
    for split, n, offset in (("train", num_train, 1), ("val", num_val, 1_000_001)):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(n):
            rng = random.Random(f"{seed}-{split}-{k}")
            img, objs = _scene(rng, image_size)
            iid = offset + k
            fname = f"{iid:012d}.jpg"
            img.save(out / split / fname, quality=90)
            images.append({"id": iid, "file_name": fname, "width": image_size, "height": image_size, "license": 0})
            for cap in _captions(objs, rng):
                anns.append({"id": next_cap, "image_id": iid, "caption": cap})
                next_cap += 1
        ann = {
            "info": {"description": "crossmodal demo shapes dataset", "version": str(VERSION)},
            "licenses": [{"id": 0, "name": "CC0 (generated)", "url": ""}],
            "images": images,
            "annotations": anns,
        }
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"captions_{split}.json").write_text(json.dumps(ann))
        splits[split] = {"images": len(images), "captions": len(anns)}
    return splits


def main(argv=None):
    from .cli import int_in_range, non_negative_int

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/demo")
    p.add_argument("--num-train", type=int_in_range(1, 100_000), default=400, help="at most 100,000 (a demo)")
    p.add_argument("--num-val", type=int_in_range(1, 100_000), default=100, help="at most 100,000 (a demo)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--image-size", type=int_in_range(16, 4096), default=224)
    a = p.parse_args(argv)
    meta = generate_demo_dataset(a.out, a.num_train, a.num_val, a.seed, a.image_size)
    for split, s in meta["splits"].items():
        print(f"demo {split}: {s['images']} images, {s['captions']} captions")
    print(f"demo dataset at {a.out} ({meta['bytes'] / 1e6:.1f} MB)")
    return meta


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)

"""Features of the cross-validation bench (``bench/cv_defaults.py``), made by the package's own code.

A setting is a plain dict (it names the cache files and is recorded in the results):

- image: the keyword arguments of :class:`crossmodal.image_encoders.EffNetLite0Regions`
  (``variant``, ``input_size``, ``levels``, ``pool``) and of
  :func:`crossmodal.extract.extract_images`; any other setting either of them accepts (for
  example a decoding option) works unchanged, an unknown one is refused with one line. Extracted
  once for the whole split, cut into folds in memory.
- caption, BERT: ``model`` (``minilm``, ``mpnet`` or a Hugging Face name), ``pooling`` (``cls``,
  ``mean`` or ``cls+mean``), and optionally ``runtime`` / ``precision`` as
  :class:`crossmodal.text_encoders.BertEncoder` takes them (``precision: int8`` = ONNX Runtime's
  dynamic quantisation). Once for the whole split.
- caption, fastText: ``model: fasttext`` with ``dim``, ``epoch`` and ``bucket``. As the scripts
  make them (:func:`crossmodal.text_encoders.train_fasttext`: skipgram, one thread, in a fresh
  worker process with a fixed environment, so bit-reproducible), but **one model per fold**,
  trained on the captions of that fold's training images only, then used to encode every caption
  of the split (as ``make_database_text.py --fasttext-train-split`` encodes a validation split).
  Checked, per fold: the model's recorded training images are the fold's training images, its
  recorded caption ids are theirs (so no validation caption reached it), and
  :func:`crossmodal.run_state.check_text_model` (the training scripts' leak check) accepts the
  features for that training set.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from pathlib import Path

import numpy as np

FASTTEXT = {"model": "fasttext", "dim": 300, "epoch": 20, "bucket": 20_000}  # the pipeline's (small data)


def spec_key(d: dict) -> str:
    """A file-safe name of a setting: ``input_size256_levels1-2-3_pool-mean...`` (sorted keys)."""
    return "_".join(f"{k}{'-'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in sorted(d.items()))


def image_kwargs(spec: dict) -> tuple[dict, dict]:
    """Split an image setting into the encoder's keyword arguments and ``extract_images``'s, by
    their signatures; a key neither takes is one clear error naming it."""
    from crossmodal.extract import extract_images
    from crossmodal.image_encoders import EffNetLite0Regions

    enc_params = set(inspect.signature(EffNetLite0Regions.__init__).parameters) - {"self"}
    ext_params = set(inspect.signature(extract_images).parameters) - {"split", "encoder", "npy", "progress"}
    unknown = [k for k in spec if k not in enc_params | ext_params]
    if unknown:
        raise SystemExit(f"image setting {', '.join(sorted(unknown))} is taken neither by EffNetLite0Regions "
                         f"({', '.join(sorted(enc_params))}) nor by extract_images ({', '.join(sorted(ext_params))})")
    enc = {k: v for k, v in spec.items() if k in enc_params}
    return enc, {"batch_size": 4, **{k: v for k, v in spec.items() if k in ext_params and k not in enc_params}}


def split_subset(split, img_rows: np.ndarray, name: str):
    """The :class:`crossmodal.coco.CaptionSplit` of the images ``img_rows`` of ``split`` and their
    captions only (images (n,), captions (n_cap,), in the split's order), named ``name``."""
    img_rows = np.sort(np.asarray(img_rows))
    ids = split.image_ids[img_rows]
    keep = np.isin(split.caption_image_ids, ids)
    return dataclasses.replace(
        split, name=name, image_ids=ids, file_names=[split.file_names[i] for i in img_rows],
        caption_ids=split.caption_ids[keep], caption_image_ids=split.caption_image_ids[keep],
        captions=[c for c, k in zip(split.captions, keep, strict=True) if k], skipped={})


def check_fasttext_fold(model_path: Path, train, val_image_ids) -> None:
    """Refuse a fold's fastText model unless it was trained on exactly the captions of ``train``
    (a :class:`CaptionSplit`) and on no caption of the validation images ``val_image_ids``."""
    from crossmodal.outputs import read_sidecar
    from crossmodal.store import ids_digest

    meta = read_sidecar(Path(model_path).with_suffix(".json"))
    seen = np.asarray(meta["image_ids"], dtype=np.int64)
    leaked = np.intersect1d(seen, np.asarray(val_image_ids, dtype=np.int64))
    if len(leaked) or not np.array_equal(np.sort(seen), np.sort(train.image_ids)):
        raise AssertionError(f"fastText model {model_path} saw captions of {len(leaked)} validation images "
                             f"(e.g. {leaked[:3].tolist()}) or not exactly the fold's training images")
    if meta["job"]["captions"] != ids_digest(train.caption_ids):
        raise AssertionError(f"fastText model {model_path} was trained on other captions than the fold's training "
                             "captions")


class Features:
    """Features per setting, extracted into ``cache`` and kept in memory: whole-split for images
    and BERT, per fold (by its training images) for fastText. Arrays (N, D) float32 in the split's
    row order (images by id, captions as the annotations list them), with their sidecars."""

    def __init__(self, root: Path, cache: Path, models: dict | None = None, split: str = "train2017"):
        from crossmodal.coco import load_split

        self.split = load_split(str(root), split)
        self.cache, self.mem, self.seconds, self.models = Path(cache), {}, {}, models or {}
        self.runtimes: dict[str, dict] = {}  # caption setting -> the runtime that made its vectors

    def img(self, spec: dict) -> tuple[np.ndarray, dict]:
        from crossmodal.extract import extract_images
        from crossmodal.image_encoders import EffNetLite0Regions
        from crossmodal.store import load_features

        k = "img_" + spec_key(spec)
        if k not in self.mem:
            enc_kw, ext_kw = image_kwargs(spec)
            npy = self.cache / f"{self.split.name}_{k}.npy"
            t0 = time.perf_counter()
            extract_images(self.split, EffNetLite0Regions(**enc_kw), npy, progress=False, **ext_kw)
            self.seconds[k] = time.perf_counter() - t0
            self.mem[k] = load_features(npy, mmap=False)
        return self.mem[k]

    def txt(self, spec: dict, train_img_rows: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """A caption setting's features; fastText needs the fold's training image rows."""
        if spec["model"] == "fasttext":
            if train_img_rows is None:
                raise ValueError("fastText features are made per fold: give the fold's training image rows")
            return self._fasttext(spec, np.sort(np.asarray(train_img_rows)))
        return self._bert(spec)

    def _bert(self, spec: dict) -> tuple[np.ndarray, dict]:
        from crossmodal.extract import extract_texts
        from crossmodal.store import load_features
        from crossmodal.text_encoders import BertEncoder

        k = "txt_" + spec_key(spec)
        if k not in self.mem:
            parts = spec["pooling"].split("+")  # "cls+mean": the two poolings side by side
            arrays, metas = [], []
            for pooling in parts:
                npy = self.cache / f"{self.split.name}_txt_{spec_key({**spec, 'pooling': pooling})}.npy"
                t0 = time.perf_counter()
                enc = BertEncoder(self.models.get(spec["model"], spec["model"]), pooling=pooling,
                                  runtime=spec.get("runtime", "auto"), precision=spec.get("precision", "fp32"))
                extract_texts(self.split, enc, npy, progress=False)
                self.seconds[k] = self.seconds.get(k, 0.0) + time.perf_counter() - t0
                a, m = load_features(npy, mmap=False)
                self.runtimes[k] = m.get("runtime")
                arrays.append(a)
                metas.append(m)
            meta = dict(metas[0], settings={**metas[0]["settings"], "pooling": spec["pooling"]})
            self.mem[k] = (np.ascontiguousarray(np.hstack(arrays)), meta)
        return self.mem[k]

    def _fasttext(self, spec: dict, train_rows: np.ndarray) -> tuple[np.ndarray, dict]:
        from crossmodal.extract import extract_texts
        from crossmodal.store import ids_digest, load_features
        from crossmodal.text_encoders import FastTextEncoder, train_fasttext

        train = split_subset(self.split, train_rows, "")
        fold = f"cvtrain-{ids_digest(train.image_ids)[:12]}"  # the fold, by its training images
        train = dataclasses.replace(train, name=f"{self.split.name}-{fold}")
        k = f"txt_{spec_key(spec)}_{fold}"
        if k not in self.mem:
            t0 = time.perf_counter()
            folder = self.cache / "fasttext" / spec_key(spec)  # one model per fold and setting
            model = train_fasttext(train, folder, dim=spec["dim"], epoch=spec["epoch"],
                                   bucket=spec["bucket"], threads=1)
            val_ids = np.setdiff1d(self.split.image_ids, train.image_ids)
            check_fasttext_fold(model, train, val_ids)
            enc = FastTextEncoder(model, info={"source": "trained", "train_split": train.name})
            npy = self.cache / f"{self.split.name}_{k}.npy"
            extract_texts(self.split, enc, npy, progress=False)
            self.seconds[k] = time.perf_counter() - t0
            self.mem[k] = load_features(npy, mmap=False)
        return self.mem[k]

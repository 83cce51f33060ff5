"""Training of the two projection heads on cached features (the four training scripts).

The scripts differ only in ``direction`` (img2text: image anchor, +/- captions; text2img:
caption anchor, +/- images) and text encoder (fasttext, bert); :func:`build_parser` takes
those two as defaults and :func:`run` does the rest.

Features are held in memory as tensors (memory-mapped past ``--max-ram-gb``) and every
batch is one tensor gather: there is no per-sample Python on the hot path. Each epoch ends
with validation R@1/5/10 in both directions (:mod:`crossmodal.metrics`); the best epoch by
rsum is kept. A run lives in ``runs/<name>/``: ``args.json``, ``results.jsonl``,
``last.pt``/``best.pt`` (plain state dicts + args + feature sidecars; ``weights_only``
loadable) and ``figures/training.png``. An interrupted run resumes from ``last.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoints import (  # noqa: F401 (heads_from_checkpoint: re-exported for embed, serve, retrieve)
    heads_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .cli import (
    add_run_args,
    code_version,
    existing_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    resolve_device,
    run_name,
    setup_logging,
    split_name,
)
from .encoders import check_features_fit, encoder_identity  # noqa: F401 (check_features_fit: re-exported)
from .errors import DataError, FeatureError, ModelError
from .heads import ProjectionHead, hardest_negative_loss, infonce_loss, random_negative_loss
from .metrics import evaluate
from .outputs import (
    append_jsonl,
    locked,
    read_sidecar,
    remove,
    write_json,
)
from .pairs import Pairs, _take, check_finite, embed_bank, load_pairs  # noqa: F401 (check_finite: re-exported)
from .run_state import (  # noqa: F401 (check_disjoint, feature_digest, read_results: re-exported)
    check_disjoint,
    check_text_model,
    feature_digest,
    finish,
    plot_results,
    read_results,
    resume_point,
    run_files,
    run_record,
    settle_precision,
    start_state,
)
from .store import feature_path
from .train_step import HeadPass, add_step_args, make_optimizer
from .triplets import TripletCOCO_Img2Text, TripletCOCO_Text2Img

log = logging.getLogger(__name__)

# The defaults per caption encoder. BERT: chosen on Flickr8k train/dev, 6,000 images (bench/flickr8k.py,
# BENCHMARKS.md): VSE++ after 2 warm-up epochs, a residual head 2,048 wide, 6 epochs of cosine-decayed lr.
# fastText keeps the seed's (hardest negatives lost on the demo; fastText was not measured on Flickr8k).
DEFAULTS = {
    "bert": {"negatives": "hardest", "warmup_epochs": 2, "head": "residual", "hidden": 2048, "epochs": 6},
    "fasttext": {"negatives": "random", "warmup_epochs": 0, "head": "mlp", "hidden": 1024, "epochs": 30},
}
# The seed's recipe (kept one flag string away, named in --help; the defaults before Flickr8k, chosen by 5-fold CV
# on 110 COCO images, bench/cv_defaults.py): it loses half the rsum at 6,000 images.
SEED_RECIPE = "--negatives random --margin 1.0 --warmup-epochs 0 --head mlp --hidden 1024 --epochs 30"
DEFAULT_MARGIN = {"random": 1.0, "hardest": 0.2, "sum": 0.2, "infonce": 0.0}  # infonce: unused
NEGATIVES = ("random", "hardest", "sum", "infonce")


def build_parser(direction: str, text_encoder: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=f"Train the projection heads, {direction} triplets, {text_encoder} caption features.",
        epilog=("The defaults for BERT captions (VSE++: the hardest in-batch negative, margin 0.2, after 2 warm-up "
                "epochs of summed negatives; a residual head 2,048 wide; 6 epochs) were chosen on Flickr8k train/dev "
                "(6,000 images; BENCHMARKS.md 'Flickr8k at real scale'). The seed's recipe, which 110-image "
                f"cross-validation had chosen (and the fastText scripts' default): {SEED_RECIPE}"))
    p.add_argument("--features-dir", default="features", type=existing_dir)
    p.add_argument("--train-split", default="train", type=split_name)
    p.add_argument("--val-split", default="val", type=split_name)
    p.add_argument("--image-encoder", default="effnet-lite0")
    p.add_argument("--text-encoder", default=text_encoder, choices=["fasttext", "bert"])
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--name", default=None, type=run_name, help=f"run name (default {direction}_{text_encoder})")
    p.add_argument("--direction", default=direction, choices=["img2text", "text2img", "both"])
    p.add_argument("--negatives", choices=NEGATIVES,
                   help="random: one sampled negative, TripletMarginLoss (the seed's recipe, see below); "
                        "hardest: in-batch hardest negative, VSE++ hinge on cosine; sum: hinges summed over "
                        "all in-batch negatives (VSE0); infonce: in-batch softmax cross-entropy (CLIP)")
    p.add_argument("--margin", type=non_negative_float, default=None, help="default 1.0 (random) or 0.2 (hardest, sum)")
    p.add_argument("--warmup-epochs", type=non_negative_int,
                   help="with --negatives hardest: sum the hinges over all in-batch negatives for this many "
                        "epochs first (VSE++/VSE∞ warm-up)")
    p.add_argument("--temperature", type=positive_float, default=0.05, help="--negatives infonce: softmax temperature")
    p.add_argument("--hidden", type=positive_int, help="the head's hidden width (default %(default)s)")
    p.add_argument("--head", choices=["mlp", "residual"],
                   help="mlp: standardise, Linear-ReLU-Dropout-Linear; residual: + a linear path beside it (VSE∞) "
                        "(default %(default)s)")
    p.add_argument("--out-dim", type=positive_int, default=128)
    p.add_argument("--dropout", type=probability, default=0.1)
    p.add_argument("--no-l2norm", action="store_true", help="do not L2-normalise the head outputs")
    p.add_argument("--epochs", type=positive_int,
                   help="default %(default)s (BERT scripts: 6, chosen on 6,000 images; a few hundred need more)")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "none"])
    p.add_argument("--patience", type=non_negative_int, default=0,
                   help="stop after this many epochs without a better rsum")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/last.pt (refused if it does not fit)")
    p.add_argument("--max-ram-gb", type=non_negative_float, default=8.0,
                   help="features larger than this stay memory-mapped")
    p.add_argument("--no-progress", action="store_true")
    add_step_args(p)
    add_run_args(p, batch_size=128)
    p.set_defaults(**DEFAULTS[text_encoder])
    return p


class Trainer:
    """Heads, optimiser and the epoch loop; everything a checkpoint needs to resume."""

    def __init__(self, args, train: Pairs, val: Pairs | None, device):
        self.args, self.train, self.val, self.device = args, train, val, device
        torch.manual_seed(args.seed)
        kw = {"hidden": args.hidden, "out_dim": args.out_dim, "dropout": args.dropout, "l2norm": not args.no_l2norm,
              "residual": getattr(args, "head", "mlp") == "residual"}
        self.img_head = ProjectionHead(train.img.shape[1], **kw).to(device)
        self.txt_head = ProjectionHead(train.txt.shape[1], **kw).to(device)
        for head, bank in ((self.img_head, train.img), (self.txt_head, train.txt)):
            sample = np.sort(np.random.default_rng(args.seed).permutation(len(bank))[:200_000])
            head.fit_standardisation(_take(bank, sample, device))
        self.opt, self.sched = make_optimizer((self.img_head, self.txt_head), args)
        self.heads = HeadPass(args.step, args.precision, device)
        rows, n_img = train.cap_img_rows, len(train.img)
        self.i2t = TripletCOCO_Img2Text(rows, n_img, seed=args.seed)
        self.t2i = TripletCOCO_Text2Img(rows, n_img, seed=args.seed)
        self.margin = args.margin if args.margin is not None else DEFAULT_MARGIN[args.negatives]
        self.epoch = 0
        if torch.is_tensor(train.img) and device.type == "cuda":
            train.img, train.txt = train.img.to(device), train.txt.to(device)

    def _loss(self, b: np.ndarray, epoch_idx: dict) -> torch.Tensor:
        t, dev, a = self.train, self.device, self.args
        if a.negatives != "random":  # in-batch negatives: one forward pass of B (image, caption) pairs
            rows = t.cap_img_rows[b]
            img = self.heads(self.img_head, _take(t.img, rows, dev))[0]
            txt = self.heads(self.txt_head, _take(t.txt, b, dev))[0]
            img_rows = torch.from_numpy(rows).to(dev)
            if a.negatives == "infonce":
                return infonce_loss(img, txt, img_rows, a.temperature, a.direction)
            summed = a.negatives == "sum" or self.epoch < getattr(a, "warmup_epochs", 0)
            return hardest_negative_loss(img, txt, img_rows, self.margin, a.direction, "sum" if summed else "max")
        loss = 0.0
        heads = {"img2text": (self.img_head, t.img, self.txt_head, t.txt),  # anchor head/bank, other head/bank
                 "text2img": (self.txt_head, t.txt, self.img_head, t.img)}
        for d in ("img2text", "text2img"):
            if a.direction in (d, "both"):
                an, po, ne = (x[b] for x in epoch_idx[d])
                h_a, bank_a, h_o, bank_o = heads[d]
                (anchor,), (pos, neg) = (self.heads(h_a, _take(bank_a, an, dev)),
                                         self.heads(h_o, _take(bank_o, po, dev), _take(bank_o, ne, dev)))
                loss = loss + random_negative_loss(anchor, pos, neg, self.margin)
        return loss

    def train_epoch(self, epoch: int) -> float:
        """One pass over all training captions; returns the mean loss. Seeded by (seed, epoch),
        so a resumed run repeats exactly what an uninterrupted one would do."""
        a = self.args
        self.epoch = epoch  # the loss's warm-up phase
        torch.manual_seed(a.seed * 100_003 + epoch)  # dropout (--step exact)
        self.heads.start_epoch(a.seed, epoch)  # dropout (--step fast)
        rng = np.random.default_rng([a.seed, epoch, 7])
        epoch_idx = {}
        if a.negatives == "random":
            epoch_idx = {"img2text": self.i2t.epoch_indices(epoch), "text2img": self.t2i.epoch_indices(epoch)}
        perm = rng.permutation(len(self.train.cap_img_rows))
        self.img_head.train()
        self.txt_head.train()
        total, n = 0.0, 0
        for s in range(0, len(perm), a.batch_size):
            b = perm[s : s + a.batch_size]
            if len(b) < 2:
                continue
            loss = self._loss(b, epoch_idx)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach()) * len(b)
            n += len(b)
        if self.sched:
            self.sched.step()
        return total / max(n, 1)

    def embed(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_img, out_dim) and (N_cap, out_dim) embeddings, heads in eval mode, on the CPU."""
        return (embed_bank(self.img_head, pairs.img, self.device),
                embed_bank(self.txt_head, pairs.txt, self.device))

    def validate(self) -> dict:
        img, txt = self.embed(self.val)
        m = evaluate(img, txt, self.val.cap_img_rows, ks=(1, 5))
        return {k: v for k, v in m.items() if "R@" in k or k == "rsum" or "mAP" in k}

    def state(self, epoch: int, best: dict) -> dict:
        return {
            "img_head": self.img_head.state_dict(), "txt_head": self.txt_head.state_dict(),
            "head_config": {"img": self.img_head.config, "txt": self.txt_head.config},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict() if self.sched else {},
            "epoch": epoch, "best": best, "args": vars(self.args), "code_version": code_version(),
            "img_features": encoder_identity(self.train.img_meta),
            "txt_features": encoder_identity(self.train.txt_meta),
            # the images it learned from: no split it is scored on may share one (embed.py)
            "run_record": getattr(self, "record", None),  # the run's args.json: which run this belongs to
            "train_image_ids": torch.as_tensor(np.asarray(self.train.img_meta["ids"], dtype=np.int64)),
        }

    def load_state(self, ck: dict) -> None:
        self.img_head.load_state_dict(ck["img_head"])
        self.txt_head.load_state_dict(ck["txt_head"])
        self.opt.load_state_dict(ck["optimizer"])
        if self.sched and ck["scheduler"]:
            self.sched.load_state_dict(ck["scheduler"])


def run(argv=None, direction: str = "img2text", text_encoder: str = "fasttext") -> dict:
    a = build_parser(direction, text_encoder).parse_args(argv)
    setup_logging(a.verbose)
    name = a.name or f"{a.direction}_{a.text_encoder}"
    out = Path(a.runs_dir) / name
    fd = Path(a.features_dir)
    paths = {
        "train_img": feature_path(fd, a.train_split, "img", a.image_encoder),
        "train_txt": feature_path(fd, a.train_split, "text", a.text_encoder),
        "val_img": feature_path(fd, a.val_split, "img", a.image_encoder),
        "val_txt": feature_path(fd, a.val_split, "text", a.text_encoder),
    }
    if a.train_split == a.val_split:
        raise DataError(f"--train-split and --val-split are both {a.train_split!r}: validate on held-out data")
    out.mkdir(parents=True, exist_ok=True)
    a.features_dir_from_run = os.path.relpath(fd.resolve(), out.resolve())  # embed.py finds them from any cwd
    with contextlib.ExitStack() as stack:
        stack.enter_context(locked(out / "run", what=f"run {out}"))
        for p in paths.values():  # the features may not be replaced while this run reads them
            stack.enter_context(locked(p, shared=True, what=f"feature file {p}"))
        return _train(a, name, out, paths)


def _load_checked_pairs(a, paths: dict) -> tuple[Pairs, Pairs]:
    """Both splits' features, refused when they leak into each other or do not fit together."""
    train = load_pairs(paths["train_img"], paths["train_txt"], a.train_split, a.max_ram_gb)
    val = load_pairs(paths["val_img"], paths["val_txt"], a.val_split, a.max_ram_gb)
    for kind, tm, vm in (("image", train.img_meta, val.img_meta), ("caption", train.txt_meta, val.txt_meta)):
        if encoder_identity(tm) != encoder_identity(vm):
            raise FeatureError(f"train and val {kind} features come from different encoders or settings: "
                               f"{paths['train_img' if kind == 'image' else 'train_txt']} vs "
                               f"{paths['val_img' if kind == 'image' else 'val_txt']}")
    check_disjoint(train.img_meta["ids"], val.img_meta["ids"], f"training split {a.train_split!r}",
                   f"validation split {a.val_split!r}", "validate on images the model does not train on")
    for pairs, key in ((train, "train_txt"), (val, "val_txt")):
        check_text_model(pairs.txt_meta, train.img_meta["ids"], a.train_split, paths[key])
    return train, val


def _train(a, name: str, out: Path, paths: dict) -> dict:
    train, val = _load_checked_pairs(a, paths)
    device = resolve_device(a.device)
    a.precision = settle_precision(a, out, device)  # recorded as what ran: fp32 or bf16
    record = run_record(a, name, train, val, paths)
    f = run_files(out)
    state = start_state(a, out, record)
    if state == "done":
        done = read_sidecar(f["done"])
        if not f["plot"].is_file():  # the figure alone was lost: redraw it from the results
            plot_results(read_results(f["results"], upto_epoch=done.get("epochs_run", 0) - 1), f["plot"])
        log.info("%s is trained with these arguments and features: skipped (--force retrains)", out)
        return done
    ck = resume_point(f, record) if state == "resume" else None
    if ck is None:
        remove(f["done"], f["last"], f["best"], f["results"], f["plot"])
    trainer = Trainer(a, train, val, device)
    trainer.record = record
    start, best, best_on_disk = 0, {"rsum": -1.0, "epoch": -1}, -1
    if ck is not None:
        check_features_fit(ck, train.img_meta, train.txt_meta, f"in {a.features_dir}")
        trainer.load_state(ck)
        start, best, best_on_disk = ck["epoch"] + 1, ck["best"], ck["best_on_disk"]
        log.info("resuming %s after epoch %d (best rsum %.1f at epoch %d)", out, start - 1, best["rsum"], best["epoch"])
    write_json(f["args"], record)
    log.info("training %s: %d captions / %d images, val %d / %d, %s negatives (margin %.2f), %s on %s",
             name, len(train.txt), len(train.img), len(val.txt), len(val.img), a.negatives, trainer.margin,
             a.direction, device)
    last_epoch, since_best = start - 1, 0 if start == 0 else start - 1 - best["epoch"]
    stopped = bool(a.patience) and start > 0 and since_best >= a.patience  # stopped early before the kill
    for epoch in range(start, a.epochs) if not stopped else ():
        t0 = time.perf_counter()
        loss = trainer.train_epoch(epoch)
        t_train = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise ModelError(f"training diverged at epoch {epoch} (loss {loss}): lower --lr (a new --name, or "
                             "--force to retrain this run)")
        val_m = trainer.validate()
        row = {"type": "epoch", "epoch": epoch, "loss": loss, "lr": trainer.opt.param_groups[0]["lr"],
               "train_s": round(t_train, 3), **{f"val_{k}": v for k, v in val_m.items()}}
        append_jsonl(f["results"], row)
        improved = val_m["rsum"] > best["rsum"]
        if improved:
            best = {"rsum": val_m["rsum"], "epoch": epoch, **{f"val_{k}": v for k, v in val_m.items()}}
            save_checkpoint(trainer.state(epoch, best), f["best"])
            best_on_disk, since_best = epoch, 0
        else:
            since_best += 1
        save_checkpoint(trainer.state(epoch, best), f["last"])
        last_epoch = epoch
        if not a.no_progress:
            log.info("epoch %3d  loss %.4f  val R@1 i2t %5.1f t2i %5.1f  rsum %6.1f%s", epoch, loss,
                     val_m["img2text_R@1"], val_m["text2img_R@1"], val_m["rsum"], "  *" if improved else "")
        if a.patience and since_best >= a.patience:
            log.info("early stop: no better rsum for %d epochs", a.patience)
            break
    return finish(name, out, f, best, best_on_disk, last_epoch)

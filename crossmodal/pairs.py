"""A split's features in memory, captions joined to their images: loading (checked) and projecting.

Used by training (:mod:`crossmodal.train`, which re-exports these names) and by the stages that
embed a split with a trained head (:mod:`crossmodal.runs`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .coco import rows_of
from .errors import DataError, FeatureError
from .heads import ProjectionHead
from .store import check_split, load_features

log = logging.getLogger(__name__)


@dataclass
class Pairs:
    """Features of one split, captions joined to their images.

    ``img`` (N_img, D_img), ``txt`` (N_cap, D_txt) float32 tensors (or memmaps),
    ``cap_img_rows`` (N_cap,) int64."""

    img: torch.Tensor | np.ndarray
    txt: torch.Tensor | np.ndarray
    cap_img_rows: np.ndarray
    img_meta: dict
    txt_meta: dict
    cap_mask: np.ndarray  # (rows of the caption file,) True for the captions kept here


def check_finite(bank, npy, chunk: int = 65_536) -> None:
    """Refuse features holding NaN or infinite values (``bank`` (N, D), checked in row blocks)."""
    for s in range(0, len(bank), chunk):
        ok = np.isfinite(np.asarray(bank[s : s + chunk])).all(axis=1)
        if not ok.all():
            row = s + int(np.argmin(ok))
            raise FeatureError(f"feature file {npy} holds NaN or infinite values (first at row {row}): "
                               "re-extract it with --force")


def load_pairs(img_npy: Path, txt_npy: Path, split: str | None = None, max_ram_gb: float = 8.0) -> Pairs:
    """Load a split's image and caption features (refused if made from another ``split``);
    captions whose image has no features (an unreadable image skipped at extraction) are
    dropped, counted and logged."""
    img, im = load_features(img_npy)
    txt, tm = load_features(txt_npy)
    if split is not None:
        check_split(im, split, img_npy)
        check_split(tm, split, txt_npy)
    if im.get("kind") != "img" or tm.get("kind") != "text":
        raise FeatureError(f"{img_npy} must hold image features and {txt_npy} caption features")
    if len(img) == 0 or len(txt) == 0:
        raise DataError(f"empty split: {img_npy} has {len(img)} rows, {txt_npy} has {len(txt)}")
    check_finite(img, img_npy)
    check_finite(txt, txt_npy)
    img_ids = np.asarray(im["ids"], dtype=np.int64)
    cap_img_ids = np.asarray(tm["image_ids"], dtype=np.int64)
    keep = np.isin(cap_img_ids, img_ids)
    if not keep.all():
        log.warning("%s: %d captions dropped: their images have no features in %s", txt_npy, (~keep).sum(), img_npy)
    if not keep.any():
        raise FeatureError(f"no caption in {txt_npy} belongs to an image in {img_npy}: different splits?")
    rows = rows_of(img_ids, cap_img_ids[keep])
    in_ram = (img.nbytes + txt.nbytes) / 2**30 <= max_ram_gb

    def bank(a, sel=None):
        if sel is not None and not sel.all():
            a = a[sel]
        return torch.from_numpy(np.array(a, dtype=np.float32)) if in_ram else a  # np.array: a writable copy

    return Pairs(bank(img), bank(txt, keep), rows, im, tm, keep)


def _take(bank, idx: np.ndarray, device) -> torch.Tensor:
    """Rows ``idx`` of a feature bank as a (len(idx), D) tensor on ``device``."""
    if torch.is_tensor(bank):
        return bank[torch.from_numpy(idx).to(bank.device)].to(device, non_blocking=True)
    return torch.from_numpy(np.asarray(bank[np.sort(idx)])[np.argsort(np.argsort(idx))]).to(device)


@torch.inference_mode()
def embed_bank(head: ProjectionHead, bank, device=None, chunk: int = 8192) -> torch.Tensor:
    """Project every row of a feature bank (N, d_in) with ``head`` in eval mode: (N, out_dim) on the CPU."""
    head.eval()
    device = device or next(head.parameters()).device
    parts = [head(_take(bank, np.arange(s, min(s + chunk, len(bank))), device)).float().cpu()
             for s in range(0, len(bank), chunk)]
    return torch.cat(parts)

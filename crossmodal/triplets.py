"""Triplet datasets over cached feature rows.

Both datasets index the captions of a split: item ``i`` is built around caption row ``i``
and its image row ``cap_img_rows[i]``.

- :class:`TripletCOCO_Img2Text`: (image, positive caption, negative caption); the anchor is
  the image of caption ``i``, the positive is caption ``i``, the negative is a caption of
  another image.
- :class:`TripletCOCO_Text2Img`: (caption, positive image, negative image); the negative is
  any image other than the caption's own.

Negatives are drawn per epoch, all at once, from ``np.random.default_rng([seed, epoch])``, so
an epoch's triplets are reproducible and independent of how items are visited.
:meth:`epoch_indices` gives the whole epoch as index arrays for vectorised training;
``__getitem__`` serves the same triplets one at a time (as feature rows when features are
given), for a classic ``DataLoader`` loop.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class _TripletBase(Dataset):
    def __init__(
        self,
        cap_img_rows: np.ndarray,
        num_images: int,
        seed: int = 0,
        img_feats: np.ndarray | torch.Tensor | None = None,
        text_feats: np.ndarray | torch.Tensor | None = None,
    ):
        """``cap_img_rows`` (N_cap,): image row of each caption row; ``img_feats`` (N_img, D_img)
        and ``text_feats`` (N_cap, D_txt) optional."""
        self.cap_img_rows = np.asarray(cap_img_rows, dtype=np.int64)
        self.num_images = int(num_images)
        if len(self.cap_img_rows) == 0:
            raise ValueError("triplet dataset: no captions")
        if self.cap_img_rows.min() < 0 or self.cap_img_rows.max() >= self.num_images:
            raise ValueError("triplet dataset: a caption refers to an image row out of range")
        if len(np.unique(self.cap_img_rows)) < 2:
            raise ValueError("triplet dataset: negatives need captions of at least two images")
        self.seed = seed
        self.img_feats = img_feats
        self.text_feats = text_feats
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.cap_img_rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._idx = self.epoch_indices(epoch)

    def epoch_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(anchor, positive, negative) row arrays of shape (N_cap,) for ``epoch``."""
        raise NotImplementedError

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _negative_captions(self, rng: np.random.Generator) -> np.ndarray:
        """One caption of another image per caption row (rejection sampling, uniform)."""
        n = len(self.cap_img_rows)
        neg = rng.integers(0, n, size=n)
        bad = np.flatnonzero(self.cap_img_rows[neg] == self.cap_img_rows)
        while len(bad):
            neg[bad] = rng.integers(0, n, size=len(bad))
            bad = bad[self.cap_img_rows[neg[bad]] == self.cap_img_rows[bad]]
        return neg

    def _negative_images(self, rng: np.random.Generator) -> np.ndarray:
        """One image other than the caption's own, uniform over the N_img - 1 others."""
        k = rng.integers(0, self.num_images - 1, size=len(self.cap_img_rows))
        return k + (k >= self.cap_img_rows)


class TripletCOCO_Img2Text(_TripletBase):  # noqa: N801 (name fixed by the user)
    """(image anchor, positive caption, negative caption) over feature rows."""

    def epoch_indices(self, epoch):
        rng = self._rng(epoch)
        caps = np.arange(len(self.cap_img_rows))
        return self.cap_img_rows.copy(), caps, self._negative_captions(rng)

    def __getitem__(self, i):
        a, p, n = (int(x[i]) for x in self._idx)
        if self.img_feats is None or self.text_feats is None:
            return a, p, n
        return _row(self.img_feats, a), _row(self.text_feats, p), _row(self.text_feats, n)


class TripletCOCO_Text2Img(_TripletBase):  # noqa: N801 (name fixed by the user)
    """(caption anchor, positive image, negative image) over feature rows."""

    def epoch_indices(self, epoch):
        rng = self._rng(epoch)
        caps = np.arange(len(self.cap_img_rows))
        return caps, self.cap_img_rows.copy(), self._negative_images(rng)

    def __getitem__(self, i):
        a, p, n = (int(x[i]) for x in self._idx)
        if self.img_feats is None or self.text_feats is None:
            return a, p, n
        return _row(self.text_feats, a), _row(self.img_feats, p), _row(self.img_feats, n)


def _row(feats, i: int) -> torch.Tensor:
    return torch.as_tensor(np.asarray(feats[i], dtype=np.float32)) if not torch.is_tensor(feats) else feats[i]

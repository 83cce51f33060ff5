"""Projection heads into the shared space, and the two triplet losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Standardise -> Linear(d_in, hidden) -> ReLU -> Dropout -> Linear(hidden, out_dim) -> L2-normalise.

    (N, d_in) -> (N, out_dim). ``residual=True`` adds a linear path beside the MLP (VSE∞'s head on
    precomputed features: ``Linear(d_in, out_dim)(x) + MLP(x)``, before the normalisation). The input
    standardisation (per-dimension mean and std of the training features, buffers saved with
    the weights) matters: fastText sentence vectors, for one, differ from each other by ~1e-4
    per dimension around a large common mean."""

    def __init__(self, d_in: int, hidden: int = 1024, out_dim: int = 128, dropout: float = 0.1, l2norm: bool = True,
                 residual: bool = False):
        super().__init__()
        self.config = {"d_in": d_in, "hidden": hidden, "out_dim": out_dim, "dropout": dropout, "l2norm": l2norm,
                       "residual": residual}
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
        self.skip = nn.Linear(d_in, out_dim) if residual else None
        self.l2norm = l2norm

    @torch.no_grad()
    def fit_standardisation(self, feats: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the input mean/std from training features (N, d_in)."""
        f = feats.double()
        self.mean.copy_(f.mean(0).float())
        self.std.copy_(f.std(0).clamp_min(eps).float())

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` (N, hidden), optional: the dropout mask already scaled by 1 / (1 - p) (0 where a
        unit is dropped), used instead of the Dropout layer's own (torch's RNG) mask. The output is
        float32 also under autocast (the last Linear's output is cast before the normalisation)."""
        lin1, relu, drop, lin2 = self.net
        x = (x - self.mean) / self.std
        h = relu(lin1(x))
        h = drop(h) if keep is None else h * keep
        y = lin2(h) if self.skip is None else lin2(h) + self.skip(x)
        y = y.float()
        return F.normalize(y, dim=-1) if self.l2norm else y


def random_negative_loss(anchor, pos, neg, margin: float = 1.0) -> torch.Tensor:
    """The seed's recipe: ``TripletMarginLoss`` (Euclidean) on one sampled negative per anchor.
    All (B, d)."""
    return F.triplet_margin_loss(anchor, pos, neg, margin=margin)


def hardest_negative_loss(
    img: torch.Tensor, txt: torch.Tensor, img_rows: torch.Tensor, margin: float = 0.2, direction: str = "both",
    reduce: str = "max",
) -> torch.Tensor:
    """VSE++ max-of-hinges on cosine similarity, in-batch hardest negatives.

    ``img`` (B, d) and ``txt`` (B, d) are the embeddings of B positive (image, caption) pairs,
    ``img_rows`` (B,) the pairs' image rows: a caption of the same image is never a negative.
    ``img2text`` = image anchors against captions, ``text2img`` = caption anchors against
    images, ``both`` = the sum. Mean over anchors. ``reduce="sum"`` is VSE0's sum of hinges
    over all in-batch negatives instead of the hardest one (the warm-up of VSE++/VSE∞)."""
    sims = img @ txt.t()  # (B, B); pair i is (img i, txt i); masked entries -> relu(-inf) = 0
    pos = sims.diagonal()
    same = img_rows[:, None] == img_rows[None, :]
    neg = sims.masked_fill(same, float("-inf"))
    loss = sims.new_zeros(())
    for d, dim in (("img2text", 1), ("text2img", 0)):  # dim 1: captions of each image anchor; 0: images of a caption
        if direction not in (d, "both"):
            continue
        p = pos[:, None] if dim == 1 else pos[None, :]
        if reduce == "sum":
            loss = loss + F.relu(margin - p + neg).sum(dim=dim).mean()
        else:
            loss = loss + F.relu(margin - pos + neg.max(dim=dim).values).mean()
    return loss


def infonce_loss(
    img: torch.Tensor, txt: torch.Tensor, img_rows: torch.Tensor, temperature: float = 0.05, direction: str = "both"
) -> torch.Tensor:
    """InfoNCE (CLIP's contrastive loss) over in-batch negatives: cross-entropy of each anchor's
    positive against all in-batch items of other images, on cosine similarity / ``temperature``.

    Shapes and masking as :func:`hardest_negative_loss`: other captions of the anchor's own image
    are neither positive nor negative. ``both`` = the sum of the two directions' means."""
    sims = (img @ txt.t()) / temperature
    same = img_rows[:, None] == img_rows[None, :]
    eye = torch.eye(len(sims), dtype=torch.bool, device=sims.device)
    logits = sims.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(sims), device=sims.device)
    loss = sims.new_zeros(())
    if direction in ("img2text", "both"):
        loss = loss + F.cross_entropy(logits, target)
    if direction in ("text2img", "both"):
        loss = loss + F.cross_entropy(logits.t(), target)
    return loss

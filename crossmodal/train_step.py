"""How one training step computes: the optimiser, the heads' dropout masks and matmul precision.

Two recorded training settings (``--step``, ``--precision``; a run made with other values is
another model, so they are in the run's identity like every other training flag):

- ``--step exact``: the loop as it ran before these settings existed, bit for bit: Adam with torch's multi-tensor
  (``foreach``) update, which gives the same weights as its per-tensor update (tested), one head
  pass per input block, ``nn.Dropout``'s mask from torch's RNG (on AMD CPUs torch draws it one
  element at a time: ~0.8 ms per 128 x 1,024 mask).
- ``--step fast`` (default): the same model in exact arithmetic, rounded differently: Adam's fused kernel
  (one pass over the weights instead of ~8), the other head run once over positives and negatives
  stacked (one (2B, d) pass instead of two (B, d)), and dropout masks drawn from numpy's PCG64
  (seeded per epoch, as the rest of the epoch is, so a resumed run repeats itself).
- ``--precision bf16``: the heads' matmuls (forward and backward) under ``torch.autocast`` in
  bfloat16 (float32 accumulation; weights, optimiser and loss stay float32). On a CPU with
  AVX512-BF16 or AMX, oneDNN runs them 2-3x faster than float32; elsewhere it is slower, so
  ``auto`` (default) takes bf16 only where the device has native bfloat16 matmuls and is
  recorded as what it resolved to.

``fast`` and ``bf16`` cost no measured quality: 5-fold CV on coco-mini, 3 seeds, paired rsum against
the defaults (fast, bf16 on this machine): ``exact`` fp32 +1.3 +/- 11.4, fast fp32 +0.2 +/- 3.6, std
over 15 runs (``python -m bench.cv_defaults --configs baseline,step-exact,step-fast-fp32``; BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

STEPS = ("fast", "exact")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_STEP, DEFAULT_PRECISION = "fast", "auto"


def add_step_args(p) -> None:
    """``--step`` and ``--precision`` on the training scripts' parser."""
    p.add_argument("--step", default=DEFAULT_STEP, choices=STEPS,
                   help="fast: fused Adam, one head pass over positives + negatives, numpy dropout masks; exact: "
                        "the loop bit for bit as before (crossmodal/train_step.py)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
                   help="the heads' matmuls; auto: bf16 where the CPU/GPU has native bfloat16 matmuls, else fp32")


def native_bf16(device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX; a CUDA GPU
    with bfloat16 support), not by emulation."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(name: str, device) -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 where :func:`native_bf16`, else fp32."""
    return ("bf16" if native_bf16(device) else "fp32") if name == "auto" else name


def make_optimizer(heads, args) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam over the parameters of ``heads`` (in order), with the multi-tensor update (``exact``) or
    the fused kernel (``fast``); and the learning-rate schedule (cosine over the epochs, or None)."""
    kernel = {"fused": True} if args.step == "fast" else {"foreach": True}
    opt = torch.optim.Adam([p for h in heads for p in h.parameters()], lr=args.lr, weight_decay=args.weight_decay,
                           **kernel)
    if args.schedule != "cosine":
        return opt, None
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.epochs))


class HeadPass:
    """Applies a projection head to row blocks as ``--step`` and ``--precision`` say."""

    def __init__(self, step: str = DEFAULT_STEP, precision: str = DEFAULT_PRECISION, device=None):
        self.fast, self.bf16 = step == "fast", resolve_precision(precision, device or "cpu") == "bf16"
        self.device_type = torch.device(device or "cpu").type
        self.rng = np.random.default_rng(0)

    def start_epoch(self, seed: int, epoch: int) -> None:
        """Seed the dropout masks of epoch ``epoch`` (``fast``): a resumed run draws the same ones."""
        self.rng = np.random.default_rng([seed, epoch, 11])

    def _precision(self):
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _keep(self, head, n: int, device) -> torch.Tensor | None:
        """(n, hidden) float32 dropout mask scaled by 1 / (1 - p), or None (eval mode, p = 0)."""
        p = head.config["dropout"]
        if not head.training or p == 0:
            return None
        keep = torch.from_numpy(self.rng.random((n, head.config["hidden"]), dtype=np.float32) >= p)
        return keep.to(device=device, dtype=torch.float32).mul_(1.0 / (1.0 - p))

    def __call__(self, head, *xs: torch.Tensor) -> list[torch.Tensor]:
        """``head`` applied to each (N_i, d_in) block of ``xs``: a list of (N_i, out_dim) float32.
        ``fast``: one pass over the blocks stacked, one dropout mask for it."""
        with self._precision():
            if not self.fast:
                return [head(x) for x in xs]
            x = torch.cat(xs) if len(xs) > 1 else xs[0]
            y = head(x, self._keep(head, len(x), x.device))
            return list(y.split([len(t) for t in xs])) if len(xs) > 1 else [y]

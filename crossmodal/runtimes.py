"""Faster CPU runtimes for the encoders, at equal output: ONNX Runtime and OpenVINO.

An encoder's PyTorch module is exported once to ONNX (``torch.onnx.export``) and run by ONNX
Runtime or OpenVINO (which reads the same export) on the CPU. The export is an output like any
other (:mod:`crossmodal.outputs`): locked while it is made, published whole with a sidecar, and
identified by its *job*: the digest of the weights it was made from (:func:`weights_digest`), its
inputs, opset and exporter version, and its precision. Where it is used it is identified by its
content: a session hashes the bytes it loads (:mod:`crossmodal.runtime_sessions`), an export whose
bytes are not the ones recorded when it was made (edited in place, even with its size and mtime
kept) is made again (logged), and the feature sidecar records the digest of the bytes that ran.
Concurrent runs (shards) wait for the one making an export, so all of them run the same runtime.
A cache that cannot be written (read-only, full): ``auto`` encodes with PyTorch (logged), an
explicit runtime is one line naming the path and the space needed; a finished export in a
read-only cache is used as it is. It lives in the cache folder
(:func:`cache_dir`: ``$XDG_CACHE_HOME/crossmodal`` or ``~/.cache/crossmodal``, or the folder a
caller gives), under ``onnx/``; a second encoder of the same weights reuses it, other weights get
another file. OpenVINO compiles the export in memory when a session opens (about a second).

``fp32`` exports give PyTorch's vectors (cosine >= 0.9999 on every row, tested in
``tests/test_perf_runtime.py``). ``int8`` is ONNX Runtime's dynamic quantisation of the fp32
export: faster, lossy (its cost is in BENCHMARKS.md), opt-in, and part of the features' settings.

OpenVINO runs the fp32 export with its matmuls in bfloat16 (float32 accumulation, LayerNorm and
softmax in float32) on CPUs with native bf16 (AVX512-BF16 or AMX): about 2x ONNX Runtime's rate
at cosine >= 0.99997 to PyTorch on every row, within the project's equal-output bound (tested in
``tests/test_text_runtime_openvino.py``; the rates are in BENCHMARKS.md). Elsewhere it runs float32.

Runtimes: ``torch`` (eager PyTorch), ``onnxruntime``, ``openvino``, and ``auto`` = on the CPU,
OpenVINO when installed and the CPU has native bf16, else ONNX Runtime when installed, else
PyTorch (logged; the feature sidecar records which ran, and at what inference precision).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch

from .errors import ModelError
from .runtime_sessions import OrtSession, OvSession  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8")
OPSET = 17


def cache_dir(folder: str | Path | None = None) -> Path:
    """The project's cache folder: ``folder`` when given, else ``$XDG_CACHE_HOME/crossmodal``
    (``~/.cache/crossmodal``)."""
    if folder is not None:
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crossmodal"


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, or None."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


def openvino_bf16() -> bool:
    """Whether OpenVINO is installed and this CPU runs bf16 matmuls natively (AVX512-BF16, AMX)."""
    if openvino_version() is None:
        return False
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError as e:  # no CPU plugin in this build: auto passes OpenVINO by
        log.info("OpenVINO cannot query the CPU (%s): not using it", str(e).strip().splitlines()[0][:200])
        return False


def resolve_runtime(runtime: str, device, precision: str = "fp32") -> str:
    """``torch``, ``onnxruntime`` or ``openvino`` for a requested ``runtime`` on ``device``.
    ``auto`` on the CPU: OpenVINO when installed and the CPU has native bf16 (:func:`openvino_bf16`),
    else ONNX Runtime when installed, else PyTorch; ``int8`` needs ONNX Runtime on the CPU."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    cpu = torch.device(device).type == "cpu"
    have = onnxruntime_version() is not None
    if precision == "int8" and (runtime == "torch" or not cpu or not have):
        raise ModelError("int8 precision runs through ONNX Runtime on the CPU: pip install onnxruntime onnx "
                         "(requirements.txt pins them), use --device cpu, and not --runtime torch")
    if runtime == "onnxruntime" and not (cpu and have):
        raise ModelError("--runtime onnxruntime needs the CPU and the packages onnxruntime and onnx "
                         "(pip install them: requirements.txt pins them)" if cpu else
                         "--runtime onnxruntime runs on the CPU only; use --runtime torch on a GPU")
    if runtime == "openvino" and (precision != "fp32" or not cpu or openvino_version() is None):
        raise ModelError("--runtime openvino runs fp32 models on the CPU and needs the package openvino "
                         "(pip install it: requirements.txt pins it)" if cpu else
                         "--runtime openvino runs on the CPU only; use --runtime torch on a GPU")
    if runtime == "auto" and cpu and precision == "fp32" and openvino_bf16():
        return "openvino"
    if runtime == "auto":
        if cpu and not have:
            log.info("ONNX Runtime is not installed: encoding with PyTorch (pip install onnxruntime onnx for a "
                     "faster CPU path with the same vectors)")
        return "onnxruntime" if cpu and have else "torch"
    return runtime


def weights_digest(module) -> str:
    """sha256 (16 hex digits) of a module's state dict: names, dtypes, shapes and bytes, so an
    export is identified by the weights it was made from, wherever they were loaded from."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


EXPORT_WAIT_S = 600  # how long a run waits for another process making the same export (shards starting together)
_STORAGE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


class ExportStorageError(ModelError):
    """The export cache cannot hold a new export (read-only, not writable, or full)."""


def export_onnx(module, example: dict, outputs: list[str], dynamic: dict, tag: str, precision: str = "fp32",
                folder: str | Path | None = None, digest: str | None = None, force: bool = False,
                full: bool = False) -> tuple[Path, dict]:
    """The ONNX export of ``module`` (made now, or reused from the cache): its path and job.

    ``module(**example)`` must return the tensor named ``outputs[0]`` (or a model output whose
    first field it is);
    ``example`` maps input names to example tensors; ``dynamic`` maps every input and output name
    to its dynamic axes (``{0: "batch", 1: "tokens"}``). ``tag`` names the file
    (``<cache>/onnx/<tag>-<job digest>.onnx``). ``int8`` quantises the fp32 export (dynamic, int8
    weights; the fp32 file is hashed in full first). ``force``: make it again; ``full``: verify a
    cached export by its whole digest, not its size and mtime. Waits up to ``EXPORT_WAIT_S`` for
    another process making the same export (then :class:`crossmodal.outputs.OutputBusyError`). A
    cache that cannot be written (read-only, full) is :class:`ExportStorageError`, naming the
    path and the space the export needs; a finished export in a read-only cache is still used.
    """
    from .outputs import json_digest

    digest = digest or weights_digest(module)
    names = list(example)
    job = {"kind": "onnx-export", "weights_sha256_16": digest, "inputs": names, "outputs": outputs, "opset": OPSET,
           "torch": torch.__version__.split("+")[0], "precision": precision}
    if precision == "int8":
        job["onnxruntime"] = onnxruntime_version()
    path = cache_dir(folder) / "onnx" / f"{tag}-{json_digest(job)}.onnx"
    try:
        _make_export(module, example, outputs, dynamic, tag, precision, folder, digest, job, path, force, full)
    except (OSError, ExportStorageError) as e:
        from .outputs import DiskFullError, remove, tmp_path

        if isinstance(e, ExportStorageError) or not (isinstance(e, DiskFullError) or e.errno in _STORAGE_ERRNOS):
            raise
        remove(tmp_path(path))
        raise ExportStorageError(_storage_line(path, module, precision, e)) from None
    return path, job


def _make_export(module, example, outputs, dynamic, tag, precision, folder, digest, job, path, force, full) -> None:
    from .outputs import OutputBusyError, check, locked, publish, tmp_path

    side, what = path.with_suffix(".json"), f"ONNX export {path}"
    if not force:  # a finished export is read under a shared lock: it works in a read-only cache too
        try:
            with locked(path, shared=True, what=what):
                if check(side, job, what=what, full=full):
                    return
        except OutputBusyError:  # being made now: wait for it below
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path, what=what, wait=EXPORT_WAIT_S):
        if check(side, job, force, what=what, full=full):
            return
        tmp = tmp_path(path)
        if precision == "int8":
            fp32, _ = export_onnx(module, example, outputs, dynamic, tag, "fp32", folder, digest, full=True)
            log.info("quantising %s to int8 (dynamic) -> %s", fp32.name, path)
            _quantise(fp32, tmp)
        else:
            log.info("exporting %s to ONNX (once per weights) -> %s", tag, path)
            _export(module, example, outputs, dynamic, tmp)
        publish(side, {"job": job, "tag": tag}, {path: tmp})


def _storage_line(path: Path, module, precision: str, e: OSError) -> str:
    """One line: the export cache cannot be written, with the path, the space needed and free."""
    from .cli import free_mb

    need = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    need = need * 5 // 4 if precision == "int8" else need  # the fp32 export first, then the int8 one
    free = free_mb(path.parent)
    free = "" if free is None else f", {free:.1f} MB free"
    reason = "no space left on the device" if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        "no space" in str(e) else (e.strerror or str(e))
    return (f"the ONNX export cache cannot be written ({reason}): {path} needs about {need / 1e6:.1f} MB{free}; "
            "give --cache-dir a writable folder (or set XDG_CACHE_HOME), or use --runtime torch")


class _Named(torch.nn.Module):
    """``forward(*tensors)`` -> ``module(**dict(zip(names, tensors)))``: the exporter passes inputs
    by position, transformers' models take them by name."""

    def __init__(self, module, names):
        super().__init__()
        self.module, self.names = module, list(names)

    def forward(self, *xs):
        out = self.module(**dict(zip(self.names, xs, strict=True)))
        return out if torch.is_tensor(out) else out[0]  # a model output's first field


def _export(module, example: dict, outputs: list[str], dynamic: dict, out: Path) -> None:
    try:
        import onnx  # noqa: F401 (the exporter needs it)
    except ImportError:
        raise ModelError("exporting to ONNX needs the package onnx (pip install it: requirements.txt pins it), "
                         "or --runtime torch") from None
    was_training = module.training
    wrapper = _Named(module, example).eval()  # eval: the exporter restores the wrapper's mode afterwards
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(example.values()), str(out), dynamo=False, opset_version=OPSET,
                              input_names=list(example), output_names=outputs, dynamic_axes=dynamic,
                              do_constant_folding=True)
    except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as e:
        out.unlink(missing_ok=True)
        raise ModelError(f"the ONNX export into {out} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "use --runtime torch") from None
    finally:
        module.train(was_training)


def _quantise(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # its advice to pre-process, printed through the root logger
        try:
            quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)


def start_session(module, example: dict, tag: str, runtime: str = "onnxruntime", precision: str = "fp32",
                  folder: str | Path | None = None, required: bool = True, output: str = "last_hidden_state",
                  axes: dict | None = None) -> tuple[Path | None, object]:
    """Export a module whose first output is ``output`` (default ``last_hidden_state`` (B, T, H))
    (once per weights: :func:`export_onnx`, inputs and output dynamic in ``axes``, default batch
    and tokens: ``{0: "batch", 1: "tokens"}``) and open an :class:`OrtSession` (``runtime``
    ``onnxruntime``) or :class:`OvSession` (``openvino``) over it. The bytes the session loaded
    must have the digest recorded when the export was made: an export edited since (even with its
    size and mtime kept) is made again (logged), or refused in one line when it cannot be. When
    not ``required`` (runtime ``auto``), a failure is logged and gives ``(None, None)``: the
    caller runs PyTorch, and its sidecar says so."""
    from .outputs import OutputBusyError

    dynamic = {n: dict(axes or {0: "batch", 1: "tokens"}) for n in [*example, output]}
    try:
        path, _ = export_onnx(module, example, [output], dynamic, tag, precision, folder)
        session = _open(path, runtime)
        if session.sha256_16 != exported_digest(path):
            log.warning("%s does not hold the bytes it was exported with (digest %s, recorded %s: edited or damaged "
                        "since): exporting it again", path, session.sha256_16, exported_digest(path))
            path, _ = export_onnx(module, example, [output], dynamic, tag, precision, folder, force=True)
            session = _open(path, runtime)
            if session.sha256_16 != exported_digest(path):
                raise ModelError(f"{path} changed while it was loaded (digest {session.sha256_16}, recorded "
                                 f"{exported_digest(path)}): is another program writing the export cache?")
        return path, session
    except (ModelError, OutputBusyError) as e:
        if required:
            raise
        log.warning("%s unavailable (%s): encoding with PyTorch", runtime, e)
        return None, None


def _open(path: Path, runtime: str):
    return (OvSession if runtime == "openvino" else OrtSession)(path)


def exported_digest(path: Path) -> str | None:
    """The digest (sha256, 16 hex digits) an export's sidecar recorded when it was made, or None."""
    from .outputs import read_sidecar

    rec = ((read_sidecar(Path(path).with_suffix(".json")) or {}).get("files") or {}).get(Path(path).name)
    return rec.get("sha256") if isinstance(rec, dict) else None


def start_onnxruntime(module, example: dict, tag: str, precision: str = "fp32", folder: str | Path | None = None,
                      required: bool = True, **kw) -> tuple[Path | None, OrtSession | None]:
    """:func:`start_session` with ONNX Runtime (``kw``: its ``output`` and ``axes``)."""
    return start_session(module, example, tag, "onnxruntime", precision, folder, required, **kw)


def runtime_record(runtime: str, precision: str = "fp32", export: Path | None = None,
                   threads: int | None = None, inference_precision: str | None = None, session=None) -> dict:
    """What a feature sidecar records of the runtime that made its vectors (OpenVINO: the
    precision its matmuls ran at, ``inference_precision``). ``export_sha256_16`` is the digest of
    the bytes the ``session`` loaded (what ran), never a digest copied from the export's sidecar."""
    if runtime == "torch":
        return {"name": "torch", "version": torch.__version__, "threads": torch.get_num_threads()}
    from .outputs import read_sidecar

    if session is not None:
        export, threads = session.path, session.threads
        inference_precision = getattr(session, "precision", inference_precision)
    side = read_sidecar(export.with_suffix(".json")) or {}
    version = openvino_version() if runtime == "openvino" else onnxruntime_version()
    extra = {"inference_precision": inference_precision} if runtime == "openvino" else {}
    return {"name": runtime, "version": version, "precision": precision, **extra, "threads": threads,
            "export": export.name, "export_sha256_16": getattr(session, "sha256_16", None),
            "weights_sha256_16": (side.get("job") or {}).get("weights_sha256_16")}


def runtime_identity(record: dict | None) -> dict | None:
    """What must be equal for two blocks of rows to come from one runtime (one output, one
    runtime: a resume or a shard merge across runtimes would mix their last bits): the runtime
    record less its thread count."""
    if not isinstance(record, dict):
        return None
    return {k: v for k, v in record.items() if k != "threads"}

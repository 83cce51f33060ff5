"""Faster CPU runtimes for the encoders, at equal output: ONNX Runtime and OpenVINO.

An encoder's PyTorch module is exported once to ONNX (``torch.onnx.export``) and run by ONNX
Runtime or OpenVINO (which reads the same export) on the CPU. The export is an output like any
other (:mod:`crossmodal.outputs`): locked while it is made, published whole with a sidecar, and
identified by its *job*: the digest of the weights it was made from (:func:`weights_digest`), its
inputs, opset and exporter version, and its precision. It lives in the cache folder
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

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError

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


def export_onnx(module, example: dict, outputs: list[str], dynamic: dict, tag: str, precision: str = "fp32",
                folder: str | Path | None = None, digest: str | None = None) -> tuple[Path, dict]:
    """The ONNX export of ``module`` (made now, or reused from the cache): its path and job.

    ``module(**example)`` must return the tensor named ``outputs[0]`` (or a model output whose
    first field it is);
    ``example`` maps input names to example tensors; ``dynamic`` maps every input and output name
    to its dynamic axes (``{0: "batch", 1: "tokens"}``). ``tag`` names the file
    (``<cache>/onnx/<tag>-<job digest>.onnx``). ``int8`` quantises the fp32 export (dynamic, int8
    weights). Raises :class:`crossmodal.outputs.OutputBusyError` while another process makes it.
    """
    from .outputs import check, json_digest, locked, publish, tmp_path

    digest = digest or weights_digest(module)
    names = list(example)
    job = {"kind": "onnx-export", "weights_sha256_16": digest, "inputs": names, "outputs": outputs, "opset": OPSET,
           "torch": torch.__version__.split("+")[0], "precision": precision}
    if precision == "int8":
        job["onnxruntime"] = onnxruntime_version()
    path = cache_dir(folder) / "onnx" / f"{tag}-{json_digest(job)}.onnx"
    side = path.with_suffix(".json")
    with locked(path, what=f"ONNX export {path}"):
        if check(side, job, what=f"ONNX export {path}"):
            return path, job
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(path)
        if precision == "int8":
            fp32, _ = export_onnx(module, example, outputs, dynamic, tag, "fp32", folder, digest)
            log.info("quantising %s to int8 (dynamic) -> %s", fp32.name, path)
            _quantise(fp32, tmp)
        else:
            log.info("exporting %s to ONNX (once per weights) -> %s", tag, path)
            _export(module, example, outputs, dynamic, tmp)
        publish(side, {"job": job, "tag": tag}, {path: tmp})
    return path, job


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


class OrtSession:
    """An ONNX Runtime CPU session over an export. ``run(feeds)`` -> the first output (np.ndarray)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # idle threads sleep instead of spinning: on a shared or busy CPU, spinning threads took the
        # cores from the working ones (1.2-1.3x faster with it off on 2 loaded cores, bench.text_runtimes)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a corrupt or foreign file
            raise ModelError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.path, self.threads = Path(path), opts.intra_op_num_threads
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict) -> np.ndarray:
        return self.session.run(None, {k: np.ascontiguousarray(feeds[k]) for k in self.inputs})[0]


class OvSession:
    """An OpenVINO CPU model compiled from an ONNX export: bf16 matmuls where the CPU has them
    (``precision``: what OpenVINO chose, ``bf16`` or ``f32``). ``run(feeds)`` -> the first output."""

    def __init__(self, path: str | Path, threads: int | None = None, hint: str | None = None):
        """``hint``: ``f32`` forces float32 matmuls (the benchmark's comparison); default: bf16
        where the CPU has it."""
        import openvino as ov

        core, self.threads = ov.Core(), threads or torch.get_num_threads()
        hint = hint or ("bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32")
        try:
            self.model = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": self.threads,
                                                               "INFERENCE_PRECISION_HINT": hint,
                                                               "PERFORMANCE_HINT": "LATENCY"})
        except Exception as e:  # OpenVINO raises RuntimeError and its own types for a corrupt file
            raise ModelError(f"OpenVINO cannot load {path}: {str(e).strip().splitlines()[0][:200]}") from None
        self.path, self.precision = Path(path), self.model.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.inputs = [i.get_any_name() for i in self.model.inputs]
        self.request, self.lock = self.model.create_infer_request(), threading.Lock()

    def run(self, feeds: dict) -> np.ndarray:
        with self.lock:  # one request: one caller at a time (ONNX Runtime's sessions are thread-safe)
            out = self.request.infer({k: np.ascontiguousarray(feeds[k]) for k in self.inputs})  # copies out
        return out[self.model.outputs[0]]


def start_session(module, example: dict, tag: str, runtime: str = "onnxruntime", precision: str = "fp32",
                  folder: str | Path | None = None, required: bool = True, output: str = "last_hidden_state",
                  axes: dict | None = None) -> tuple[Path | None, object]:
    """Export a module whose first output is ``output`` (default ``last_hidden_state`` (B, T, H))
    (once per weights: :func:`export_onnx`, inputs and output dynamic in ``axes``, default batch
    and tokens: ``{0: "batch", 1: "tokens"}``) and open an :class:`OrtSession` (``runtime``
    ``onnxruntime``) or :class:`OvSession` (``openvino``) over it. When not ``required`` (runtime
    ``auto``), a failure is logged and gives ``(None, None)``: the caller runs PyTorch, and its
    sidecar says so."""
    from .outputs import OutputBusyError

    dynamic = {n: dict(axes or {0: "batch", 1: "tokens"}) for n in [*example, output]}
    try:
        path, _ = export_onnx(module, example, [output], dynamic, tag, precision, folder)
        return path, (OvSession if runtime == "openvino" else OrtSession)(path)
    except (ModelError, OutputBusyError) as e:
        if required:
            raise
        log.warning("%s unavailable (%s): encoding with PyTorch", runtime, e)
        return None, None


def start_onnxruntime(module, example: dict, tag: str, precision: str = "fp32", folder: str | Path | None = None,
                      required: bool = True, **kw) -> tuple[Path | None, OrtSession | None]:
    """:func:`start_session` with ONNX Runtime (``kw``: its ``output`` and ``axes``)."""
    return start_session(module, example, tag, "onnxruntime", precision, folder, required, **kw)


def runtime_record(runtime: str, precision: str = "fp32", export: Path | None = None,
                   threads: int | None = None, inference_precision: str | None = None) -> dict:
    """What a feature sidecar records of the runtime that made its vectors (OpenVINO: the
    precision its matmuls ran at, ``inference_precision``)."""
    if runtime == "torch":
        return {"name": "torch", "version": torch.__version__, "threads": torch.get_num_threads()}
    from .outputs import read_sidecar

    side = read_sidecar(export.with_suffix(".json")) or {}
    version = openvino_version() if runtime == "openvino" else onnxruntime_version()
    extra = {"inference_precision": inference_precision} if runtime == "openvino" else {}
    return {"name": runtime, "version": version, "precision": precision, **extra, "threads": threads,
            "export": export.name, "export_sha256_16": (side.get("files") or {}).get(export.name, {}).get("sha256"),
            "weights_sha256_16": (side.get("job") or {}).get("weights_sha256_16")}

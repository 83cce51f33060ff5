"""Sessions over an ONNX export (:mod:`crossmodal.runtimes`): ONNX Runtime and OpenVINO on the CPU.

A session reads the export's bytes once, hashes them (``sha256_16``: the digest of what it runs,
which the feature sidecar records and :func:`crossmodal.runtimes.start_session` compares with the
digest recorded when the export was made) and loads the model from those same bytes, so a file
edited after the check can never be what runs.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError


def _read(path: str | Path) -> tuple[bytes, str]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read the ONNX export {path}: {e.strerror or e}") from None
    return data, hashlib.sha256(data).hexdigest()[:16]


class OrtSession:
    """An ONNX Runtime CPU session over an export. ``run(feeds)`` -> the first output (np.ndarray).
    ``sha256_16``: the digest of the bytes it loaded."""

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
        data, self.sha256_16 = _read(path)
        try:
            self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a corrupt or foreign file
            raise ModelError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.path, self.threads = Path(path), opts.intra_op_num_threads
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict) -> np.ndarray:
        return self.session.run(None, {k: np.ascontiguousarray(feeds[k]) for k in self.inputs})[0]


class OvSession:
    """An OpenVINO CPU model compiled from an ONNX export: bf16 matmuls where the CPU has them
    (``precision``: what OpenVINO chose, ``bf16`` or ``f32``). ``run(feeds)`` -> the first output.
    ``sha256_16``: the digest of the bytes it compiled."""

    def __init__(self, path: str | Path, threads: int | None = None, hint: str | None = None):
        """``hint``: ``f32`` forces float32 matmuls (the benchmark's comparison); default: bf16
        where the CPU has it."""
        import openvino as ov

        core, self.threads = ov.Core(), threads or torch.get_num_threads()
        hint = hint or ("bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32")
        data, self.sha256_16 = _read(path)
        try:
            self.model = core.compile_model(core.read_model(data), "CPU", {"INFERENCE_NUM_THREADS": self.threads,
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

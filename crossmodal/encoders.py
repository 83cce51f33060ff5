"""Encoders' identity: what a feature sidecar records about the encoder that made it, and the
same encoder rebuilt from that record, for both sides (images and captions).

- :func:`encoder_identity`: what makes two feature files interchangeable (a checkpoint records it
  for the features it was trained on; :func:`check_features_fit` refuses features that differ);
- :func:`image_encoder_from_sidecar`, :func:`text_encoder_from_sidecar`: the encoder a feature
  file's sidecar describes, rebuilt to encode new inputs (uploads, typed sentences), and checked
  against the record (:func:`differences`): a rebuilt encoder that would embed otherwise is refused.

The encoder classes themselves live in :mod:`crossmodal.image_encoders` and
:mod:`crossmodal.text_encoders`; they are imported only when an encoder is rebuilt.
"""

from __future__ import annotations

from pathlib import Path

from .errors import FeatureError, ModelError
from .outputs import diff


def encoder_identity(meta: dict) -> dict:
    """What makes two feature files interchangeable: encoder, settings, weights and dim."""
    return {k: meta.get(k) for k in ("kind", "encoder", "settings", "weights", "dim")}


def check_features_fit(ck: dict, img_meta: dict, txt_meta: dict, where: str) -> None:
    """Refuse features of another encoder, settings, weights or dim than the checkpoint was trained
    on; the error names each differing field with both values (``weights.sha256_16: "a1" -> "b2"``)."""
    for key, meta, what in (("img_features", img_meta, "image"), ("txt_features", txt_meta, "caption")):
        want, got = ck[key], encoder_identity(meta)
        if want != got:
            changes = diff(want, got)
            fields = sorted({c.split(":")[0].split(".")[0] for c in changes})
            raise FeatureError(
                f"{what} features {where} differ from the checkpoint's in {', '.join(fields)} (checkpoint -> "
                f"features: {'; '.join(changes[:4])}{'; ...' if len(changes) > 4 else ''}): use the features the "
                "run was trained on, or retrain")


def differences(recorded: dict, rebuilt: dict) -> list[str]:
    """Keys in which a rebuilt encoder (its ``describe()``) differs from the one a feature file
    records. Paths (``file``, ``name_or_path``) may move between machines; digests and settings may not."""
    diff = [k for k in ("encoder", "settings") if recorded.get(k) != rebuilt.get(k)]
    rw, bw = recorded.get("weights") or {}, rebuilt.get("weights") or {}
    skip = {"file", "name_or_path"} if "sha256_16" in rw or "name_or_path" in rw else set()
    if {k: v for k, v in rw.items() if k not in skip} != {k: v for k, v in bw.items() if k not in skip}:
        diff.append("weights")
    return diff


def check_rebuilt(encoder, meta: dict, what: str) -> None:
    """Refuse a rebuilt ``what`` (``"image"``/``"caption"``) encoder that differs from ``meta``'s record."""
    diff = differences(meta, encoder.describe())
    if diff:
        raise ModelError(f"the rebuilt {what} encoder differs from the one that made {what} features "
                         f"({meta.get('encoder')}) in {', '.join(diff)}")


def text_encoder_from_sidecar(features_meta: dict, features_path: str | Path | None = None):
    """Rebuild the caption encoder a run's features came from, to encode new sentences. A trained
    fastText model is found from the feature file's folder (``features_path``); its digest must be
    the one the features were made with."""
    from .store import file_digest
    from .text_encoders import BertEncoder, FastTextEncoder

    w, s = features_meta["weights"], features_meta["settings"]
    if features_meta["encoder"] != "fasttext":
        return BertEncoder(w["model"], pooling=s["pooling"], max_length=s["max_length"],
                           precision=s.get("precision", "fp32"))  # int8 features: queries encoded the same way
    rel = Path(features_meta.get("text_model_path") or w["file"])
    model = rel if rel.is_absolute() or features_path is None else Path(features_path).parent / rel
    if not model.is_file():
        raise ModelError(f"the fastText model the caption features were made with is not at {model}")
    if file_digest(model) != w.get("sha256_16"):
        raise ModelError(f"fastText model {model} is not the one the caption features were made with (digest "
                         f"{file_digest(model)}, expected {w.get('sha256_16')})")
    return FastTextEncoder(model, info={k: v for k, v in w.items() if k not in ("file", "sha256_16")})


def image_settings(features_meta: dict, detector_weights: str | None = None, where: str = "") -> dict:
    """The keyword arguments of :func:`crossmodal.image_encoders.build_image_encoder` that rebuild
    the encoder an image feature sidecar records. Faster R-CNN weights from a file must be given
    again (``detector_weights``, ``--detector-weights``); random weights (a test run) cannot be."""
    s = dict(features_meta.get("settings") or {})
    weights = features_meta.get("weights") or {}
    if features_meta["encoder"] != "fasterrcnn":
        return {"input_size": s.get("input_size"), "levels": s.get("levels"), "region_pool": s.get("pool")}
    src = weights.get("source")
    if src == "file" and not detector_weights:
        raise ModelError(f"the image features {where}come from Faster R-CNN weights in a file "
                         f"({weights.get('file')}): give the same file to --detector-weights")
    if src == "random":
        raise ModelError("the image features come from a Faster R-CNN with random weights (a test run)")
    return {"detector_weights": detector_weights or "torchvision", "detector_version": s.get("arch"),
            "top_n": s.get("top_n"), "pooling": s.get("pooling"), "min_size": s.get("min_size"),
            "max_size": s.get("max_size")}


def image_encoder_from_sidecar(features_meta: dict, detector_weights: str | None = None, where: str = ""):
    """The image encoder a feature sidecar records, rebuilt (eval mode) and checked against it."""
    from .image_encoders import build_image_encoder

    encoder = build_image_encoder(features_meta["encoder"], **image_settings(features_meta, detector_weights, where))
    check_rebuilt(encoder, features_meta, "image")
    return encoder.eval()


def checked_text_encoder(features_meta: dict, features_path: str | Path | None = None):
    """:func:`text_encoder_from_sidecar`, checked against the record like the image side."""
    encoder = text_encoder_from_sidecar(features_meta, features_path)
    check_rebuilt(encoder, features_meta, "caption")
    return encoder

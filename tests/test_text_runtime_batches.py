"""Caption batches sorted by token count: every caption once, each batch padded only to its own
longest caption, and padding never changes a vector (batched = one caption at a time)."""

import numpy as np
import pytest

from crossmodal.coco import load_split
from crossmodal.text_batches import token_sorted_batches


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


NORM_TOLERANCE = 0.01  # |norm(got) / norm(ref) - 1| on every row


def assert_same_vectors(ref, got) -> None:
    """The project's equal-output bar between a runtime and PyTorch (``ref``), on every row of
    (N, D) arrays: cosine >= 0.9999 (DESIGN) and the same length, norm ratio within 1%: a
    runtime whose output is scaled (x1.5) has cosine 1 with PyTorch's and is not equal to it."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert got.shape == ref.shape and len(ref), (got.shape, ref.shape)
    cos = _cos(ref, got)
    assert cos.min() >= 0.9999, f"cosine to PyTorch {cos.min():.6f} on row {cos.argmin()}"
    ratio = np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    worst = np.abs(ratio - 1).argmax()
    assert abs(ratio[worst] - 1) <= NORM_TOLERANCE, f"norm ratio to PyTorch {ratio[worst]:.6f} on row {worst}"


def _captions(root) -> list[str]:
    """Real-ish captions of every length: the generated dataset's, a few very short ones, and
    long ones cut at max_length (so batches mix padding lengths up to the cap)."""
    caps = list(load_split(root, "val").captions)
    long = " ".join(caps[:6])  # ~60 words: truncated
    return [*caps, "a", "dog .", long, long.upper(), "A man on a horse, 2 dogs & a cat!", "ünïcödé café"]


def assert_equal_on_every_row(ref_enc, enc, root, batch_size: int) -> None:
    """``enc`` gives ``ref_enc``'s (PyTorch's) vectors, cosine >= 0.9999 on every row, at ``batch_size``."""
    caps = _captions(root)[-(12 if batch_size == 1 else 48):]  # one at a time: a sample
    ref, got = ref_enc.encode(caps, batch_size=batch_size), enc.encode(caps, batch_size=batch_size)
    assert got.shape == ref.shape == (len(caps), 384) and got.dtype == np.float32
    assert_same_vectors(ref, got)


def assert_equal_with_pooling_and_length(ref_enc, enc, root, pooling: str, max_length: int) -> None:
    """The same with another pooling and padding length (both encoders set back to mean, 64 after)."""
    caps = _captions(root)[:40]
    for e in (ref_enc, enc):
        e.pooling, e.max_length = pooling, max_length
    try:
        assert_same_vectors(ref_enc.encode(caps, batch_size=16), enc.encode(caps, batch_size=16))
    finally:
        for e in (ref_enc, enc):
            e.pooling, e.max_length = "mean", 64


@pytest.fixture(scope="module")
def encoder():
    from crossmodal.text_encoders import BertEncoder

    return BertEncoder(runtime="torch")


def test_batches_cover_every_caption_once_and_pad_to_their_longest(encoder, small_root):
    caps = _captions(small_root)
    batches = list(token_sorted_batches(encoder.tokenizer, caps, 7, 16))
    rows = np.concatenate([r for r, _ in batches])
    assert sorted(rows.tolist()) == list(range(len(caps)))
    widths = [f["input_ids"].shape[1] for _, f in batches]
    assert widths == sorted(widths) and max(widths) == 16  # shortest first; the long captions cut at 16
    for r, f in batches:
        lengths = f["attention_mask"].sum(1)
        assert f["input_ids"].dtype == np.int64 and lengths.max() == f["input_ids"].shape[1]
        single = [encoder.tokenizer(caps[i], truncation=True, max_length=16)["input_ids"] for i in r]
        assert [len(s) for s in single] == lengths.tolist()
        assert all((f["input_ids"][j, : len(s)] == s).all() for j, s in enumerate(single))


def test_far_less_padding_than_sorting_by_characters(encoder, small_root):
    caps = list(load_split(small_root, "val").captions)
    tok = encoder.tokenizer
    padded = sum(f["input_ids"].size for _, f in token_sorted_batches(tok, caps, 8, 64))
    real = sum(len(x) for x in tok(caps)["input_ids"])
    by_chars = np.argsort([len(c) for c in caps], kind="stable")  # the order before
    old = sum(tok([caps[i] for i in by_chars[s : s + 8]], padding=True, return_tensors="np")["input_ids"].size
              for s in range(0, len(caps), 8))
    assert real <= padded and padded - real < (old - real) / 2


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_never_changes_a_vector(encoder, small_root, pooling):
    caps = _captions(small_root)[-30:]
    encoder.pooling = pooling
    try:
        batched = encoder.encode(caps, batch_size=30)
        single = np.concatenate([encoder.encode([c], batch_size=1) for c in caps])
    finally:
        encoder.pooling = "mean"
    assert batched.shape == (30, 384)
    assert_same_vectors(single, batched)
    assert encoder.encode([]).shape == (0, 384)

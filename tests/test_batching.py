"""Micro-batching of concurrent queries (crossmodal.batching): each caller gets its own row, a
bad item fails only its caller, batches are bounded, shutdown is clean, and a batched query
equals the same query alone (BERT with padding, EfficientNet-Lite) to a stated tolerance."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from crossmodal.batching import MicroBatcher, QueryEncoders, batcher
from tests.test_serve import serve_run_dir  # noqa: F401  (the session fixture: a small trained run)

SENTENCES = ["a dog", "two cats sitting on a red sofa next to a window in the afternoon sun",
             "A man riding a wave on top of a surfboard.", "people", "a very long sentence " * 20,
             "Kitchen with white cabinets, a stove and a refrigerator", "x", "a bus"]


def _until(pred, what: str) -> None:
    """Poll ``pred`` (a generous bound, only against a hang: not a timing assertion)."""
    for _ in range(5000):
        if pred():
            return
        time.sleep(0.002)
    raise AssertionError(f"never happened: {what}")


def _wait_queued(b: MicroBatcher, n: int) -> None:
    _until(lambda: len(b._queue) >= n, f"{n} items queued")


def _call_all(b, items) -> tuple[dict, dict]:
    """Each item from its own thread -> ({item: row}, {item: exception})."""
    rows, errors = {}, {}

    def one(x):
        try:
            rows[x] = b(x)
        except Exception as e:
            errors[x] = e

    threads = [threading.Thread(target=one, args=(x,)) for x in items]
    for t in threads:
        t.start()
    return rows, errors, threads


def _held_batcher(fn, max_batch=16, **kw):
    """A batcher whose first call blocks until released, so that the next callers queue behind it."""
    gate, sizes = threading.Event(), []

    def held(items):
        sizes.append(len(items))
        if items == ["first"]:
            assert gate.wait(10)
        return fn(items)

    b = MicroBatcher(held, max_batch=max_batch, **kw)
    first = threading.Thread(target=b, args=("first",))
    first.start()
    return b, gate, sizes, first


def test_concurrent_callers_are_batched_and_each_gets_its_own_row():
    b, gate, sizes, first = _held_batcher(lambda items: [f"row of {x}" for x in items], max_wait_ms=0)
    _until(lambda: sizes, "the first call is in fn")
    items = [f"q{i}" for i in range(6)]
    rows, errors, threads = _call_all(b, items)
    _wait_queued(b, 6)
    gate.set()
    for t in [first, *threads]:
        t.join(10)
    assert not errors and rows == {x: f"row of {x}" for x in items}
    assert sizes == [1, 6]  # the six that queued while the first ran went in one call
    assert b.stats == {"batches": 2, "items": 7, "largest": 6}
    b.close()


def test_a_bad_item_fails_only_its_caller():
    def fn(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    b, gate, sizes, first = _held_batcher(fn, max_wait_ms=0)
    _until(lambda: sizes, "the first call is in fn")
    rows, errors, threads = _call_all(b, ["a", "bad", "c"])
    _wait_queued(b, 3)
    gate.set()
    for t in [first, *threads]:
        t.join(10)
    assert rows == {"a": "A", "c": "C"}
    assert set(errors) == {"bad"} and isinstance(errors["bad"], ValueError)
    assert sizes[1] == 3 and sorted(sizes[2:]) == [1, 1, 1]  # the failed batch, then each item alone
    assert b("d") == "D"  # the worker lives on
    b.close()


def test_batches_are_bounded_and_rows_count_is_checked():
    b, gate, sizes, first = _held_batcher(lambda items: [x for x in items], max_batch=3, max_wait_ms=0)
    _until(lambda: sizes, "the first call is in fn")
    rows, errors, threads = _call_all(b, list(range(8)))
    _wait_queued(b, 8)
    gate.set()
    for t in [first, *threads]:
        t.join(10)
    assert not errors and rows == {i: i for i in range(8)}
    assert max(sizes) == 3 and sum(sizes) == 9
    b.close()
    short = MicroBatcher(lambda items: [], max_batch=4)  # a wrong fn: its callers get an error, none hangs
    with pytest.raises(RuntimeError, match="1 items gave 0 rows"):
        short("x")
    short.close()


def _lone_waits(wait_ms: float, n: int) -> list[float]:
    """``n`` callers one after another, each alone in the batcher: the seconds each was queued."""
    b = MicroBatcher(lambda items: [len(items)] * len(items), max_batch=8, max_wait_ms=wait_ms)
    waits = []
    for i in range(n):
        row, meta = b.submit(f"alone {i}")
        assert row == 1 and meta["batch"] == 1  # it went alone
        waits.append(meta["wait"])
    b.close()
    return waits


def test_a_lone_caller_without_a_window_is_encoded_at_once():
    """The default (no window): a lone query is not held back. The shortest of five waits is
    compared, so a slow thread switch on a loaded machine does not fail it; a batcher that holds
    a lone caller for any real time does."""
    assert min(_lone_waits(0, 5)) < 0.25


def test_a_lone_caller_waits_the_window_then_goes_alone():
    """With ``max_wait_ms`` a lone query waits for company that long (never less: else nobody could
    join it) and then goes alone, not longer (the shortest of three waits, well under the window
    plus half a second)."""
    waits = _lone_waits(300, 3)
    assert all(w >= 0.3 - 1e-3 for w in waits), waits
    assert min(waits) < 0.3 + 0.5, waits


def test_close_encodes_what_is_queued_then_refuses():
    b, gate, sizes, first = _held_batcher(lambda items: [x * 2 for x in items], max_wait_ms=0)
    _until(lambda: sizes, "the first call is in fn")
    rows, errors, threads = _call_all(b, [1, 2, 3])
    _wait_queued(b, 3)
    closer = threading.Thread(target=b.close)
    closer.start()
    gate.set()
    for t in [first, closer, *threads]:
        t.join(10)
    assert rows == {1: 2, 2: 4, 3: 6} and not errors
    assert not b._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        b(4)
    b.close()  # idempotent


def test_unbatched_runs_at_most_parallel_calls_at_once():
    inside, peak, lock, go = [0], [0], threading.Lock(), threading.Event()

    def fn(items):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        go.wait(10)
        with lock:
            inside[0] -= 1
        return items

    for max_batch, parallel, want in ((1, 2, 2), (0, 2, 1)):  # batch size 0: one at a time whatever parallel
        peak[0] = 0
        go.clear()
        b = batcher(fn, max_batch=max_batch, max_wait_ms=0, name="t", parallel=parallel)
        rows, errors, threads = _call_all(b, [1, 2, 3])
        _until(lambda want=want: inside[0] == want, f"{want} calls inside")
        go.set()
        for t in threads:
            t.join(10)
        assert peak[0] == want and rows == {1: 1, 2: 2, 3: 3} and not errors


def test_batcher_off_is_one_at_a_time():
    calls = []
    b = batcher(lambda items: calls.append(len(items)) or items, max_batch=0, max_wait_ms=5, name="off")
    row, meta = b.submit("a")
    assert row == "a" and meta["batch"] == 1 and b("b") == "b"
    assert calls == [1, 1]
    with pytest.raises(ValueError):
        MicroBatcher(lambda x: x, max_batch=0)


# --- equal output ------------------------------------------------------------------------------

# Tolerances: a sentence's MiniLM vector in a batch (padded to the batch's longest sentence, mean
# pooled over the attention mask) against the same sentence alone. Measured on this machine: at most
# 1.4e-6 absolute (8e-7 of the largest component) with PyTorch, 0 with ONNX Runtime fp32; the bound
# is 7x the largest difference seen.
TEXT_ATOL = 1e-5
# EfficientNet-Lite0 features (largest components ~5): identical here (difference 0 at 128 and 256 px);
# the bound leaves room for a CPU whose oneDNN picks other kernels for another batch size
IMAGE_ATOL = 1e-5


@pytest.mark.parametrize("runtime", ["torch", "auto"])
def test_batched_text_rows_equal_single_queries(runtime):
    from crossmodal.text_encoders import BertEncoder

    torch.manual_seed(0)
    enc = BertEncoder(runtime=runtime)
    head = torch.nn.Linear(enc.dim, 16).eval()
    qe = QueryEncoders(SimpleNamespace(text_encoder=enc, txt_head=head), max_batch=8)
    alone = np.concatenate([enc.encode([s]) for s in SENTENCES])
    batched = enc.encode(SENTENCES)
    assert np.abs(batched - alone).max() <= TEXT_ATOL
    cos = (batched * alone).sum(1) / np.linalg.norm(batched, axis=1) / np.linalg.norm(alone, axis=1)
    assert cos.min() >= 0.99999
    rows = qe.text_rows(SENTENCES)  # encoder + head, as the server's batches run
    single = np.concatenate([qe.text_rows([s]) for s in SENTENCES])
    assert rows.shape == (len(SENTENCES), 16) and np.abs(rows - single).max() <= TEXT_ATOL


def test_batched_image_rows_equal_single_queries_and_group_by_shape():
    from crossmodal.image_encoders import build_image_encoder

    torch.manual_seed(0)
    enc = build_image_encoder("effnet-lite0", input_size=128).eval()
    head = torch.nn.Linear(enc.dim, 16).eval()
    qe = QueryEncoders(SimpleNamespace(image_encoder=enc, img_head=head), max_batch=8)
    xs = [torch.randn(3, 128, 128) for _ in range(5)]
    rows = qe.image_rows(xs)
    single = np.concatenate([qe.image_rows([x]) for x in xs])
    assert np.abs(rows - single).max() <= IMAGE_ATOL
    with torch.inference_mode():
        feats_b = enc(xs).numpy()
        feats_1 = np.concatenate([enc([x]).numpy() for x in xs])
    assert np.abs(feats_b - feats_1).max() <= IMAGE_ATOL

    seen = []  # a variable-size encoder (Faster R-CNN) gets only same-shape images together

    def fake(batch):
        seen.append([tuple(x.shape) for x in batch])
        return torch.stack([x.mean(dim=(1, 2)) for x in batch])

    mixed = [torch.full((3, 4, 4), 1.0), torch.full((3, 6, 4), 2.0), torch.full((3, 4, 4), 3.0)]
    qe = QueryEncoders(SimpleNamespace(image_encoder=fake, img_head=lambda f: f), max_batch=8)
    out = qe.image_rows(mixed)
    assert sorted(len(s) for s in seen) == [1, 2] and all(len(set(s)) == 1 for s in seen)
    assert out[:, 0].tolist() == [1.0, 2.0, 3.0]  # rows in the callers' order


def test_searcher_batched_queries_equal_one_at_a_time(serve_run_dir):  # noqa: F811
    """Eight concurrent text queries through a batching Searcher give the results of the same
    queries one at a time (same images in the same order, scores to 1e-4)."""
    from crossmodal.serve import Searcher

    s = Searcher.from_run(serve_run_dir["run"], "val", serve_run_dir["root"])
    texts = [s.gallery.cap_text[i] for i in range(8)]
    s.set_batching(0, 0)
    expected = [s.text_query(t, 5) for t in texts]
    photo = s.image_path(int(s.gallery.img_ids[0])).read_bytes()
    expected_up = s.upload_query(photo, 5)
    s.set_batching(8, 50, 8)  # a long wait: the eight threads meet in one or two batches
    got, threads = {}, []
    for i, t in enumerate(texts):
        threads.append(threading.Thread(target=lambda i=i, t=t: got.__setitem__(i, s.text_query(t, 5))))
    threads += [threading.Thread(target=lambda j=j: got.__setitem__(f"u{j}", s.upload_query(photo, 5)))
                for j in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert s.encoders._text.stats["largest"] >= 2
    for i, e in enumerate(expected):
        assert [r["image_id"] for r in got[i]["images"]] == [r["image_id"] for r in e["images"]]
        assert np.allclose([r["score"] for r in got[i]["images"]], [r["score"] for r in e["images"]], atol=1e-4)
        assert got[i]["ms"]["batch"] >= 1
    for j in range(3):
        assert [r["caption_id"] for r in got[f"u{j}"]["captions"]] == [r["caption_id"]
                                                                      for r in expected_up["captions"]]
    s.encoders.close()


def test_server_flags_batch_concurrent_http_queries(serve_run_dir, tmp_path):  # noqa: F811
    """``python -m crossmodal.serve --max-batch 4 ...``: /api/info says so, and eight
    concurrent text queries over HTTP answer as the same queries one after another do."""
    import json
    from urllib.parse import urlencode

    from tests.test_serve_load import request, start_server

    flags = ["--max-batch", "4", "--batch-wait-ms", "20", "--max-upload-batch", "3"]
    with start_server(serve_run_dir, tmp_path / "server.log", *flags) as (_, port):
        assert json.loads(request(port, "GET", "/api/info")[1])["batching"] == {
            "max_batch": 4, "max_image_batch": 3, "image_parallel": 1, "wait_ms": 20.0}
        paths = [f"/api/text?{urlencode({'q': f'a photo of {n} red squares', 'k': 5})}" for n in range(8)]

        def ids(body):
            return [r["image_id"] for r in json.loads(body)["images"]]

        one_by_one = [ids(request(port, "GET", p)[1]) for p in paths]
        got = {}
        threads = [threading.Thread(target=lambda i=i, p=p: got.__setitem__(i, request(port, "GET", p)))
                   for i, p in enumerate(paths)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(got[i][0] == 200 for i in range(8)), got
        assert [ids(got[i][1]) for i in range(8)] == one_by_one
        assert max(json.loads(got[i][1])["ms"]["batch"] for i in range(8)) <= 4


@pytest.mark.parametrize("flags", [["--max-batch", "-1"], ["--batch-wait-ms", "2000"], ["--batch-wait-ms", "nan"]])
def test_bad_batching_flags_exit_2_with_one_line(flags, capsys):
    from crossmodal.serve import run

    with pytest.raises(SystemExit) as e:
        run(["--run", "nowhere", "--coco-root", "nowhere", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("usage:") is False and ("--max-batch" in err[-1] or "--batch-wait-ms" in err[-1])

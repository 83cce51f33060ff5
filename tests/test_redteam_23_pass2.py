"""Issue 23, second hostile pass on the new surfaces: each test is a case that failed before its fix.

Thumbnails of replaced images, Flickr8k token lines and dataset flags, the pipeline's validation
split on Flickr8k, a split without embeddings, Flickr8k judgement files, and the server's port."""

import logging
import socket

import numpy as np
import pytest
from PIL import Image

from crossmodal.coco import load_split
from crossmodal.errors import DataError, FeatureError
from tests.flickr_fixtures import captions, make_flickr8k, photo_name, write_judgements
from tests.test_serve import serve_run_dir  # noqa: F401 (the serve tests' trained run, made once)

# --- the server's thumbnails -------------------------------------------------------------------


def test_a_replaced_image_never_gets_its_old_thumbnail(serve_run_dir, tmp_path):  # noqa: F811
    """An image replaced after its thumbnail was cached (then its features and embeddings rebuilt,
    so the server starts) was shown with its old thumbnail: the cache is keyed by the file's stat."""
    from crossmodal.searcher import Searcher

    s = Searcher.from_run(serve_run_dir["run"], "val", serve_run_dir["root"], cache_dir=tmp_path / "cache")
    iid = int(s.gallery.img_ids[0])
    src = tmp_path / "img.jpg"
    s.gallery.image_paths[iid] = src  # the split's file for this id, owned by the test
    Image.new("RGB", (64, 64), (250, 10, 10)).save(src)
    red = np.asarray(Image.open(s.thumbnail(iid))).mean(axis=(0, 1))
    Image.new("RGB", (64, 64), (10, 10, 250)).save(src)  # the same file name, another image
    blue = np.asarray(Image.open(s.thumbnail(iid))).mean(axis=(0, 1))
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0], (red, blue)
    assert np.asarray(Image.open(s.thumbnail(iid))).mean(axis=(0, 1))[2] > 200  # cached again, still right


# --- Flickr8k files and flags ------------------------------------------------------------------


def test_a_space_before_the_hash_keeps_the_caption(tmp_path):
    """``<name>.jpg #0<TAB>caption`` was read as the caption of an image named ``'<name>.jpg '``,
    in no split list, and silently dropped: the image kept four captions."""
    make_flickr8k(tmp_path)
    token = tmp_path / "Flickr8k.token.txt"
    name = photo_name(0)[1]
    token.write_text(token.read_text().replace(f"{name}#0\t", f"{name} #0\t"))
    s = load_split(tmp_path, "train")
    assert s.captions_of(photo_name(0)[0]) == captions(0)


def test_dataset_coco_on_a_flickr_root_names_the_dataset(tmp_path):
    """``--dataset coco`` on a Flickr8k root said it was not a Flickr root, 'no Flickr8k.token.txt',
    next to that very file."""
    make_flickr8k(tmp_path, images=False)
    with pytest.raises(DataError, match=r"is a flickr8k root: pass --dataset flickr8k or auto") as e:
        load_split(tmp_path, "train", dataset="coco")
    assert "nor is it a Flickr root" not in str(e.value)


def test_the_pipeline_validates_on_dev_on_flickr8k_by_default(tmp_path, monkeypatch):
    """The pipeline's help said the validation split defaults to dev on Flickr8k; it passed 'val',
    which Flickr8k has not, and stopped after building the training features."""
    from crossmodal import pipeline

    make_flickr8k(tmp_path / "f8k", images=False)
    calls = []
    monkeypatch.setattr(pipeline, "_stage", lambda script, argv: calls.append((script, argv)) or {})
    monkeypatch.setattr(pipeline, "_summary", lambda *a: {})
    monkeypatch.chdir(tmp_path)
    pipeline.run(["--coco-root", str(tmp_path / "f8k"), "--out", "x"])
    splits = {argv[argv.index(flag) + 1] for _, argv in calls for flag in ("--split", "--val-split") if flag in argv}
    assert splits == {"train", "dev"}, splits


def test_scoring_a_split_without_embeddings_names_the_stage_to_run(serve_run_dir):  # noqa: F811
    """Said 'feature file .../train_emb_img.npy does not exist (run the stage that makes it first)'."""
    from retrieve_img2text import main as score

    with pytest.raises(FeatureError, match=r"train_emb_img\.npy does not exist: .* make them with "
                                           r"get_features_captions\.py --run \S+ --split train"):
        score(["--run", str(serve_run_dir["run"]), "--split", "train"])


def test_damaged_embeddings_name_the_stage_that_makes_them(serve_run_dir, tmp_path):  # noqa: F811
    """A truncated embedding array or a garbled sidecar said '... re-run the stage that makes it' (or
    nothing): the line now names get_features_captions.py with the run and split."""
    import shutil

    from retrieve_img2text import main as score

    run = tmp_path / "run"
    shutil.copytree(serve_run_dir["run"], run, ignore=shutil.ignore_patterns("serve_cache", "*.lock"))
    (run / "embeddings" / "val_emb_text.json").write_text("{")
    with pytest.raises(FeatureError, match=r"val_emb_text\.json is not valid json.*\(embeddings are made by "
                                           r"get_features_captions\.py --run \S+ --split val\)"):
        score(["--run", str(run), "--split", "val"])


def test_a_run_moved_away_from_its_features_still_checks_the_split_data(serve_run_dir, tmp_path):  # noqa: F811
    """A run copied elsewhere (its features, recorded relative to it, gone) skipped the split-data
    check with a warning: edited captions were drawn with the old embeddings' scores (issue 23's
    case 1 again). The embeddings now record what their features were made from."""
    import json
    import shutil

    from main_retrieve import main as figures

    run = tmp_path / "deeper" / "than" / "before"
    shutil.copytree(serve_run_dir["run"], run, ignore=shutil.ignore_patterns("serve_cache", "*.lock"))
    root = tmp_path / "data"  # the same images (a link keeps their stat), captions of its own
    (root / "annotations").mkdir(parents=True)
    (root / "val").symlink_to(serve_run_dir["root"] / "val")
    ann = json.loads((serve_run_dir["root"] / "annotations" / "captions_val.json").read_text())
    (root / "annotations" / "captions_val.json").write_text(json.dumps(ann))
    query = ["--run", str(run), "--split", "val", "--coco-root", str(root), "--direction", "text2img",
             "--query-id", str(ann["annotations"][0]["id"]), "--out", str(tmp_path / "figs")]
    assert len(figures(query)) == 1  # the data as it was: drawn
    ann["annotations"][0]["caption"] = "a purple elephant eating spaghetti"
    (root / "annotations" / "captions_val.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"val_text_bert\.npy was made from other captions than .* holds now"):
        figures(query)


def test_a_flickr_run_moved_away_from_its_features_keeps_its_dataset(serve_run_dir, tmp_path):  # noqa: F811
    """``--protocol 1k`` on a Flickr8k run whose features were gone took it for COCO (the dataset was
    read only from the feature sidecar) and asked for COCO's dataset_coco.json."""
    import json

    from crossmodal.protocols import embedded_dataset

    meta = json.loads((serve_run_dir["run"] / "embeddings" / "val_emb_img.json").read_text())
    assert meta["features_job"]["source"]  # recorded when the embeddings were made
    meta["features"] = "../nowhere/val_img_x.npy"
    meta["features_job"]["source"] = "flickr8k:/data/Flickr8k.token.txt (Flickr_8k.testImages.txt)"
    assert embedded_dataset(tmp_path, meta) == "flickr8k"


def test_a_karpathy_entry_of_the_wrong_type_is_named_so(tmp_path):
    """``"sentences": "abc"`` said 'an entry lacks the field string indices must be integers'."""
    import json

    from tests.flickr_fixtures import karpathy_json

    path = karpathy_json(tmp_path / "dataset_flickr8k.json", {"train": [0, 1], "dev": [2], "test": [3]})
    data = json.loads(path.read_text())
    data["images"][0]["sentences"] = "abc"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dataset_flickr8k\.json: an entry has a field of the wrong type"):
        load_split(tmp_path, "train", karpathy_file=path)


# --- Flickr8k judgement files ------------------------------------------------------------------


def test_a_judgement_file_that_is_not_utf8_is_one_line(tmp_path):
    """A traceback (UnicodeDecodeError) before."""
    from crossmodal.judgements import read_judgements

    write_judgements(tmp_path, [(photo_name(0)[1], f"{photo_name(0)[1]}#0", (4, 4, 4))], [])
    with open(tmp_path / "ExpertAnnotations.txt", "ab") as f:
        f.write(b"\xff\xfe\n")
    with pytest.raises(DataError, match=r"ExpertAnnotations\.txt is not UTF-8 text"):
        read_judgements(tmp_path)


def test_a_pair_judged_on_two_lines_pools_its_judgements(tmp_path, caplog):
    """The second line of a pair silently replaced the first (4,3,4 then 1,1,1 gave 1.0, a negative):
    all its scores are averaged and all its votes added, logged."""
    from crossmodal.judgements import read_judgements

    a, b = photo_name(0), photo_name(1)
    cap = f"{b[1]}#2"
    write_judgements(tmp_path, [(a[1], cap, (4, 3, 4)), (b[1], f"{b[1]}#0", (4, 4, 4)), (a[1], cap, (1, 1, 1))],
                     [(a[1], cap, 2, 1), (a[1], cap, 0, 3)])
    caplog.set_level(logging.WARNING)
    j = read_judgements(tmp_path)
    row = int(np.flatnonzero((j.img_ids == a[0]) & (j.cap_ids == b[0] * 10 + 2))[0])
    assert len(j.img_ids) == 2
    assert j.expert[row] == pytest.approx((4 + 3 + 4 + 1 + 1 + 1) / 6) and j.crowd[row] == pytest.approx(2 / 6)
    assert "judges 1 pairs on several lines" in caplog.text and "pooled" in caplog.text


# --- the server's port ---------------------------------------------------------------------------


def test_a_port_in_use_is_one_line_and_port_0_is_the_real_one():
    """A port in use: the page's address was printed, then uvicorn's own error and exit code 3;
    ``--port 0`` printed ``http://127.0.0.1:0/``."""
    from crossmodal.serve import check_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DataError, match=rf"--port {port}: .*pick another --port") as e:
            check_port("127.0.0.1", port)
        assert "\n" not in str(e.value)
    free = check_port("127.0.0.1", 0)
    assert 0 < free < 65536
    with socket.socket() as again:  # the port said is one that can be listened on
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", free))

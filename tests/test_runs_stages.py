"""Every state a kill can leave embedding + indexes, scoring and the figures in ends, after a plain
rerun, in the files of an uninterrupted run (arrays and indexes byte for byte; sidecars but for
their creation times; PNGs byte for byte).

- embedding (``get_features_captions.py``): two outputs, images then captions, each published as
  one unit (``.npy`` and ``.faiss`` renamed into place, then the sidecar);
- scoring (``retrieve_*.py``): the PR figure, then the top-k lists and ``metrics.json`` as one unit,
  then the evaluation's row in ``results.jsonl``;
- figures (``main_retrieve.py``): one PNG after another, each written whole."""

import json
import shutil

import numpy as np
import pytest

import crossmodal.figures as figures_mod
import crossmodal.retrieve as retrieve_mod
import crossmodal.runs as embed_mod  # Run.embed publishes the embeddings
from crossmodal import outputs
from crossmodal.outputs import read_jsonl
from get_features_captions import main as embed_main
from main_retrieve import main as figures_main
from retrieve_img2text import main as i2t_main
from tests.test_runs_common import features_for, sidecar_view, train


@pytest.fixture(scope="module")
def run_feats(small_root, tmp_path_factory):
    return features_for(small_root, tmp_path_factory)


class Killed(BaseException):
    pass


@pytest.fixture(scope="module")
def trained(run_feats, tmp_path_factory):
    """A trained run (no embeddings yet)."""
    runs = tmp_path_factory.mktemp("stage_runs")
    train(run_feats, runs, epochs=2)
    return runs / "img2text_fasttext"


def _fresh_copy(run, dst):
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("*.lock"))
    return dst


def _partial_publish(renames: int):
    """A publish killed after ``renames`` of its files were renamed into place (before the sidecar)."""

    def publish(sidecar, meta, files):
        for final, tmp in list(files.items())[:renames]:
            tmp.replace(final)
        raise Killed

    return publish


def _emb_view(run):
    d = run / "embeddings"
    return {p.name: (sidecar_view(json.loads(p.read_text())) if p.suffix == ".json" else outputs.file_digest(p))
            for p in sorted(d.iterdir()) if not p.name.endswith(".lock") and ".tmp" not in p.name}


def test_embedding_killed_at_each_publish_step_ends_as_uninterrupted(trained, tmp_path, monkeypatch):
    ref = _fresh_copy(trained, tmp_path / "ref" / "img2text_fasttext")
    embed_main(["--run", str(ref), "--split", "val", "--index", "ivf", "--nlist", "2"])
    want = _emb_view(ref)
    orig = embed_mod.publish
    calls = {"n": 0}
    for output in (0, 1):  # the image embeddings' publish, then the captions'
        for renames in (0, 1, 2):  # killed before the renames, after the .npy, after the .faiss (no sidecar)
            run = _fresh_copy(trained, tmp_path / f"o{output}r{renames}" / "img2text_fasttext")

            def publish(sidecar, meta, files, _o=output, _r=renames):
                calls["n"] += 1
                if calls["n"] - 1 == _o:
                    return _partial_publish(_r)(sidecar, meta, files)
                return orig(sidecar, meta, files)

            calls["n"] = 0
            monkeypatch.setattr(embed_mod, "publish", publish)
            with pytest.raises(Killed):
                embed_main(["--run", str(run), "--split", "val", "--index", "ivf", "--nlist", "2"])
            monkeypatch.setattr(embed_mod, "publish", orig)
            embed_main(["--run", str(run), "--split", "val", "--index", "ivf", "--nlist", "2"])
            assert _emb_view(run) == want, (output, renames)


def _score_view(run):
    out = {}
    for p in sorted((run / "retrieval").iterdir()):
        if p.suffix == ".json":
            out[p.name] = sidecar_view(json.loads(p.read_text()))
        elif p.suffix == ".npy":
            out[p.name] = np.load(p).tolist()
    rows = [r for r in read_jsonl(run / "results.jsonl") if r.get("type") == "eval"]
    out["eval rows"] = [{k: v for k, v in r.items() if k != "eval_s"} for r in rows]
    out["pr figure"] = outputs.file_digest(next((run / "figures").glob("pr_*.png")))
    return out


@pytest.mark.parametrize("kill", ["figure", "publish", "publish after renames", "results row"])
def test_scoring_killed_at_each_step_ends_as_uninterrupted(trained, tmp_path, monkeypatch, kill):
    ref = _fresh_copy(trained, tmp_path / "ref" / "img2text_fasttext")
    embed_main(["--run", str(ref), "--split", "val"])
    run = _fresh_copy(ref, tmp_path / "run" / "img2text_fasttext")
    i2t_main(["--run", str(ref), "--split", "val"])
    if kill == "figure":
        monkeypatch.setattr(figures_mod, "_save", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    elif kill.startswith("publish"):
        monkeypatch.setattr(retrieve_mod, "publish", _partial_publish(2 if "renames" in kill else 0))
    else:
        monkeypatch.setattr(retrieve_mod, "append_jsonl", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        i2t_main(["--run", str(run), "--split", "val"])
    monkeypatch.undo()
    i2t_main(["--run", str(run), "--split", "val"])
    i2t_main(["--run", str(run), "--split", "val"])  # and a second rerun adds nothing
    got, want = _score_view(run), _score_view(ref)
    assert len(got["eval rows"]) == 1
    assert got == want


def test_a_deleted_pr_figure_is_drawn_again(trained, tmp_path):
    run = _fresh_copy(trained, tmp_path / "run" / "img2text_fasttext")
    embed_main(["--run", str(run), "--split", "val"])
    i2t_main(["--run", str(run), "--split", "val"])
    fig = next((run / "figures").glob("pr_*.png"))
    before = fig.read_bytes()
    fig.unlink()
    i2t_main(["--run", str(run), "--split", "val"])
    assert fig.read_bytes() == before  # (scored again: a second evaluation row with the same metrics)


def test_figures_killed_half_way_end_as_uninterrupted(trained, small_root, tmp_path, monkeypatch):
    argv = ["--coco-root", str(small_root), "--split", "val", "--random", "2", "--k", "3"]
    ref = _fresh_copy(trained, tmp_path / "ref" / "img2text_fasttext")
    embed_main(["--run", str(ref), "--split", "val"])
    run = _fresh_copy(ref, tmp_path / "run" / "img2text_fasttext")
    want = {p.name: p.read_bytes() for p in figures_main(["--run", str(ref), *argv])}
    orig, calls = figures_mod._save, {"n": 0}

    def dying(fig, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return orig(fig, path)

    monkeypatch.setattr(figures_mod, "_save", dying)
    with pytest.raises(Killed):
        figures_main(["--run", str(run), *argv])
    monkeypatch.undo()
    got = {p.name: p.read_bytes() for p in figures_main(["--run", str(run), *argv])}
    assert got == want and len(got) == 4
    assert not [p for p in (run / "figures").iterdir() if ".tmp" in p.name]


def test_embeddings_whose_ids_were_reordered_are_refused(trained, tmp_path):
    """Reordered ids in an embedding sidecar would silently score every query against the wrong
    truth (img2text R@1 from 23 to 0); the rows digest recorded at publication refuses them."""
    from crossmodal.embed import embedding_paths, load_embeddings
    from crossmodal.errors import FeatureError

    run = _fresh_copy(trained, tmp_path / "run")
    embed_main(["--run", str(run), "--split", "val"])
    img, txt, rows, im, tm = load_embeddings(run, "val")  # accepted as published
    assert len(set(im["ids"])) == len(im["ids"]) > 1
    for kind, key in (("img", "ids"), ("text", "image_ids")):
        sidecar = embedding_paths(run, "val")[kind].with_suffix(".json")
        meta = json.loads(sidecar.read_text())
        good = sidecar.read_text()
        meta[key] = meta[key][::-1]
        sidecar.write_text(json.dumps(meta))
        with pytest.raises(FeatureError, match=f"{sidecar.stem}.npy.*(not the ones|reordered|ids)"):
            load_embeddings(run, "val")
        sidecar.write_text(good)
    assert np.array_equal(load_embeddings(run, "val")[0], img)

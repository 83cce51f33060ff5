"""Training: it learns, resumes exactly, is deterministic, and refuses what does not fit."""

import json
import shutil

import numpy as np
import pytest
import torch

from crossmodal.errors import DataError, FeatureError, ModelError
from crossmodal.heads import hardest_negative_loss
from crossmodal.metrics import evaluate
from crossmodal.outputs import OutputConflictError
from crossmodal.store import load_features, save_features
from crossmodal.train import (
    Trainer,
    build_parser,
    check_features_fit,
    embed_bank,
    heads_from_checkpoint,
    load_checkpoint,
    load_pairs,
)
from img2text import main as img2text_main
from tests.test_integrity_helpers import train_interrupted_at
from text2img_bert import main as text2img_bert_main


def _args(feats, runs, *extra):
    return ["--features-dir", str(feats), "--runs-dir", str(runs), "--no-progress", *extra]


def _untrained_val(feats, direction, text_encoder):
    a = build_parser(direction, text_encoder).parse_args(["--features-dir", str(feats)])
    pairs = lambda s: load_pairs(feats / f"{s}_img_effnet-lite0.npy", feats / f"{s}_text_{text_encoder}.npy")  # noqa: E731
    return Trainer(a, pairs("train"), pairs("val"), torch.device("cpu")).validate()


@pytest.mark.parametrize("main,direction,enc", [(img2text_main, "img2text", "fasttext"),
                                                 (text2img_bert_main, "text2img", "bert")])
def test_training_learns_in_both_directions(demo_features, tmp_path, main, direction, enc):
    before = _untrained_val(demo_features, direction, enc)
    summary = main(_args(demo_features, tmp_path, "--epochs", "20"))
    best = summary["best"]
    for d in ("img2text", "text2img"):
        # 50 val images: chance R@1 is 2%; the trained heads must be far above the untrained ones
        after, untrained = best[f"val_{d}_R@1"], before[f"{d}_R@1"]
        assert after >= max(3 * untrained, untrained + 7), (d, untrained, after)
        assert best[f"val_{d}_R@5"] >= 35, (d, best)
    run = tmp_path / f"{direction}_{enc}"
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(20)) and rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((run / "args.json").read_text())["negatives"] == {"fasttext": "random", "bert": "hardest"}[enc]
    ck = load_checkpoint(run / "best.pt")  # weights_only=True
    assert ck["epoch"] == best["epoch"] and ck["txt_features"]["encoder"] == enc
    # best.pt is the first epoch with the highest validation rsum, and its heads score that epoch's numbers
    rsums = [r["val_rsum"] for r in rows]
    assert best["epoch"] == int(np.argmax(rsums)) and best["rsum"] == max(rsums)
    assert rsums[best["epoch"]] > rsums[0] and rows[best["epoch"]]["val_img2text_R@1"] == best["val_img2text_R@1"]
    img_head, txt_head = heads_from_checkpoint(ck)
    val = load_pairs(demo_features / "val_img_effnet-lite0.npy", demo_features / f"val_text_{enc}.npy")
    with torch.inference_mode():
        m = evaluate(embed_bank(img_head, val.img), embed_bank(txt_head, val.txt), val.cap_img_rows)
    for k in ("rsum", "img2text_R@1", "text2img_R@5"):
        assert m[k] == pytest.approx(best[f"val_{k}"] if k != "rsum" else best["rsum"], abs=1e-6), k
    # the training figure is a drawn plot (axes, two curves), not an empty file
    from PIL import Image

    fig = Image.open(run / "figures" / "training.png")
    pixels = np.asarray(fig.convert("L"))
    assert fig.format == "PNG" and fig.size[0] >= 600 and fig.size[1] >= 300
    assert len(np.unique(pixels)) > 20 and (pixels < 128).mean() > 0.005, "a blank canvas"


def test_rerun_is_skipped_when_up_to_date(demo_features, tmp_path, caplog):
    img2text_main(_args(demo_features, tmp_path, "--epochs", "2"))
    t0 = (tmp_path / "img2text_fasttext" / "best.pt").stat().st_mtime_ns
    caplog.set_level("INFO")
    img2text_main(_args(demo_features, tmp_path, "--epochs", "2"))
    assert "skipped" in caplog.text
    assert (tmp_path / "img2text_fasttext" / "best.pt").stat().st_mtime_ns == t0


def test_same_seed_same_result(demo_features, tmp_path):
    a = img2text_main(_args(demo_features, tmp_path / "a", "--epochs", "3", "--negatives", "hardest"))
    b = img2text_main(_args(demo_features, tmp_path / "b", "--epochs", "3", "--negatives", "hardest"))
    img2text_main(_args(demo_features, tmp_path / "c", "--epochs", "3", "--negatives", "hardest", "--seed", "1"))
    ra, rb, rc = (json.loads((tmp_path / x / "img2text_fasttext" / "results.jsonl").read_text().splitlines()[-1])
                  for x in "abc")
    strip = lambda r: {k: v for k, v in r.items() if k != "train_s"}  # noqa: E731 (timing differs run to run)
    assert strip(ra) == strip(rb) and a["best"] == b["best"]
    assert ra["loss"] != rc["loss"]  # another seed: another run
    wa, wb = (load_checkpoint(tmp_path / x / "img2text_fasttext" / "last.pt")["img_head"] for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_interruption_matches_uninterrupted(demo_features, tmp_path, monkeypatch):
    img2text_main(_args(demo_features, tmp_path / "ref", "--epochs", "6"))
    train_interrupted_at(lambda: img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "6")), 4, monkeypatch)
    assert load_checkpoint(tmp_path / "run" / "img2text_fasttext" / "last.pt")["epoch"] == 3
    img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "6", "--resume"))
    ref = (tmp_path / "ref" / "img2text_fasttext" / "results.jsonl").read_text().splitlines()
    got = (tmp_path / "run" / "img2text_fasttext" / "results.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "train_s"}  # noqa: E731
    assert [strip(x) for x in got] == [strip(x) for x in ref]
    wa = load_checkpoint(tmp_path / "ref" / "img2text_fasttext" / "best.pt")["txt_head"]
    wb = load_checkpoint(tmp_path / "run" / "img2text_fasttext" / "best.pt")["txt_head"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _copy_features(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resume_refuses_features_of_another_dim(demo_features, tmp_path):
    feats = _copy_features(demo_features, tmp_path / "f")
    img2text_main(_args(feats, tmp_path, "--epochs", "1"))
    for split in ("train", "val"):  # same file names, other fastText dim
        npy = feats / f"{split}_text_fasttext.npy"
        arr, meta = load_features(npy, mmap=False)
        save_features(npy, arr[:, :16], dict(meta, weights=dict(meta["weights"], sha256_16="other")))
    with pytest.raises(OutputConflictError, match=r"holds a model trained with other arguments or features "
                                                  r"\(features.train_txt: .*--name NEW"):
        img2text_main(_args(feats, tmp_path, "--epochs", "1", "--resume"))
    ck = load_checkpoint(tmp_path / "img2text_fasttext" / "last.pt")  # and a checkpoint never loads into them
    pairs = load_pairs(feats / "train_img_effnet-lite0.npy", feats / "train_text_fasttext.npy")
    with pytest.raises(FeatureError, match="differ from the checkpoint's in .*dim"):
        check_features_fit(ck, pairs.img_meta, pairs.txt_meta, "here")


def test_resume_without_checkpoint_is_refused(demo_features, tmp_path):
    with pytest.raises(ModelError, match="last.pt does not exist"):
        img2text_main(_args(demo_features, tmp_path, "--resume"))


def test_train_and_val_from_different_encoders_refused(demo_features, tmp_path):
    feats = _copy_features(demo_features, tmp_path / "f")
    shutil.copy(feats / "val_text_bert.npy", feats / "val_text_fasttext.npy")
    shutil.copy(feats / "val_text_bert.json", feats / "val_text_fasttext.json")
    with pytest.raises(FeatureError, match="train and val caption features come from different encoders"):
        img2text_main(_args(feats, tmp_path))


def test_empty_split_refused(demo_features, tmp_path):
    feats = _copy_features(demo_features, tmp_path / "f")
    arr, meta = load_features(feats / "train_text_fasttext.npy", mmap=False)
    save_features(feats / "train_text_fasttext.npy", arr[:0], dict(meta, ids=[], image_ids=[]))
    with pytest.raises(DataError, match="empty split"):
        img2text_main(_args(feats, tmp_path))


def test_missing_features_name_the_file(tmp_path):
    with pytest.raises(FeatureError, match=r"train_img_effnet-lite0.npy does not exist"):
        img2text_main(_args(tmp_path, tmp_path))


def naive_hardest(img, txt, rows, margin):
    B = len(img)
    s = img @ txt.T
    i2t = [max([0.0] + [margin - s[i, i] + s[i, j] for j in range(B) if rows[j] != rows[i]]) for i in range(B)]
    t2i = [max([0.0] + [margin - s[j, j] + s[i, j] for i in range(B) if rows[i] != rows[j]]) for j in range(B)]
    return np.mean(i2t), np.mean(t2i)


def test_hardest_negative_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=1)
    rows = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])  # repeated images: never each other's negative
    i2t, t2i = naive_hardest(img.numpy(), txt.numpy(), rows.numpy(), 0.2)
    assert float(hardest_negative_loss(img, txt, rows, 0.2, "img2text")) == pytest.approx(i2t, abs=1e-6)
    assert float(hardest_negative_loss(img, txt, rows, 0.2, "text2img")) == pytest.approx(t2i, abs=1e-6)
    assert float(hardest_negative_loss(img, txt, rows, 0.2, "both")) == pytest.approx(i2t + t2i, abs=1e-6)


def test_features_of_another_split_are_refused(demo_features, tmp_path):
    feats = _copy_features(demo_features, tmp_path / "f")
    for suffix in ("npy", "json"):  # "val" files that actually hold the train split
        shutil.copy(feats / f"train_img_effnet-lite0.{suffix}", feats / f"val_img_effnet-lite0.{suffix}")
    with pytest.raises(FeatureError, match="holds features of split 'train', not 'val'"):
        img2text_main(_args(feats, tmp_path))
    with pytest.raises(DataError, match="validate on held-out data"):
        img2text_main(_args(demo_features, tmp_path, "--val-split", "train"))


def test_broken_correspondence_stays_at_chance(demo_features, tmp_path):
    """Control: with training captions shuffled across images nothing can be learned, so
    validation must stay near chance (this caught a leak where two splits shared a file)."""
    feats = _copy_features(demo_features, tmp_path / "f")
    arr, meta = load_features(feats / "train_text_bert.npy", mmap=False)
    save_features(feats / "train_text_bert.npy", arr[np.random.default_rng(0).permutation(len(arr))], meta)
    best = text2img_bert_main(_args(feats, tmp_path, "--epochs", "10"))["best"]
    assert best["val_img2text_R@1"] <= 12 and best["val_text2img_R@1"] <= 8  # chance: 2% (50 val images)


def naive_summed(img, txt, rows, margin):
    B = len(img)
    s = img @ txt.T
    i2t = [sum(max(0.0, margin - s[i, i] + s[i, j]) for j in range(B) if rows[j] != rows[i]) for i in range(B)]
    t2i = [sum(max(0.0, margin - s[j, j] + s[i, j]) for i in range(B) if rows[i] != rows[j]) for j in range(B)]
    return np.mean(i2t), np.mean(t2i)


def naive_infonce(img, txt, rows, temperature):
    B = len(img)
    s = img @ txt.T / temperature

    def ce(i, others):  # -log softmax of pair i among itself and the items of other images
        logits = np.array([s[i, i]] + [v for v in others])
        return -(logits[0] - np.log(np.exp(logits).sum()))

    i2t = [ce(i, [s[i, j] for j in range(B) if rows[j] != rows[i]]) for i in range(B)]
    t2i = [ce(j, [s[i, j] for i in range(B) if rows[i] != rows[j]]) for j in range(B)]
    return np.mean(i2t), np.mean(t2i)


def test_summed_and_infonce_losses_match_a_loop():
    from crossmodal.heads import infonce_loss

    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=1).double()
    txt = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=1).double()
    rows = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])  # captions of one image: neither positive nor negative
    i2t, t2i = naive_summed(img.numpy(), txt.numpy(), rows.numpy(), 0.2)
    for d, want in (("img2text", i2t), ("text2img", t2i), ("both", i2t + t2i)):
        assert float(hardest_negative_loss(img, txt, rows, 0.2, d, reduce="sum")) == pytest.approx(want, abs=1e-9)
    i2t, t2i = naive_infonce(img.numpy(), txt.numpy(), rows.numpy(), 0.1)
    for d, want in (("img2text", i2t), ("text2img", t2i), ("both", i2t + t2i)):
        assert float(infonce_loss(img, txt, rows, 0.1, d)) == pytest.approx(want, abs=1e-9)


def test_warmup_sums_negatives_then_takes_the_hardest(demo_features, monkeypatch):
    import crossmodal.train as tr

    seen = []
    real = tr.hardest_negative_loss
    monkeypatch.setattr(tr, "hardest_negative_loss", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    a = build_parser("img2text", "bert").parse_args(["--features-dir", str(demo_features), "--negatives", "hardest",
                                                      "--warmup-epochs", "2",
                                                      "--epochs", "4", "--batch-size", "256"])
    pairs = lambda s: load_pairs(demo_features / f"{s}_img_effnet-lite0.npy", demo_features / f"{s}_text_bert.npy")  # noqa: E731
    trainer = Trainer(a, pairs("train"), pairs("val"), torch.device("cpu"))
    steps = []
    for epoch in range(4):
        n = len(seen)
        trainer.train_epoch(epoch)
        steps.append(set(seen[n:]))
    assert steps == [{"sum"}, {"sum"}, {"max"}, {"max"}]


@pytest.mark.parametrize("extra", [["--negatives", "infonce"], ["--negatives", "hardest", "--warmup-epochs", "3"],
                                   ["--negatives", "sum"]])
def test_in_batch_losses_learn_both_directions(demo_features, tmp_path, extra):
    before = _untrained_val(demo_features, "img2text", "bert")
    best = text2img_bert_main(_args(demo_features, tmp_path, "--epochs", "20", "--direction", "both", *extra))["best"]
    for d in ("img2text", "text2img"):  # 50 val images: chance R@1 is 2%, R@5 10%
        assert best[f"val_{d}_R@1"] >= before[f"{d}_R@1"] + 5, (d, before, best)
        assert best[f"val_{d}_R@5"] >= max(35, before[f"{d}_R@5"] + 15), (d, before, best)

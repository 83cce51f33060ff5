"""Training step settings (crossmodal/train_step.py): ``--step exact`` is the loop as it ran before
the setting existed, bit for bit; ``--step fast`` / ``--precision bf16`` learn, resume exactly, are
recorded in the run's identity, and bad values are refused."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossmodal.heads import ProjectionHead, hardest_negative_loss, random_negative_loss
from crossmodal.outputs import OutputConflictError
from crossmodal.train import Pairs, Trainer, build_parser, load_checkpoint
from crossmodal.train_step import HeadPass, native_bf16, resolve_precision
from crossmodal.triplets import TripletCOCO_Img2Text, TripletCOCO_Text2Img
from img2text import main as img2text_main
from tests.test_integrity_helpers import train_interrupted_at


def _pairs(n_img=40, d_img=48, d_txt=24, seed=0):
    """Synthetic features with a learnable link: captions are noisy projections of their image."""
    g = np.random.default_rng(seed)
    img = g.standard_normal((n_img, d_img), dtype=np.float32)
    rows = np.repeat(np.arange(n_img), 5)
    txt = (img[rows] @ g.standard_normal((d_img, d_txt), dtype=np.float32) / 7
           + 0.3 * g.standard_normal((len(rows), d_txt), dtype=np.float32)).astype(np.float32)
    return Pairs(torch.from_numpy(img), torch.from_numpy(txt), rows, {}, {}, np.ones(len(rows), bool))


def _old_forward(head, x):
    """ProjectionHead.forward as it was: the Sequential in one call, nn.Dropout's mask."""
    y = head.net((x - head.mean) / head.std)
    return F.normalize(y, dim=-1) if head.l2norm else y


def todays_loop(a, train: Pairs, epochs: int):
    """The training loop before ``--step`` existed (crossmodal/train.py at 9a4f342), written out:
    torch's default per-tensor Adam on the CPU, one head pass per block, nn.Dropout's masks."""
    torch.manual_seed(a.seed)
    kw = {"hidden": a.hidden, "out_dim": a.out_dim, "dropout": a.dropout, "l2norm": not a.no_l2norm}
    hi, ht = ProjectionHead(train.img.shape[1], **kw), ProjectionHead(train.txt.shape[1], **kw)
    for head, bank in ((hi, train.img), (ht, train.txt)):
        head.fit_standardisation(bank[np.sort(np.random.default_rng(a.seed).permutation(len(bank))[:200_000])])
    opt = torch.optim.Adam(list(hi.parameters()) + list(ht.parameters()), lr=a.lr, weight_decay=a.weight_decay,
                           foreach=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, a.epochs))
    rows, n_img = train.cap_img_rows, len(train.img)
    i2t, t2i = TripletCOCO_Img2Text(rows, n_img, seed=a.seed), TripletCOCO_Text2Img(rows, n_img, seed=a.seed)
    margin = 1.0 if a.negatives == "random" else 0.2
    for epoch in range(epochs):
        torch.manual_seed(a.seed * 100_003 + epoch)
        rng = np.random.default_rng([a.seed, epoch, 7])
        idx = {"img2text": i2t.epoch_indices(epoch), "text2img": t2i.epoch_indices(epoch)}
        perm = rng.permutation(len(rows))
        hi.train(), ht.train()
        for s in range(0, len(perm), a.batch_size):
            b = perm[s : s + a.batch_size]
            if len(b) < 2:
                continue
            if a.negatives == "hardest":
                r = rows[b]
                loss = hardest_negative_loss(_old_forward(hi, train.img[r]), _old_forward(ht, train.txt[b]),
                                             torch.from_numpy(r), margin, a.direction)
            else:
                an, po, ne = (x[b] for x in idx["img2text"])
                loss = random_negative_loss(_old_forward(hi, train.img[an]), _old_forward(ht, train.txt[po]),
                                            _old_forward(ht, train.txt[ne]), margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return hi, ht


@pytest.mark.parametrize("extra", [[], ["--negatives", "hardest", "--direction", "both"]])
def test_exact_step_is_the_old_loop_bit_for_bit(extra):
    a = build_parser("img2text", "fasttext").parse_args(["--features-dir", ".", "--batch-size", "32", "--step", "exact",
                                                         "--precision", "fp32", *extra])
    train = _pairs()
    tr = Trainer(a, train, None, torch.device("cpu"))
    for e in range(3):
        tr.train_epoch(e)
    hi, ht = todays_loop(a, train, 3)
    for new, old in ((tr.img_head, hi), (tr.txt_head, ht)):
        sn, so = new.state_dict(), old.state_dict()
        assert sn.keys() == so.keys()
        assert all(torch.equal(sn[k], so[k]) for k in sn), [k for k in sn if not torch.equal(sn[k], so[k])]
    moved = ProjectionHead(train.img.shape[1]).state_dict()["net.0.weight"]
    assert not torch.equal(hi.state_dict()["net.0.weight"], moved)  # it trained


@pytest.mark.parametrize("setting", [["--step", "fast"], ["--precision", "bf16"], ["--step", "fast", "--precision",
                                                                                    "bf16"]])
def test_other_settings_are_other_rounding_of_the_same_model(setting):
    """Not bit-equal to the exact loop, but close after a few steps, and learning: the loss falls."""
    base = ["--features-dir", ".", "--batch-size", "32", "--dropout", "0", "--step", "exact", "--precision", "fp32"]
    # (no dropout: the masks' RNG differs)
    train = _pairs()
    runs = {}
    for name, argv in (("exact", base), ("other", [*base, *setting])):
        tr = Trainer(build_parser("img2text", "fasttext").parse_args(argv), train, None, torch.device("cpu"))
        losses = [tr.train_epoch(0)]
        losses.append(tr.train_epoch(1))
        runs[name] = (tr.txt_head.state_dict()["net.0.weight"], losses)
    (w0, l0), (w1, l1) = runs["exact"], runs["other"]
    assert not torch.equal(w0, w1)
    tol = 0.05 if "bf16" in setting else 1e-4
    assert (w0 - w1).abs().max() < tol * w0.abs().max()
    assert l1[1] < l1[0] and l1[0] == pytest.approx(l0[0], rel=0.05)


def test_fast_dropout_masks_drop_p_of_the_units_and_repeat_per_epoch():
    head = ProjectionHead(16, hidden=4096, dropout=0.25)
    hp = HeadPass("fast")
    hp.start_epoch(3, 5)
    k1 = hp._keep(head, 64, "cpu")
    hp.start_epoch(3, 5)
    k2 = hp._keep(head, 64, "cpu")
    hp.start_epoch(3, 6)
    assert torch.equal(k1, k2) and not torch.equal(k1, hp._keep(head, 64, "cpu"))
    assert (k1 == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    values = k1.unique().tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / 0.75)
    head.eval()
    assert hp._keep(head, 64, "cpu") is None


def _args(feats, runs, *extra):
    return ["--features-dir", str(feats), "--runs-dir", str(runs), "--no-progress", *extra]


FAST = ["--step", "fast", "--precision", "bf16"]


def test_fast_bf16_learns_resumes_exactly_and_is_recorded(demo_features, tmp_path, monkeypatch):
    ref = img2text_main(_args(demo_features, tmp_path / "ref", "--epochs", "12", *FAST))
    rows = [json.loads(x) for x in (tmp_path / "ref" / "img2text_fasttext" / "results.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and ref["best"]["val_img2text_R@5"] >= 30, ref["best"]
    record = json.loads((tmp_path / "ref" / "img2text_fasttext" / "args.json").read_text())
    assert record["step"] == "fast" and record["precision"] == "bf16"
    train_interrupted_at(lambda: img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "12", *FAST)), 4,
                         monkeypatch)
    img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "12", "--resume", *FAST))
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "train_s"}  # noqa: E731
    got, want = ((tmp_path / x / "img2text_fasttext" / "results.jsonl").read_text().splitlines()
                 for x in ("run", "ref"))
    assert [strip(x) for x in got] == [strip(x) for x in want]
    wa, wb = (load_checkpoint(tmp_path / x / "img2text_fasttext" / "last.pt")["txt_head"] for x in ("ref", "run"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same run folder with the old loop is another model: refused, not resumed or mixed
    run = _args(demo_features, tmp_path / "run", "--epochs", "12")
    with pytest.raises(OutputConflictError, match="step"):
        img2text_main([*run, "--step", "exact", "--precision", "bf16"])
    with pytest.raises(OutputConflictError, match="precision"):
        img2text_main([*run, "--step", "fast", "--precision", "fp32"])


def test_the_old_loops_settings_keep_older_runs_identity(demo_features, tmp_path):
    """A run recorded before --step/--precision existed (no such keys) is the same run as one with
    --step exact --precision fp32 (the old loop): rerunning it is skipped, not refused."""
    run = tmp_path / "img2text_fasttext"
    img2text_main(_args(demo_features, tmp_path, "--epochs", "1", "--step", "exact", "--precision", "fp32"))
    rec = json.loads((run / "args.json").read_text())
    assert "step" not in rec and "precision" not in rec
    assert img2text_main(_args(demo_features, tmp_path, "--epochs", "1", "--step", "exact", "--precision",
                                "fp32"))["epochs_run"] == 1
    # the defaults (fast, auto) are recorded, auto as what it resolved to on this machine
    img2text_main(_args(demo_features, tmp_path / "new", "--epochs", "1"))
    rec = json.loads((tmp_path / "new" / "img2text_fasttext" / "args.json").read_text())
    assert rec["step"] == "fast" and rec["precision"] == resolve_precision("auto", "cpu") in ("fp32", "bf16")


@pytest.mark.parametrize("flag,value", [("--step", "fastest"), ("--precision", "fp16")])
def test_bad_setting_is_one_line_exit_2(flag, value):
    r = subprocess.run([sys.executable, "img2text.py", "--features-dir", ".", flag, value],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert r.returncode == 2 and value in r.stderr and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.splitlines() if "error" in x]) == 1


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bf16("cpu") and resolve_precision("auto", "cpu") == "fp32"
    assert not HeadPass("fast", "auto", "cpu").bf16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16" and HeadPass("fast", "auto", "cpu").bf16

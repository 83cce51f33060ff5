"""The projection head's two forms (crossmodal/heads.py): ``mlp`` (the seed's) and ``residual``
(VSE∞'s MLP plus a linear path), checked against a naive reference; checkpoints of either load,
and checkpoints written before the option existed load as ``mlp``."""

import json

import numpy as np
import pytest
import torch

from crossmodal.heads import ProjectionHead
from crossmodal.train import heads_from_checkpoint, load_checkpoint
from img2text import main as img2text_main


def _naive(head: ProjectionHead, x: np.ndarray) -> np.ndarray:
    """The head written out in numpy: standardise, Linear-ReLU-Linear (+ Linear on the standardised
    input when residual), L2-normalise. ``x`` (N, d_in) -> (N, out_dim)."""
    sd = {k: v.double().numpy() for k, v in head.state_dict().items()}
    z = (x - sd["mean"]) / sd["std"]
    h = np.maximum(z @ sd["net.0.weight"].T + sd["net.0.bias"], 0.0)
    y = h @ sd["net.3.weight"].T + sd["net.3.bias"]
    if "skip.weight" in sd:
        y = y + z @ sd["skip.weight"].T + sd["skip.bias"]
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.mark.parametrize("residual", [False, True])
def test_head_matches_a_naive_reference(residual):
    torch.manual_seed(0)
    x = np.random.default_rng(1).normal(3.0, 2.0, (50, 12))
    head = ProjectionHead(12, hidden=16, out_dim=6, dropout=0.5, residual=residual)
    head.fit_standardisation(torch.from_numpy(x).float())
    head.eval()
    with torch.no_grad():
        got = head(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(got, _naive(head, x), atol=1e-5)
    assert ("skip.weight" in head.state_dict()) == residual and head.config["residual"] == residual


def test_residual_path_changes_the_output_and_round_trips_a_checkpoint():
    torch.manual_seed(0)
    x = torch.randn(20, 12)
    res = ProjectionHead(12, hidden=16, out_dim=6, residual=True).eval()
    mlp = ProjectionHead(12, hidden=16, out_dim=6).eval()
    mlp.load_state_dict({k: v for k, v in res.state_dict().items() if not k.startswith("skip.")})
    with torch.no_grad():
        assert (res(x) - mlp(x)).abs().max() > 0.05  # the linear path is used
        old_config = {k: v for k, v in mlp.config.items() if k != "residual"}  # a checkpoint from before the option
        for head, config in ((res, res.config), (mlp, old_config)):
            ck = {"head_config": {"img": config, "txt": config}, "img_head": head.state_dict(),
                  "txt_head": head.state_dict()}
            img, txt = heads_from_checkpoint(ck)
            assert torch.equal(img(x), head(x)) and torch.equal(txt(x), head(x))
            assert (img.skip is None) == (head is mlp)


def test_head_flag_is_recorded_and_older_runs_stay_the_same(demo_features, tmp_path):
    """--head residual is in the run's identity and its checkpoint; the mlp head is left out of the
    record (as runs recorded before the flag existed), so rerunning such a run is skipped, not refused."""
    args = ["--features-dir", str(demo_features), "--no-progress", "--epochs", "1"]
    img2text_main([*args, "--runs-dir", str(tmp_path / "res"), "--head", "residual"])
    run = tmp_path / "res" / "img2text_fasttext"
    assert json.loads((run / "args.json").read_text())["head"] == "residual"
    assert load_checkpoint(run / "best.pt")["head_config"]["img"]["residual"] is True
    img2text_main([*args, "--runs-dir", str(tmp_path / "mlp"), "--head", "mlp"])
    run = tmp_path / "mlp" / "img2text_fasttext"
    assert "head" not in json.loads((run / "args.json").read_text())
    assert img2text_main([*args, "--runs-dir", str(tmp_path / "mlp"), "--head", "mlp"])["epochs_run"] == 1


def test_bert_defaults_and_the_seed_recipe_one_flag_string_away():
    """The BERT scripts default to the Flickr8k recipe (residual head, 2,048 wide, 6 epochs, VSE++);
    SEED_RECIPE given to them trains as the seed did, i.e. as the fastText scripts' defaults."""
    from crossmodal.train import DEFAULT_MARGIN, SEED_RECIPE, build_parser

    keys = ("negatives", "warmup_epochs", "head", "hidden", "epochs", "dropout", "lr", "out_dim")
    bert = vars(build_parser("img2text", "bert").parse_args(["--features-dir", "."]))
    assert {k: bert[k] for k in ("negatives", "warmup_epochs", "head", "hidden", "epochs")} == {
        "negatives": "hardest", "warmup_epochs": 2, "head": "residual", "hidden": 2048, "epochs": 6}
    seed = vars(build_parser("text2img", "bert").parse_args(["--features-dir", ".", *SEED_RECIPE.split()]))
    fasttext = vars(build_parser("text2img", "fasttext").parse_args(["--features-dir", "."]))
    assert {k: seed[k] for k in keys} == {k: fasttext[k] for k in keys}
    assert seed["margin"] == (fasttext["margin"] or DEFAULT_MARGIN[fasttext["negatives"]]) == 1.0
    assert fasttext["head"] == "mlp" and fasttext["hidden"] == 1024 and fasttext["epochs"] == 30


def test_feature_defaults_are_the_flickr8k_choice_and_reach_the_encoders(small_root, tmp_path, monkeypatch):
    """The feature stages default to the Flickr8k choice (bench/flickr8k.py): images at 384 px,
    captions by all-mpnet-base-v2; an encoder built from the scripts' parsed defaults gets them,
    and the seed's settings stay one flag away (--input-size 256, --bert-model minilm)."""
    from crossmodal.databases import image_parser, text_parser
    from crossmodal.image_encoders import build_image_encoder
    from crossmodal.pipeline import parser as pipeline_parser

    img = image_parser().parse_args(["--coco-root", ".", "--split", "val"])
    enc = build_image_encoder(img.encoder, input_size=img.input_size, runtime="torch")
    assert enc.input_size == 384 and float(enc.boxes.max()) == 384
    assert build_image_encoder(img.encoder, input_size=256, runtime="torch").input_size == 256
    assert text_parser().parse_args(["--coco-root", ".", "--split", "val"]).bert_model == "mpnet"
    assert pipeline_parser().parse_args(["--demo"]).bert_model == "mpnet"

    import crossmodal.text_encoders as te
    from crossmodal.databases import run_text

    class ReachedError(Exception):
        pass

    def recording(model, **kw):  # the model the caption stage builds, without loading it
        raise ReachedError(model)

    monkeypatch.setattr(te, "BertEncoder", recording)
    with pytest.raises(ReachedError, match="^mpnet$"):
        run_text(["--coco-root", str(small_root), "--split", "val", "--features-dir", str(tmp_path),
                  "--encoder", "bert", "--no-progress"])

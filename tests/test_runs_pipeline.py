"""The pipeline runs the scripts' own entry points, from any working directory, and its summary
survives a kill: a rerun ends in the summary of an uninterrupted run."""

import ast
import functools
import importlib
import json
import os
import subprocess
import sys

import pytest

from crossmodal import outputs
from crossmodal.pipeline import STAGES
from crossmodal.pipeline import run as pipeline_run
from tests.conftest import ROOT

TINY = ["--demo", "--demo-train", "24", "--demo-val", "8", "--epochs", "1", "--input-size", "64", "--fasttext-dim",
        "16", "--fasttext-bucket", "2000", "--fasttext-epoch", "3", "--quiet"]
SCRIPTS = sorted(p.name for p in ROOT.glob("*.py") if p.name not in ("coco_triplet_dataset.py",))


def test_no_package_module_imports_a_top_level_script():
    scripts = {p.stem for p in ROOT.glob("*.py")}
    for path in (ROOT / "crossmodal").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not scripts & {n.split(".")[0] for n in names}, (path.name, names)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_calls_the_entry_point_the_pipeline_calls(script, monkeypatch):
    assert script in STAGES
    mod, entry = importlib.import_module(script[:-3]), STAGES[script]
    if not isinstance(entry, functools.partial):
        assert mod.main is entry
        return
    seen = []
    names = [n for n, v in vars(mod).items() if v is entry.func]
    assert names, f"{script} does not call {entry.func.__qualname__}"
    monkeypatch.setattr(mod, names[0], lambda argv=None, **kw: seen.append((argv, kw)))
    mod.main(["--x"])
    assert seen == [(["--x"], entry.keywords)]


def _summary(folder):
    s = json.loads((folder / "runs" / "demo" / "summary.json").read_text())
    return {k: v for k, v in s.items() if k != "wall_s"}, (folder / "runs" / "demo" / "summary.txt").read_text()


@pytest.mark.slow
def test_pipeline_from_another_directory_and_its_summary_after_a_kill(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "crossmodal.pipeline", *TINY], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    want = _summary(tmp_path)
    assert "Results on val (8 images" in want[0]["header"]
    monkeypatch.chdir(tmp_path)
    summary_dir = tmp_path / "runs" / "demo"
    # killed before the summary, then between its two files
    for name in ("summary.json", "summary.txt"):
        (summary_dir / name).unlink()
    pipeline_run(TINY)
    assert _summary(tmp_path) == want
    orig = outputs.write_json

    def dying(path, obj):
        if str(path).endswith("summary.json"):
            raise KeyboardInterrupt
        return orig(path, obj)

    (summary_dir / "summary.json").unlink()
    monkeypatch.setattr(outputs, "write_json", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline_run(TINY)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    pipeline_run(TINY)
    assert _summary(tmp_path) == want
    assert not [p for p in summary_dir.iterdir() if ".tmp" in p.name]


def test_pipeline_defaults_are_the_stages_own_unless_its_help_says_why():
    """Every flag the pipeline shares with a stage has the stage's default, except those it sets
    itself on purpose (PIPELINE_DEFAULTS), whose --help names both values."""
    from crossmodal import databases, train
    from crossmodal.pipeline import PIPELINE_DEFAULTS, parser

    stages = {}
    for stage, rename in ((train.build_parser("img2text", "fasttext"), {}), (databases.text_parser(), {}),
                          (databases.image_parser(), {"encoder": "image_encoder"})):
        for action in stage._actions:
            stages.setdefault(rename.get(action.dest, action.dest), action.default)
    shared = [a for a in parser()._actions if a.dest in stages and a.dest not in ("help", "verbose", "force")]
    assert {"epochs", "train_split", "fasttext_dim", "fasttext_bucket", "image_encoder", "bert_model"} <= {
        a.dest for a in shared}
    for action in shared:
        if action.dest in PIPELINE_DEFAULTS:
            assert action.default != stages[action.dest], action.dest
            assert f"{action.default}" in action.help and f"{stages[action.dest]}" in action.help, action.help
        else:
            assert action.default == stages[action.dest], action.dest
    assert set(PIPELINE_DEFAULTS) == {"fasttext_bucket", "fasttext_epoch"}

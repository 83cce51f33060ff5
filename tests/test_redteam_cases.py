"""Cases a fresh red team found after the issue-14 work: each was a traceback or an unbounded or
misleading answer, now one clear line."""

import json

import numpy as np
import pytest

from crossmodal.errors import FeatureError
from crossmodal.store import load_features, save_features


@pytest.mark.parametrize("key, value", [("ids", [2**64, 2]), ("ids", [-1, 2]), ("skipped_ids", ["x"]),
                                        ("skipped_ids", [2**63])])
def test_sidecar_ids_out_of_range_are_one_line(tmp_path, key, value):
    npy = tmp_path / "x.npy"
    save_features(npy, np.ones((2, 2), dtype=np.float32), {"ids": [1, 2]})
    side = npy.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta[key] = value
    side.write_text(json.dumps(meta))
    with pytest.raises(FeatureError, match=f"lists {key} that are not integers from 0 to 2\\^63-1"):
        load_features(npy)


def test_demo_counts_are_bounded(tmp_path, capsys):
    from crossmodal.demo_data import main

    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "d"), "--num-train", "99999999999"])
    assert e.value.code == 2 and "--num-train" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_merge_without_num_shards_says_so(small_root, tmp_path, capsys):
    from make_database_img import main

    feats = tmp_path / "f"
    feats.mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--coco-root", str(small_root), "--split", "val", "--features-dir", str(feats), "--merge"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--num-shards N" in err and "in use by" not in err

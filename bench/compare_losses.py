"""Random vs hardest negatives for the four training scripts on the demo features
(``make demo`` first): best validation epoch by rsum, R@1 and R@5 in both directions.

    python -m bench.compare_losses [--features-dir features/demo] [--epochs 30]
"""

from __future__ import annotations

import argparse
import tempfile

from bench.common import save
from crossmodal.pipeline import MODELS


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--features-dir", default="features/demo")
    p.add_argument("--epochs", type=int, default=30)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for script, direction, enc in MODELS:
            main_fn = __import__(script[:-3]).main
            for neg, extra in (("random", []), ("hardest", []), ("hardest", ["--direction", "both"])):
                label = neg + (" (both directions)" if extra else "")
                best = main_fn(["--features-dir", a.features_dir, "--runs-dir", runs, "--name", f"{direction}_{enc}_"
                                f"{neg}{len(extra)}", "--negatives", neg, "--epochs", str(a.epochs), "--no-progress",
                                *extra])["best"]
                rows.append((script, label, best["epoch"], *(best[f"val_{d}_R@{k}"] for d in ("img2text", "text2img")
                                                           for k in (1, 5)), best["rsum"]))
    print("| script | negatives | best epoch | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | rsum |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | " + " | ".join(f"{x:.1f}" for x in r[3:]) + " |")
    save("compare_losses", {"rows": [dict(zip(("script", "negatives", "epoch", "i2t_R1", "i2t_R5", "t2i_R1", "t2i_R5",
                                                "rsum"), r, strict=True)) for r in rows]})


if __name__ == "__main__":
    main()
